"""Like the real config: the sparse attention backend is read from the environment once, at
import, and only xformers / flash_attn / flash_attn_3 are accepted (anything else stays
flash_attn, silently)."""

import os

ATTN = "flash_attn"
_env = os.environ.get("SPARSE_ATTN_BACKEND") or os.environ.get("ATTN_BACKEND")
if _env in ("xformers", "flash_attn", "flash_attn_3"):
    ATTN = _env
