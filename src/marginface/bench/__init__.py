"""Benchmarks a user runs on their own hardware (`marginface bench`), shared with benchmarks/."""
