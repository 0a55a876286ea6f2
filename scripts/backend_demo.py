"""Start a backend (preview engine), send an example image through the client, wait for the
GLB, validate it and print where it is. No Blender needed.

    .venv/bin/python scripts/backend_demo.py [IMAGE] [--out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.checks.glbcheck import validate_glb_file  # noqa: E402
from backend.supervision import commands  # noqa: E402
from backend.wire.client import Client  # noqa: E402


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"backend exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise SystemExit("backend did not start in time")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image", nargs="?", default=str(ROOT / "examples" / "mug.png"))
    parser.add_argument("--out", default=str(ROOT / "out" / "backend_demo"))
    parser.add_argument("--engine", default="preview")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    conn = Path(tempfile.mkdtemp(prefix="trellis2-")) / "backend.json"
    command = commands.serve_command(
        sys.executable,
        connection_file=conn,
        output_dir=out,
        engine=args.engine,
        min_free_disk_mb=64,
    )
    proc = subprocess.Popen(command, cwd=ROOT, env=commands.backend_environment())
    try:
        wait_for_file(conn, proc, 60)
        with Client(conn) as client:
            hello = client.hello(timeout=10)
            print(
                f"backend {hello['backend_version']} pid {hello['pid']} "
                f"engine {hello['engine']['label']}"
            )
            image = Path(args.image)
            job_id = client.generate(
                image.read_bytes(), {"preset": "balanced"}, filename=image.name
            )
            print(f"job {job_id} queued")

            def show(message) -> None:
                if message.msg_type == "job_progress":
                    c = message.content
                    print(f"  {c['fraction'] * 100:5.1f}%  {c['label']}")

            final = client.wait_for_job(job_id, timeout=300, on_event=show)
            if final["event"] != "job_done":
                print(f"job ended with {final['event']}: {final.get('message')}")
                return 1
            report = validate_glb_file(final["glb_path"])
            stats = final["mesh_stats"]
            print(f"GLB: {final['glb_path']}")
            print(
                f"  {stats['vertices']} vertices, {stats['faces']} faces, "
                f"texture {stats['texture_size']} px, {stats['glb_bytes']} bytes, "
                f"{report['images']} image(s) {report['image_mime_types']}, "
                f"{final['seconds']:.2f} s"
            )
            client.shutdown("demo finished")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
