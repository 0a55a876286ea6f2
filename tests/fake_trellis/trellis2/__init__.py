"""Fake TRELLIS.2 (CPU, tiny): mirrors the real package's API for the adapter's tests."""

import fake_control

fake_control.record_import_env()
# The real config modules print these at import; the adapter's log shows them.
print(f"[ATTENTION] Using backend: {fake_control.IMPORT_ENV.get('ATTN_BACKEND')}")
print(f"[SPARSE] Attention backend: {fake_control.IMPORT_ENV.get('SPARSE_ATTN_BACKEND')}")

from . import models, modules, pipelines, representations  # noqa: E402,F401
