"""Keys of the studio gateway: its CURVE key pair and signing key, the authorized-keys folder
of artists, and the connection string an artist pastes into Blender (docs/SCALE.md).

Key pairs come from libzmq (`zmq.curve_keypair`) and certificate files are read and written
by `zmq.auth`; this module only decides where they live and who may read them. The gateway's
home folder:

    HOME/                 0700
      server.key          the gateway's public certificate
      server.key_secret   its secret certificate (0600)
      signing.key         the HMAC key of the message envelope (0600)
      authorized/         one public certificate per artist: NAME.key
      gateway.json        written by a running gateway: its endpoints and pid

An artist's secret key is never stored on the server: `add_user` prints it once, inside the
connection string.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq
import zmq.auth

from ..errors import BackendError, ErrorCode
from ..safefs import write_file

CONNECTION_PREFIX = "trellis2-remote-1:"  # the version is part of the prefix
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
SERVER_CERT = "server"
SIGNING_KEY = "signing.key"
AUTHORIZED = "authorized"
GATEWAY_INFO = "gateway.json"


@dataclass(frozen=True)
class RemoteConnection:
    """What an artist's machine needs to reach the gateway (all keys as text)."""

    shell: str  # tcp://HOST:PORT of the request socket
    events: str  # tcp://HOST:PORT of the event socket
    server_key: str  # the gateway's public key (z85)
    public_key: str  # the artist's public key (z85)
    secret_key: str  # the artist's secret key (z85): the string is a credential
    signing_key: str  # the envelope's HMAC key (hex)
    user: str = ""

    def encode(self) -> str:
        data = json.dumps(asdict(self), separators=(",", ":")).encode("utf-8")
        return CONNECTION_PREFIX + base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")

    def with_endpoints(self, shell: str, events: str) -> RemoteConnection:
        """The same credentials through other addresses (a tunnel, a NAT, a test proxy)."""
        return RemoteConnection(**{**asdict(self), "shell": shell, "events": events})


def decode_connection(text: str) -> RemoteConnection:
    """Parse a connection string; a typed error says what is wrong with it."""
    text = (text or "").strip()
    if not text.startswith(CONNECTION_PREFIX):
        raise BackendError(
            ErrorCode.BAD_MESSAGE,
            "this is not a TRELLIS.2 server connection string",
            f"Paste the whole string the studio admin gave you; it starts with {CONNECTION_PREFIX}",
        )
    body = text[len(CONNECTION_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        data = json.loads(raw.decode("utf-8"))
        connection = RemoteConnection(**data)
    except (ValueError, TypeError) as exc:
        raise BackendError(
            ErrorCode.BAD_MESSAGE,
            f"the connection string is damaged: {exc}",
            "Copy it again, in one piece.",
        ) from None
    for name in ("server_key", "public_key", "secret_key"):
        if len(getattr(connection, name)) != 40:  # z85 of 32 bytes
            raise BackendError(ErrorCode.BAD_MESSAGE, f"the connection string's {name} is bad")
    for endpoint in (connection.shell, connection.events):
        if not re.match(r"^tcp://[^:/]+:\d{1,5}$", endpoint):
            raise BackendError(ErrorCode.BAD_MESSAGE, f"bad endpoint {endpoint!r}")
    return connection


def events_endpoint(shell: str) -> str:
    """The event socket listens on the request socket's port + 1 (documented)."""
    host, _, port = shell.rpartition(":")
    return f"{host}:{int(port) + 1}"


# -- the gateway's home ---------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayKeys:
    public: bytes
    secret: bytes
    signing_key: str


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def ensure_home(home: str | Path) -> GatewayKeys:
    """Create the gateway's keys once (idempotent) and return them."""
    home = _private_dir(Path(home))
    _private_dir(home / AUTHORIZED)
    public_file = home / f"{SERVER_CERT}.key"
    secret_file = home / f"{SERVER_CERT}.key_secret"
    if not secret_file.exists():
        # zmq.auth writes with the process umask; the 0700 folder keeps others out meanwhile.
        zmq.auth.create_certificates(str(home), SERVER_CERT)
        os.chmod(secret_file, 0o600)
        os.chmod(public_file, 0o644)
    signing = home / SIGNING_KEY
    if not signing.exists():
        from .protocol import new_key

        write_file(signing, new_key().encode("ascii"))
    public, secret = zmq.auth.load_certificate(str(secret_file))
    if secret is None:
        raise BackendError(ErrorCode.INTERNAL, f"{secret_file} holds no secret key")
    return GatewayKeys(public, secret, signing.read_text(encoding="ascii").strip())


def authorized_dir(home: str | Path) -> Path:
    return Path(home) / AUTHORIZED


def _check_name(name: str) -> str:
    if not USER_NAME.match(name or ""):
        raise BackendError(
            ErrorCode.BAD_PARAMS,
            f"bad user name {name!r}",
            "Use letters, digits, '.', '_' or '-' (up to 64), starting with a letter or digit.",
        )
    return name


def add_user(home: str | Path, name: str, shell: str, events: str | None = None) -> str:
    """Authorize a new artist key and return the artist's connection string."""
    _check_name(name)
    keys = ensure_home(home)
    target = authorized_dir(home) / f"{name}.key"
    if target.exists():
        raise BackendError(
            ErrorCode.BAD_PARAMS,
            f"user {name!r} already exists",
            "Remove the user first (remove-user) to issue a new key.",
        )
    scratch = Path(tempfile.mkdtemp(prefix=".new-user-", dir=home))
    try:
        public_file, secret_file = zmq.auth.create_certificates(str(scratch), name)
        public, secret = zmq.auth.load_certificate(secret_file)
        os.chmod(public_file, 0o644)
        os.replace(public_file, target)  # the folder the authenticator reads: whole file or none
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    connection = RemoteConnection(
        shell=shell,
        events=events or events_endpoint(shell),
        server_key=keys.public.decode("ascii"),
        public_key=public.decode("ascii"),
        secret_key=(secret or b"").decode("ascii"),
        signing_key=keys.signing_key,
        user=name,
    )
    return connection.encode()


def remove_user(home: str | Path, name: str) -> None:
    path = authorized_dir(home) / f"{_check_name(name)}.key"
    try:
        path.unlink()
    except FileNotFoundError:
        raise BackendError(ErrorCode.NOT_FOUND, f"no user {name!r}") from None


def authorized_users(home: str | Path) -> dict[str, str]:
    """{public key (z85 text): user name} for every certificate in the authorized folder."""
    users: dict[str, str] = {}
    for path in sorted(authorized_dir(home).glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError):
            continue  # a half-edited or foreign file authorizes nobody
        users[public.decode("ascii")] = path.stem
    return users


def folder_stamp(home: str | Path) -> tuple:
    """Changes whenever a certificate is added, removed or replaced (cheap to poll)."""
    folder = authorized_dir(home)
    try:
        return tuple(
            sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*.key"))
        )
    except OSError:
        return ()


def write_gateway_info(home: str | Path, info: dict) -> None:
    write_file(Path(home) / GATEWAY_INFO, json.dumps(info, indent=2).encode())


def read_gateway_info(home: str | Path) -> dict | None:
    try:
        return json.loads((Path(home) / GATEWAY_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
