"""Files in folders this process owns, handled so that no symbolic link is ever followed.

POSIX: a folder is an open directory handle. Every name below it is one path component, opened
relative to the handle with O_NOFOLLOW and checked with fstat (a folder or a regular file,
owned by this user), so a link planted anywhere below is refused, never followed. Folders are
made 0700 and files 0600 whatever the umask. Windows has no O_NOFOLLOW or directory handles
here: each name is checked with lstat (no link, no junction) just before it is used.

Only a tree's configured root (the output folder the user chose, the connection file's folder)
is opened by path and may be reached through links the user made.

Standard library only: the supervisor and the add-on use this too.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

FOLDER_MODE = 0o700
FILE_MODE = 0o600

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted as a file must not block an open
_BINARY = getattr(os, "O_BINARY", 0) | getattr(os, "O_NOINHERIT", 0)
# Directory handles: Linux and macOS; Windows falls back to lstat checks by path.
HANDLES = bool(_NOFOLLOW and _DIRECTORY) and os.open in os.supports_dir_fd
_OWNER = hasattr(os, "geteuid")

# Tests only: called as fault(operation, path) before every change to the disk; it may raise
# OSError (ENOSPC, EROFS) to emulate a full or read-only disk without root.
fault: Callable[[str, Path], None] | None = None


class UnsafePath(OSError):
    """A name that is a link, not the kind of file expected, or owned by another user."""

    def __init__(self, path: Path | str, why: str):
        super().__init__(errno.EPERM, f"refusing {why}", str(path))
        self.why = why


def _inject(operation: str, path: Path) -> None:
    if fault is not None:
        fault(operation, path)


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UnsafePath(name, "a name that is not one path component")


def is_link(st: os.stat_result) -> bool:
    if stat.S_ISLNK(st.st_mode):
        return True
    reparse = getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0)
    return bool(getattr(st, "st_file_attributes", 0) & reparse)  # Windows junctions


def _check(st: os.stat_result, path: Path, folder: bool, shared_ok: bool = False) -> None:
    if is_link(st):
        raise UnsafePath(path, "a symbolic link")
    if folder and not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(path, "something that is not a folder")
    if not folder and not stat.S_ISREG(st.st_mode):
        raise UnsafePath(path, "something that is not a regular file")
    # A shared sticky folder (/tmp) is fine as a root: others cannot touch our entries there.
    shared = shared_ok and st.st_mode & stat.S_ISVTX
    if _OWNER and st.st_uid != os.geteuid() and not shared:
        raise UnsafePath(path, f"a file owned by another user (uid {st.st_uid})")


def _tighten(fd: int, st: os.stat_result, exact: int | None = None, root: bool = False) -> None:
    """Strip group and other bits (or set `exact`) on something we own; best effort (a
    read-only disk or a FAT mount cannot change modes, which is no reason to fail). A root
    (a folder the user named, which may be shared) is only changed when others could write
    in it, and a sticky one (/tmp) never."""
    if not _OWNER or st.st_uid != os.geteuid() or st.st_mode & stat.S_ISVTX:
        return
    mode = stat.S_IMODE(st.st_mode)
    if root and not mode & 0o022:
        return
    want = exact if exact is not None else mode & 0o700
    if mode != want:
        try:
            os.fchmod(fd, want)
        except OSError:
            pass


def _links_refused(exc: OSError, path: Path, parent: Folder, name: str) -> OSError:
    """O_NOFOLLOW reports a link as ELOOP (EMLINK on BSD, ENOTDIR with O_DIRECTORY)."""
    if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
        st = parent.lstat(name)
        if st is not None and is_link(st):
            return UnsafePath(path, "a symbolic link")
    return exc


class Folder:
    """A folder this process owns: an open directory handle (POSIX) or a checked path."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self.fd = fd

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def root(cls, path: str | os.PathLike, create: bool = True) -> Folder:
        """The configured root of a tree. Missing folders are made 0700 (parents too)."""
        path = Path(os.fsdecode(path))
        if create:
            make_dirs(path)
        if not HANDLES:
            st = os.stat(path)
            _check(st, path, folder=True, shared_ok=True)
            return cls(path, None)
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        try:
            st = os.fstat(fd)
            _check(st, path, folder=True, shared_ok=True)
            _tighten(fd, st, root=True)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    @classmethod
    def at(cls, path: str | os.PathLike, create: bool = False) -> Folder:
        """A folder whose parent is a configured root and which is itself never a link (a
        job folder handed to an engine, the logs or state folder)."""
        path = Path(os.fsdecode(path))
        with cls.root(path.parent, create=create) as parent:
            return parent.sub(path.name, create=create, named=True)

    def sub(self, name: str, create: bool = False, named: bool = False) -> Folder:
        """A child folder (never a link), made 0700 when `create` and missing. An existing
        one loses group and other access; one the user `named` only when others can write in
        it (it may be shared on purpose)."""
        _check_name(name)
        path = self.path / name
        if create:
            try:
                self.mkdir(name)
            except FileExistsError:
                pass
        if not HANDLES:
            _check(os.lstat(path), path, folder=True)
            return Folder(path, None)
        try:
            fd = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            raise _links_refused(exc, path, self, name) from None
        try:
            st = os.fstat(fd)
            _check(st, path, folder=True)
            _tighten(fd, st, root=named)
        except BaseException:
            os.close(fd)
            raise
        return Folder(path, fd)

    def mkdir(self, name: str) -> None:
        """A new child folder, exactly 0700 (raises FileExistsError if the name is taken)."""
        _check_name(name)
        _inject("mkdir", self.path / name)
        if not HANDLES:
            os.mkdir(self.path / name, FOLDER_MODE)
            return
        os.mkdir(name, FOLDER_MODE, dir_fd=self.fd)
        fd = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
        try:
            _tighten(fd, os.fstat(fd), exact=FOLDER_MODE)  # the umask may have taken owner bits
        finally:
            os.close(fd)

    # -- files ------------------------------------------------------------------------------

    def _open(self, name: str, flags: int, mode: int = FILE_MODE) -> int:
        _check_name(name)
        path = self.path / name
        if not HANDLES:
            st = self.lstat(name)
            if st is not None and is_link(st):
                raise UnsafePath(path, "a symbolic link")
            return os.open(path, flags | _BINARY, mode)
        try:
            return os.open(name, flags | _NOFOLLOW | _CLOEXEC, mode, dir_fd=self.fd)
        except OSError as exc:
            raise _links_refused(exc, path, self, name) from None

    def read(self, name: str, limit: int | None = None) -> bytes:
        """A regular file's bytes (at most `limit`). FileNotFoundError if missing."""
        fd = self._open(name, os.O_RDONLY | _NONBLOCK)
        try:
            _check(os.fstat(fd), self.path / name, folder=False)
            chunks, left = [], limit if limit is not None else -1
            while left:
                chunk = os.read(fd, 1 << 20 if left < 0 else min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left = left - len(chunk) if left > 0 else left
            return b"".join(chunks)
        finally:
            os.close(fd)

    def read_tail(self, name: str, max_bytes: int) -> bytes:
        """The last `max_bytes` of a regular file."""
        fd = self._open(name, os.O_RDONLY | _NONBLOCK)
        try:
            st = os.fstat(fd)
            _check(st, self.path / name, folder=False)
            os.lseek(fd, max(0, st.st_size - max_bytes), os.SEEK_SET)
            return os.read(fd, max_bytes)
        finally:
            os.close(fd)

    def read_at(self, name: str, offset: int, length: int) -> tuple[bytes, int]:
        """(at most `length` bytes from `offset`, the file's size) of a regular file."""
        fd = self._open(name, os.O_RDONLY | _NONBLOCK)
        try:
            st = os.fstat(fd)
            _check(st, self.path / name, folder=False)
            if offset >= st.st_size:
                return b"", st.st_size
            os.lseek(fd, offset, os.SEEK_SET)
            chunks, left = [], min(length, st.st_size - offset)
            while left > 0:
                chunk = os.read(fd, left)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks), st.st_size
        finally:
            os.close(fd)

    def read_from(self, name: str, offset: int) -> tuple[bytes, os.stat_result]:
        """(the bytes from `offset` to the end, the file's stat before reading) of a regular
        file: a reader that follows an append-only file reads only what is new."""
        fd = self._open(name, os.O_RDONLY | _NONBLOCK)
        try:
            st = os.fstat(fd)
            _check(st, self.path / name, folder=False)
            os.lseek(fd, offset, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks), st
        finally:
            os.close(fd)

    def write(self, name: str, data: bytes) -> None:
        """Replace `name` atomically (a fresh 0600 temp file, fsync, rename): readers see the
        old file or the new one, and a link at `name` is replaced, never written through."""
        _check_name(name)
        _inject("write", self.path / name)
        tmp = f".{name[:80]}.{secrets.token_hex(4)}.tmp"
        fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            try:
                if _OWNER:
                    os.fchmod(fd, FILE_MODE)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            self.rename(tmp, name)
        except BaseException:
            self.remove(tmp)
            raise

    def append(self, name: str, data: bytes) -> None:
        """Append to a regular file of ours with one link (made 0600 if missing)."""
        _inject("append", self.path / name)
        fd = self._open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NONBLOCK)
        try:
            st = os.fstat(fd)
            _check(st, self.path / name, folder=False)
            if st.st_nlink > 1:  # a hard link would carry our writes elsewhere
                raise UnsafePath(self.path / name, "a file with more than one link")
            _tighten(fd, st, exact=FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def create(self, name: str) -> int:
        """A new, empty 0600 file opened for reading and appending; the caller owns the fd.
        FileExistsError if the name is taken (links included)."""
        _inject("create", self.path / name)
        fd = self._open(name, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL)
        if _OWNER:
            os.fchmod(fd, FILE_MODE)
        return fd

    def open_rw(self, name: str) -> int:
        """A regular 0600 file of ours with one link, opened for reading and writing (made if
        missing); the caller owns the fd."""
        _inject("open", self.path / name)
        fd = self._open(name, os.O_RDWR | os.O_CREAT | _NONBLOCK)
        try:
            st = os.fstat(fd)
            _check(st, self.path / name, folder=False)
            if st.st_nlink > 1:
                raise UnsafePath(self.path / name, "a file with more than one link")
            _tighten(fd, st, exact=FILE_MODE)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def fresh(self, name: str) -> None:
        """An empty regular 0600 file at `name`, whatever was there (a link is removed, never
        followed; a folder is refused)."""
        st = self.lstat(name)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UnsafePath(self.path / name, "a folder where a file belongs")
        if st is not None:
            self.remove(name)
        os.close(self.create(name))

    def remove(self, name: str) -> bool:
        """Unlink a name (a link itself, never its target). False if it was not there."""
        _check_name(name)
        _inject("remove", self.path / name)
        try:
            if HANDLES:
                os.unlink(name, dir_fd=self.fd)
            else:
                os.unlink(self.path / name)
        except FileNotFoundError:
            return False
        return True

    def rename(self, old: str, new: str) -> None:
        _check_name(old)
        _check_name(new)
        _inject("rename", self.path / new)
        if HANDLES:
            os.replace(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        else:
            os.replace(self.path / old, self.path / new)

    # -- listing ----------------------------------------------------------------------------

    def lstat(self, name: str) -> os.stat_result | None:
        """The name's own status (a link is reported as a link), None if missing."""
        try:
            if HANDLES:
                return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            return os.lstat(self.path / name)
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        return os.listdir(self.fd if HANDLES else self.path)  # listdir(fd) reads a duplicate

    def entries(self) -> list[tuple[str, os.stat_result]]:
        """(name, lstat) of every entry; entries that vanish meanwhile are left out."""
        out = []
        for name in self.names():
            st = self.lstat(name)
            if st is not None:
                out.append((name, st))
        return out

    def remove_tree(self, name: str) -> None:
        """Remove a child folder and everything in it; links inside are unlinked, never
        followed. A link at `name` itself is only unlinked."""
        st = self.lstat(name)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            self.remove(name)
            return
        with self.sub(name) as child:
            for entry, entry_st in child.entries():
                if stat.S_ISDIR(entry_st.st_mode):
                    child.remove_tree(entry)
                else:
                    child.remove(entry)
        _inject("remove", self.path / name)
        if HANDLES:
            os.rmdir(name, dir_fd=self.fd)
        else:
            os.rmdir(self.path / name)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass


def make_dirs(path: Path) -> None:
    """Make `path` and its missing parents, each exactly 0700 whatever the umask."""
    missing = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        _inject("mkdir", folder)
        try:
            os.mkdir(folder, FOLDER_MODE)
        except FileExistsError:
            continue
        if _OWNER:
            try:
                os.chmod(folder, FOLDER_MODE)  # the umask may have taken owner bits
            except OSError:
                pass


def read_file(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """One file of ours by path: neither the file nor its folder may be a link."""
    path = Path(os.fsdecode(path))
    with Folder.root(path.parent, create=False) as folder:
        return folder.read(path.name, limit)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Replace one file atomically (0600) in a folder made 0700 if missing."""
    path = Path(os.fsdecode(path))
    with Folder.root(path.parent, create=True) as folder:
        folder.write(path.name, data)
