"""Benchmarks of the mirror daemon: see bench/README.md (run with `make bench`)."""
