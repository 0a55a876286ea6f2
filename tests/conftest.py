"""Shared fixtures: example images, an in-thread backend server and a client for it."""

from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def png_bytes(size=(128, 128), mode="RGBA", subject=True) -> bytes:
    """A transparent image with an opaque disc: the kind of input users send."""
    image = Image.new(mode, size, (0, 0, 0, 0) if mode == "RGBA" else (230, 230, 230))
    if subject:
        draw = ImageDraw.Draw(image)
        w, h = size
        draw.ellipse(
            (w // 4, h // 6, 3 * w // 4, 5 * h // 6), fill=(40, 120, 220, 255)[: len(mode)]
        )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once the process has exited (False if it is still there after `timeout`)."""
    import time

    from backend.procutil import pid_alive

    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def image_png() -> bytes:
    return png_bytes()


class RunningServer:
    """A Server in a background thread of this process, plus a connected client."""

    def __init__(self, tmp_path: Path, engine: str, **config):
        from backend.server.loop import Server, ServerConfig
        from backend.wire.client import Client

        config.setdefault("min_free_disk", 1 << 20)
        config.setdefault("heartbeat_interval", 0.2)
        config.setdefault("output_dir", tmp_path / "out")
        config.setdefault("settle_heap", False)  # never freeze the test process's objects
        self.config = ServerConfig(
            connection_file=tmp_path / "runtime" / "backend.json",
            engine=engine,
            **config,
        )
        self.server = Server(self.config)
        self.info = self.server.bind()
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.client = Client(self.config.connection_file)
        self.client.hello(timeout=10)

    def _serve(self) -> None:
        self.exit_code = self.server.serve_forever()

    def stop(self) -> None:
        if self.thread.is_alive():
            try:
                self.client.shutdown(timeout=5)
            except Exception:
                self.server.request_stop("test teardown")
            self.thread.join(timeout=30)
        self.client.close()


@pytest.fixture
def make_server(tmp_path):
    servers: list[RunningServer] = []

    def factory(engine: str = "tests.cpu_engines:SlowEngine", **config) -> RunningServer:
        server = RunningServer(tmp_path / f"s{len(servers)}", engine, **config)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRELLIS2_OUTPUT_DIR", str(tmp_path / "default-output"))
    for name in (
        "SLOW_ENGINE_EXIT_AT",
        "SLOW_ENGINE_HANG_AT",
        "SLOW_ENGINE_LOAD_ERROR",
        "SLOW_ENGINE_PRINT",
    ):
        monkeypatch.delenv(name, raising=False)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
