"""Bring GLBs back from the GPU machine in pieces, across calls (run there, last in a call).

The device returns at most 8 files of 16 MiB, 64 MiB in all, per call, and a preset's GLB is
18-150 MB (random-weight textures do not compress). Every GLB under OUT/glb is cut into
pieces of at most 15 MB; the pieces that fit what this call may still return stay in OUT/glb,
the rest wait in PENDING on the machine and go first in the next call made while it is warm.
Each GLB's SHA-256 travels in glb/sha256.txt until its last piece has gone, so
`join_pieces.py` here can check that the file it puts together is the one the GPU made.

usage: python3 scripts/gpu/bring_back.py OUT PENDING
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

PIECE = 15_000_000
MAX_FILES = 8
MAX_BYTES = 62 * 2**20  # under the 64 MiB of a call, with room for the logs


def cut(glb: Path, pending: Path) -> None:
    """Replace `glb` by its pieces and a .sha256 file, all moved to `pending`."""
    digest = hashlib.sha256(glb.read_bytes()).hexdigest()
    size = glb.stat().st_size
    count = max(1, -(-size // PIECE))
    with glb.open("rb") as src:
        for i in range(count):
            (pending / f"{glb.name}.p{i + 1:02d}of{count:02d}").write_bytes(src.read(PIECE))
    (pending / f"{glb.name}.sha256").write_text(f"{digest}  {glb.name}  {size}\n")
    print(f"{glb.name}: {size} bytes, sha256 {digest}, {count} pieces")
    glb.unlink()


def main(out: Path, pending: Path) -> None:
    pending.mkdir(parents=True, exist_ok=True)
    glbs = out / "glb"
    glbs.mkdir(parents=True, exist_ok=True)
    for glb in sorted(glbs.glob("*.glb")):
        cut(glb, pending)
    others = [p for p in out.rglob("*") if p.is_file() and p.parent != glbs]
    files_left = MAX_FILES - len(others)
    bytes_left = MAX_BYTES - sum(p.stat().st_size for p in others)
    # Digests first (they are tiny and say what the pieces are), then pieces oldest first.
    waiting = sorted(pending.glob("*.sha256")) + sorted(
        (p for p in pending.iterdir() if not p.name.endswith(".sha256")),
        key=lambda p: (p.stat().st_mtime, p.name),
    )
    digests = [p for p in waiting if p.name.endswith(".sha256")]
    if digests:  # one file of every digest: what the pieces here and later belong to
        text = "".join(p.read_text() for p in digests)
        (glbs / "sha256.txt").write_text(text)
        print(text, end="")
        files_left -= 1
    sent, kept = [], []
    for p in waiting:
        if p.name.endswith(".sha256"):
            continue
        size = p.stat().st_size
        if files_left > 0 and size <= bytes_left:
            shutil.move(str(p), glbs / p.name)
            files_left -= 1
            bytes_left -= size
            sent.append(p.name)
        else:
            kept.append(p.name)
    for p in digests:  # a digest stays until its last piece has gone
        stem = p.name[: -len(".sha256")]
        if not any(name.startswith(stem + ".p") for name in kept):
            os.remove(p)
    print("returned now:", " ".join(sent) or "nothing")
    print("waiting for the next call:", " ".join(kept) or "nothing")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
