"""A studio gateway as the controller sees it: the supervisor's face (state, tick, requests
as `Pending`s) over `backend.wire.remote.RemoteBackend`, with no process to start. Plain Python.

Nothing here waits. Start opens the CURVE sockets (ZeroMQ connects in the background) and
sends `hello`; the tick polls the sockets, reads the socket monitor (a key the gateway
refuses shows up there, since such a connection never gets an answer) and asks `status`
every few seconds for the status line. A gateway that stops answering after it did once
makes the link `starting` again (jobs wait; ZeroMQ reconnects by itself); one that never
answered, refused the key or a connection string that cannot be read makes it `dead` with
the reason and its fix. The connection string holds a secret key: it is never logged or
shown, only the gateway's address and the user name are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..backend.errors import BackendError, ErrorCode
from ..backend.wire.client import Pending

log = logging.getLogger("trellis2_blender")

HELLO_TIMEOUT = 10.0  # the first answer (a CURVE handshake over a studio network)
STATUS_EVERY = 2.0  # seconds between `status` requests (workers, queue) while connected
STATUS_TIMEOUT = 5.0
LOCAL_ONLY = ("doctor", "shutdown", "activate", "delete_jobs")  # the gateway refuses these


def describe(connection: str) -> str:
    """`user@host:port` of a connection string, for labels (never the keys); "" if unreadable."""
    from ..backend.wire.curvekeys import decode_connection

    try:
        conn = decode_connection(connection)
    except BackendError:
        return ""
    return f"{conn.user or '?'}@{conn.shell.removeprefix('tcp://')}"


class RemoteLink:
    """One studio gateway, driven by the controller's tick."""

    def __init__(self, connection: str, clock: Callable[[], float] = time.monotonic):
        self._connection = connection  # a credential: not in repr, logs or labels
        self.clock = clock
        self.state = "stopped"
        self.state_reason = ""
        self.last_error: BackendError | None = None
        self.stopping = False
        self.session: str | None = None
        self.where = describe(connection) or "the studio server"
        self.remote: Any = None  # backend.wire.remote.RemoteBackend while started
        self._monitor: Any = None
        self._hello: Pending | None = None
        self._status: Pending | None = None
        self._next_status = 0.0
        self._answered = False  # the gateway answered once on this connection
        self.last_status: dict[str, Any] = {}
        self.engine: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"RemoteLink({self.where!r}, {self.state})"

    # -- life -------------------------------------------------------------------------------

    def start(self) -> None:
        self._close()
        self.last_error, self._answered = None, False
        try:
            import zmq

            from ..backend.wire.remote import RemoteBackend

            # A refused key shows only in the handshake: watch it from the first connect.
            events = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            self.remote = RemoteBackend(self._connection, monitor_events=events)
        except BackendError as exc:
            self._dead(exc)
            return
        except Exception as exc:  # zmq refusing a key, a bad address: say so, never raise
            self._dead(
                BackendError(
                    ErrorCode.BAD_MESSAGE,
                    f"cannot use this connection string: {exc}",
                    "Paste the whole string the studio admin gave you.",
                )
            )
            return
        self._monitor = self.remote.client.monitor
        self.state, self.state_reason = "starting", f"connecting to {self.where}"
        self._hello = self.remote.client.request_async(
            "hello", {"client": "trellis2-blender"}, timeout=HELLO_TIMEOUT
        )

    def restart(self, reason: str = "user") -> None:
        self.start()  # a new connection: a fresh handshake, a new hello

    def begin_stop(self, timeout: float | None = None) -> None:
        self.stop(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Close the sockets (nothing runs here: the jobs stay on the server)."""
        self._close()
        self.state, self.state_reason = "stopped", ""

    def _close(self) -> None:
        self._monitor = None  # the client's: closed with it
        if self.remote is not None:
            self.remote.close()  # fails every request still waiting
            self.remote = None
        self._hello = self._status = None

    def _dead(self, error: BackendError) -> None:
        self._close()
        self.last_error = error
        self.state, self.state_reason = "dead", error.message
        log.warning("connecting to %s: %s", self.where, error.message)

    # -- requests -----------------------------------------------------------------------------

    def request_nowait(
        self,
        msg_type: str,
        content: dict[str, Any] | None = None,
        buffers: tuple[bytes, ...] | list[bytes] = (),
        timeout: float = 5.0,
    ) -> Pending:
        if msg_type in LOCAL_ONLY:
            return Pending.failed(
                msg_type,
                BackendError(
                    ErrorCode.UNKNOWN_REQUEST,
                    f"{msg_type} is not available on a studio server",
                    "Only the server's admin can do this.",
                ),
            )
        if self.remote is None or self.state not in ("ready", "busy", "starting"):
            return Pending.failed(
                msg_type,
                BackendError(ErrorCode.BACKEND_DIED, f"not connected to {self.where}"),
            )
        return self.remote.client.request_async(msg_type, content, buffers, timeout)

    def cancel_nowait(self, job_id: str) -> Pending:
        return self.request_nowait("cancel", {"job_id": job_id})

    # -- the tick -------------------------------------------------------------------------------

    def tick(self) -> list[Any]:
        """Everything that came (events, late replies); moves the connection's state on."""
        if self.remote is None:
            return []
        if self._refused():
            return []
        messages = self.remote.poll(0)
        now = self.clock()
        hello = self._hello
        if hello is not None and hello.done:
            self._hello = None
            if hello.ok:
                self._connected(hello.reply)
            elif not self._answered:
                self._dead(self._no_answer(hello.error))
                return messages
        status = self._status
        if status is not None and status.done:
            self._status = None
            if status.ok:
                self.last_status = status.reply
                # A restarted gateway is a new session: the controller checks its jobs again.
                self.session = status.reply.get("session") or self.session
                self.engine = dict(status.reply.get("engine") or self.engine)
                if self.state == "starting":  # it answers again after a gap
                    self.state, self.state_reason = "ready", ""
            elif self._answered and self.state in ("ready", "busy"):
                self.state = "starting"
                self.state_reason = f"{self.where} stopped answering; waiting for it"
        if self._answered and self._status is None and now >= self._next_status:
            self._next_status = now + STATUS_EVERY
            self._status = self.remote.client.request_async("status", timeout=STATUS_TIMEOUT)
        return messages

    def _connected(self, reply: dict[str, Any]) -> None:
        self._answered = True
        self.session = reply.get("session") or self.session
        self.engine = dict(reply.get("engine") or {})
        self.state, self.state_reason = "ready", ""
        self._next_status = 0.0

    def _refused(self) -> bool:
        """The gateway refused our key during the handshake (its ZAP handler)."""
        if self._monitor is None:
            return False
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        try:
            event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError:
            return False
        if event.get("event") == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._dead(
                BackendError(
                    ErrorCode.BAD_SIGNATURE,
                    f"{self.where} refused this connection string's key",
                    "Ask the studio admin for a new connection string (the key may have "
                    "been removed).",
                )
            )
            return True
        self._dead(
            BackendError(
                ErrorCode.BAD_SIGNATURE,
                f"the secure handshake with {self.where} failed",
                "The connection string may belong to another server: ask the admin for a new one.",
            )
        )
        return True

    def _no_answer(self, error: BackendError | None) -> BackendError:
        why = error.message if error is not None else "no answer"
        return BackendError(
            ErrorCode.BACKEND_DIED,
            f"no answer from {self.where} ({why})",
            "Check that the studio server runs and that this computer can reach it; then "
            "press Start to try again.",
        )

    # -- what the panel shows --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.state_reason,
            "pid": None,
            "session": self.session,
            "restarts": 0,
            "log_path": None,
            "backend": dict(self.last_status),
            "remote": {
                "where": self.where,
                "user": self.last_status.get("user"),
                "workers": len(self.last_status.get("workers") or []),
                "queue": len(self.last_status.get("queue") or []),
            },
            "last_error": self.last_error.to_dict() if self.last_error else None,
        }
