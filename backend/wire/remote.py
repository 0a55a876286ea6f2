"""A connection to a studio gateway for the add-on and scripts (stdlib + pyzmq only): the
same requests and reply shapes as `client.Client` on a local backend, over CURVE, plus
`download()`, which brings a result file over in bounded chunks as bytes.

    remote = RemoteBackend(connection_string)      # from `python -m backend gateway add-user`
    job_id = remote.generate(png_bytes, {"preset": "fast"})
    remote.wait_for_job(job_id, timeout=600)       # or poll() from a timer
    glb = remote.download(job_id)                  # bytes; write them to a file, then import
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import zmq

from ..errors import BackendError, ErrorCode
from . import protocol
from .client import MAX_DOWNLOAD, Client
from .curvekeys import RemoteConnection, decode_connection


def _host_port(endpoint: str) -> tuple[str, int]:
    rest = endpoint.removeprefix("tcp://")
    host, _, port = rest.rpartition(":")
    return host, int(port)


class RemoteBackend:
    """One connection to one gateway. Every call is bounded by its timeout; `poll(0)` never
    blocks, so a Blender timer can drive it like the local client."""

    def __init__(
        self, connection: str | RemoteConnection, *, subscribe: bool = True, monitor_events: int = 0
    ):
        conn = decode_connection(connection) if isinstance(connection, str) else connection
        (host, shell_port), (events_host, events_port) = (
            _host_port(conn.shell),
            _host_port(conn.events),
        )
        if host != events_host:
            raise BackendError(ErrorCode.BAD_MESSAGE, "both gateway endpoints must share a host")
        self.connection = conn
        self.ctx = zmq.Context()
        # Default options of every socket of this context: the Client's sockets speak CURVE.
        self.ctx.setsockopt(zmq.CURVE_SERVERKEY, conn.server_key.encode("ascii"))
        self.ctx.setsockopt(zmq.CURVE_PUBLICKEY, conn.public_key.encode("ascii"))
        self.ctx.setsockopt(zmq.CURVE_SECRETKEY, conn.secret_key.encode("ascii"))
        info = protocol.ConnectionInfo(
            shell_port=shell_port,
            iopub_port=events_port,
            key=conn.signing_key,
            session="",
            pid=0,
            ip=host,
            engine="remote",
        )
        self.client = Client(
            info, context=self.ctx, subscribe=subscribe, monitor_events=monitor_events
        )

    @property
    def user(self) -> str:
        return self.connection.user

    # -- the requests the sidebar uses ---------------------------------------------------------

    def hello(self, timeout: float = 10.0) -> dict:
        return self.client.request("hello", {"client": "trellis2-blender"}, timeout=timeout)

    def ping(self, timeout: float = 5.0) -> dict:
        return self.client.request("ping", timeout=timeout)

    def status(self, timeout: float = 10.0) -> dict:
        return self.client.request("status", timeout=timeout)

    def generate(
        self,
        image: bytes,
        params: dict[str, Any] | None = None,
        filename: str = "image.png",
        min_vram_gb: int | None = None,
        timeout: float = 30.0,
    ) -> str:
        content: dict[str, Any] = {"params": params or {}, "filename": filename}
        if min_vram_gb is not None:
            content["min_vram_gb"] = min_vram_gb
        return self.client.request("generate", content, [image], timeout=timeout)["job_id"]

    def texture(
        self,
        image: bytes,
        mesh: bytes,
        mesh_format: str,
        params: dict[str, Any] | None = None,
        filename: str = "image.png",
        min_vram_gb: int | None = None,
        timeout: float = 60.0,
    ) -> str:
        content: dict[str, Any] = {
            "params": params or {},
            "filename": filename,
            "mesh_format": mesh_format,
        }
        if min_vram_gb is not None:
            content["min_vram_gb"] = min_vram_gb
        return self.client.request("texture", content, [image, mesh], timeout=timeout)["job_id"]

    def reexport(self, job_id: str, params: dict[str, Any], timeout: float = 10.0) -> str:
        content = {"job_id": job_id, "params": params}
        return self.client.request("reexport", content, timeout=timeout)["job_id"]

    def cancel(self, job_id: str, timeout: float = 10.0) -> dict:
        return self.client.request("cancel", {"job_id": job_id}, timeout=timeout)

    def jobs(self, limit: int = 50, timeout: float = 10.0) -> dict:
        return self.client.request("jobs", {"limit": limit}, timeout=timeout)

    def job(self, job_id: str, timeout: float = 10.0) -> dict:
        return self.client.request("job", {"job_id": job_id}, timeout=timeout)

    def stats(self, timeout: float = 10.0) -> dict:
        return self.client.request("stats", timeout=timeout)

    # -- events ----------------------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> list[protocol.Message]:
        return self.client.poll(timeout)

    def events(self, timeout: float = 1.0) -> Iterator[protocol.Message]:
        return self.client.events(timeout)

    def wait_for_job(
        self,
        job_id: str,
        timeout: float,
        on_event: Callable[[protocol.Message], None] | None = None,
    ) -> dict:
        return self.client.wait_for_job(job_id, timeout, on_event)

    # -- results ---------------------------------------------------------------------------------

    def fetch(
        self,
        job_id: str,
        name: str,
        offset: int,
        length: int = protocol.FETCH_DEFAULT,
        timeout: float = 30.0,
    ) -> tuple[dict, bytes]:
        """One chunk of one file of a job: (reply content, bytes)."""
        return self.client.fetch(job_id, name, offset, length, timeout)

    def download(
        self,
        job_id: str,
        name: str = "result.glb",
        chunk: int = protocol.FETCH_DEFAULT,
        timeout: float = 30.0,
        max_bytes: int = MAX_DOWNLOAD,
    ) -> bytes:
        """A job's file as bytes, in chunks of at most `chunk` bytes (each within `timeout`)."""
        return self.client.download(job_id, name, chunk, timeout, max_bytes)

    # -- life --------------------------------------------------------------------------------------

    def close(self) -> None:
        self.client.close()
        self.ctx.destroy(linger=0)

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
