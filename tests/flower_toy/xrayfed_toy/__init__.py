"""Toy Flower app (numpy only) for xrayfed's TLS / SuperNode-auth / SecAgg+ tests."""
