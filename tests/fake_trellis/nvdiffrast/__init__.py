"""Stub of the CUDA extension nvdiffrast for CPU tests (doctor sees it as installed)."""

__version__ = "0.0.0+fake"
