"""Benchmarks behind `tidal bench`; each prints its figures and a JSON summary line."""
