"""Job files (results, thumbnails, inputs) brought to this machine through the protocol's
`fetch`, chunk by chunk from the timer tick, into a private cache folder. Plain Python (no bpy).

The add-on never opens a path the backend names: a local backend and a studio gateway are
read the same way, as bytes. Each download sends one `fetch` at a time (a `client.Pending`);
the tick writes the chunk that came and asks for the next, so a 30 MB GLB costs a few dozen
short ticks and Blender never waits. Files land in `<cache>/<backend key>/<job id>/<name>`
(folders 0700, files 0600, written through `safefs` so no link is followed); a file is only
given its name once it is whole, so what the cache holds is always complete.

The cache is bounded (`limit`, 2 GiB by default): after each whole result, the jobs whose
files were used least recently are removed until it fits. An imported model lives in the
.blend (the glTF importer packs its images), so only a later Import from the history has to
download it again.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..backend.errors import BackendError, ErrorCode
from ..backend.safefs import Folder
from ..backend.wire.client import MAX_DOWNLOAD, Pending, check_chunk
from ..backend.wire.protocol import FETCH_DEFAULT, FILE_NAME, JOB_ID

log = logging.getLogger("trellis2_blender")

PARALLEL = 4  # downloads with a request in flight at once (thumbnails of a history page)
RETRIES = 5  # a chunk whose backend went away (a respawn, a gateway restart) is asked again
FETCH_TIMEOUT = 30.0  # one chunk (4 MiB at most) over a studio network
CACHE_LIMIT = 2 << 30  # bytes the download cache may hold (GLBs are 20-100 MB each)
_PRUNE_AFTER = 1 << 20  # only a download this large makes the cache check its size

Send = Callable[[dict], Pending | None]  # sends a `fetch`; None while no backend answers
Done = Callable[["Download"], None]


@dataclass
class Download:
    """One file of one job on its way here. `path` is set once it is whole; `error` if not."""

    job_id: str
    name: str
    offset: int = 0
    size: int | None = None
    request: Pending | None = None
    path: str = ""
    error: BackendError | None = None
    retries: int = 0
    then: list[Done] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.path) or self.error is not None

    @property
    def fraction(self) -> float:
        return self.offset / self.size if self.size else 0.0


class Downloads:
    """Every download of one backend (one cache folder). `tick(send)` moves them on."""

    def __init__(
        self,
        folder: Path,
        chunk: int = FETCH_DEFAULT,
        max_bytes: int = MAX_DOWNLOAD,
        guard: Callable[[str, Callable[[], object]], object] | None = None,
        limit: int = CACHE_LIMIT,
    ):
        self.folder = Path(folder)
        self.limit = limit
        # Runs each `then` so that one that raises is reported and the others still run.
        self.guard = guard or (lambda where, fn: fn())
        self.chunk = chunk
        self.max_bytes = max_bytes
        self.active: dict[tuple[str, str], Download] = {}
        self.known: dict[tuple[str, str], str] = {}  # whole files here: (job, name) -> path

    def cached(self, job_id: str, name: str) -> str:
        """The local file if it was downloaded in this session (memory only: for drawing)."""
        return self.known.get((job_id, name), "")

    def get(self, job_id: str, name: str, then: Done | None = None) -> Download:
        """Start (or join) the download of a job's file; `then(download)` runs from the tick
        when it is whole or has failed (at once when it is here already)."""
        key = (job_id, name)
        download = self.active.get(key)
        if download is None:
            download = Download(job_id, name)
            path = self._on_disk(job_id, name)
            if path:
                download.path = path
                try:  # used now: the cache's pruning goes by when a job's files were used
                    os.utime(path)
                except OSError:
                    pass
            elif not JOB_ID.match(job_id) or not FILE_NAME.match(name):
                download.error = BackendError(ErrorCode.NOT_FOUND, f"no file {name!r}")
            else:
                self.active[key] = download
        if then is not None:
            if download.done:
                self.guard(f"using {name}", lambda: then(download))
            else:
                download.then.append(then)
        return download

    def _on_disk(self, job_id: str, name: str) -> str:
        """A whole file left by an earlier session (results never change once written)."""
        key = (job_id, name)
        if key in self.known:
            return self.known[key]
        path = self.folder / job_id / name
        if os.path.isfile(path) and not os.path.islink(path):
            self.known[key] = str(path)
            return str(path)
        return ""

    def tick(self, send: Send) -> bool:
        """Write the chunks that came, ask for the next ones. Never waits. True if anything
        moved (the panel redraws)."""
        moved = False
        in_flight = sum(1 for d in self.active.values() if d.request is not None)
        for key, download in list(self.active.items()):
            if download.request is not None and download.request.done:
                moved = True
                self._take(download)
                in_flight -= 1
            if download.done:
                del self.active[key]
                self._finish(download)
                continue
            if download.request is None and in_flight < PARALLEL:
                content = {
                    "job_id": download.job_id,
                    "name": download.name,
                    "offset": download.offset,
                    "length": self.chunk,
                }
                download.request = send(content)
                in_flight += download.request is not None
        return moved

    def _take(self, download: Download) -> None:
        pending, download.request = download.request, None
        if not pending.ok:
            gone = pending.error.code is ErrorCode.BACKEND_DIED
            if gone and download.retries < RETRIES:
                download.retries += 1  # the next tick asks again, once a backend answers
                return
            download.error = pending.error
            return
        reply = pending.reply
        try:
            data = pending.buffers[0] if len(pending.buffers) == 1 else None
            if (
                data is None
                or len(data) != reply.get("length")
                or reply.get("offset") != (download.offset)
            ):
                raise BackendError(ErrorCode.BAD_MESSAGE, "a fetch reply without its chunk")
            download.size = check_chunk(reply, data, download.name, download.size, self.max_bytes)
            self._write(download, data)
            download.offset += len(data)
            if reply.get("eof"):
                if download.offset != download.size:
                    raise BackendError(
                        ErrorCode.INTERNAL,
                        f"{download.name}: got {download.offset} of {download.size} bytes",
                    )
                download.path = self._complete(download)
        except BackendError as exc:
            download.error = exc
        except OSError as exc:  # the cache folder: full disk, removed, ...
            download.error = BackendError(
                ErrorCode.OUTPUT_UNWRITABLE,
                f"cannot write the download to {self.folder}: {exc.strerror or exc}",
                "Free some disk space (the add-on keeps downloads in its user folder).",
            )

    def _part(self, download: Download) -> str:
        return f".{download.name}.part"

    def _write(self, download: Download, data: bytes) -> None:
        with Folder.root(self.folder) as root, root.sub(download.job_id, create=True) as job:
            part = self._part(download)
            if download.offset == 0:
                job.fresh(part)
            fd = job.open_rw(part)
            try:
                os.lseek(fd, download.offset, os.SEEK_SET)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)

    def _complete(self, download: Download) -> str:
        with Folder.root(self.folder) as root, root.sub(download.job_id, create=True) as job:
            if download.size == 0:
                job.fresh(self._part(download))
            job.rename(self._part(download), download.name)
        path = str(self.folder / download.job_id / download.name)
        self.known[(download.job_id, download.name)] = path
        if (download.size or 0) >= _PRUNE_AFTER:
            self.prune(keep={download.job_id})
        return path

    def prune(self, keep: set[str] | frozenset[str] = frozenset()) -> int:
        """Remove the least recently used jobs' files until the cache holds at most `limit`
        bytes; never a job in `keep` or one with a download under way. Returns the bytes
        freed. A cache that cannot be read or changed is left as it is (logged)."""
        busy = {d.job_id for d in self.active.values()} | set(keep)
        try:
            with Folder.root(self.folder) as root:
                jobs = []
                for name, st in root.entries():
                    if not (JOB_ID.match(name) and stat.S_ISDIR(st.st_mode)):
                        continue
                    with root.sub(name) as job:
                        files = [f for _n, f in job.entries() if stat.S_ISREG(f.st_mode)]
                    used = max((f.st_mtime for f in files), default=st.st_mtime)
                    jobs.append((used, name, sum(f.st_size for f in files)))
                total = sum(size for _u, _n, size in jobs)
                freed = 0
                for _used, name, size in sorted(jobs):
                    if total - freed <= self.limit:
                        break
                    if name in busy:
                        continue
                    root.remove_tree(name)
                    freed += size
                    for key in [k for k in self.known if k[0] == name]:
                        del self.known[key]
                return freed
        except OSError as exc:
            log.warning("cannot tidy the download cache %s: %s", self.folder, exc)
            return 0

    def _finish(self, download: Download) -> None:
        if download.error is not None:
            log.warning(
                "download of %s/%s failed: %s",
                download.job_id,
                download.name,
                download.error.message,
            )
        waiting, download.then = download.then, []
        for then in waiting:
            self.guard(f"using the download of {download.name}", lambda f=then: f(download))

    def fail_all(self, error: BackendError) -> None:
        """The backend went away for good (another backend chosen): nothing more will come."""
        for download in list(self.active.values()):
            download.error, download.request = error, None
            self._finish(download)
        self.active.clear()
