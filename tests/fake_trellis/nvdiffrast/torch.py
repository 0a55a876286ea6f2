"""Stub of nvdiffrast.torch."""
