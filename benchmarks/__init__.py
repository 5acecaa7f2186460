"""Benchmarks of the library and the services, with their baselines and synthetic data (not part
of the installed packages: run from a checkout)."""
