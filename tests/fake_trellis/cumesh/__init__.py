"""Stub of the CUDA extension cumesh for CPU tests (doctor sees it as installed)."""

__version__ = "0.0.0+fake"
