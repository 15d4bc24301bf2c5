"""Benchmarks behind `lmdir bench`: one module each, with `register(subparsers)`."""
