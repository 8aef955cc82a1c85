"""xrayfed server side: Flower SuperLink/ServerApp wiring, run directory, reports, crypto provider."""
