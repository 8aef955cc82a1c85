"""xrayfed hospital side: Flower SuperNode/ClientApp, DP training, privacy ledger, inference service."""
