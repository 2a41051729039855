"""Command-line entry points: ``python -m jobs.<name> --help``."""
