"""Put together the GLBs that `bring_back.py` sent in pieces from the GPU machine, check each
against its SHA-256, and run the Khronos glTF-Validator on the whole files (CPU machine).

usage: python3 scripts/gpu/join_pieces.py OUT_FOLDER DIR [DIR ...]
Each DIR is a call's returned `glb` folder (pieces `NAME.glb.pNNofMM`, `sha256.txt`).
Writes OUT_FOLDER/NAME.glb and prints one line per GLB: complete or missing pieces,
digest match, Khronos errors and warnings.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.khronos import khronos_reports  # noqa: E402

PIECE = re.compile(r"^(?P<name>.+\.glb)\.p(?P<i>\d+)of(?P<n>\d+)$")


def main(out: Path, dirs: list[Path]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    pieces: dict[str, dict[int, Path]] = {}
    counts: dict[str, int] = {}
    for d in dirs:
        for line in (
            (d / "sha256.txt").read_text().splitlines() if (d / "sha256.txt").exists() else []
        ):
            digest, name, _size = line.split()
            digests[name] = digest
        for p in d.iterdir():
            m = PIECE.match(p.name)
            if m:
                pieces.setdefault(m["name"], {})[int(m["i"])] = p
                counts[m["name"]] = int(m["n"])
    whole = []
    bad = 0
    for name, parts in sorted(pieces.items()):
        missing = [i for i in range(1, counts[name] + 1) if i not in parts]
        if missing:
            print(f"{name}: missing pieces {missing}")
            bad += 1
            continue
        data = b"".join(parts[i].read_bytes() for i in range(1, counts[name] + 1))
        digest = hashlib.sha256(data).hexdigest()
        if digests.get(name) != digest:
            print(f"{name}: sha256 {digest} does not match {digests.get(name)}")
            bad += 1
            continue
        (out / name).write_bytes(data)
        whole.append(out / name)
    reports = khronos_reports(whole, timeout=600) if whole else []
    summary = []
    for path, report in zip(whole, reports, strict=True):
        issues = report["issues"]
        summary.append(
            {
                "glb": path.name,
                "bytes": path.stat().st_size,
                "errors": issues["numErrors"],
                "warnings": issues["numWarnings"],
                "messages": issues["messages"][:10],
            }
        )
        print(
            f"{path.name}: {path.stat().st_size} bytes, sha256 ok, Khronos errors "
            f"{issues['numErrors']} warnings {issues['numWarnings']}"
        )
        bad += issues["numErrors"] > 0
    (out / "khronos.json").write_text(json.dumps(summary, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]))
