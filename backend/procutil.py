"""Process helpers that work on Linux, macOS and Windows (no psutil needed)."""

from __future__ import annotations

import os
import subprocess
import sys

# Popen's creationflags for a child below normal priority (Windows; 0 elsewhere, where the
# child lowers its own with `lower_own_priority`).
BELOW_NORMAL = getattr(subprocess, "BELOW_NORMAL_PRIORITY_CLASS", 0)


def lower_own_priority(niceness: int) -> None:
    """Raise this process's niceness by `niceness` (POSIX; on Windows the parent started it
    with BELOW_NORMAL). A refusal is ignored: the process still works, at normal priority."""
    if hasattr(os, "nice"):
        try:
            os.nice(niceness)
        except OSError:
            pass


def stop_child(proc: subprocess.Popen, wait: float) -> bool:
    """End a child that exits when its stdin closes (the reader, a job process): close it,
    give it `wait` seconds, then kill it. False when it had still not exited after that."""
    try:
        proc.stdin.close()
    except (OSError, AttributeError):
        pass
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            return False
    return True


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists (a zombie counts as gone on POSIX)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _win_pid_alive(pid)
    try:
        os.kill(pid, 0)  # signal 0 checks existence; never use this on Windows (it kills)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    return _proc_state(pid) == "Z"


def is_stopped(pid: int) -> bool:
    """True while the process is stopped (SIGSTOP, a debugger): it handles no signal but
    SIGKILL until it is continued. Linux only (/proc); False elsewhere."""
    return _proc_state(pid) in ("T", "t")


def cpu_seconds(pid: int) -> float | None:
    """The CPU time (user + system) a process has used so far; None where it cannot be read
    (no /proc: not Linux; or the process is gone)."""
    fields = _proc_fields(pid)
    if len(fields) < 13:
        return None
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):
        return None


def _proc_state(pid: int) -> str:
    fields = _proc_fields(pid)
    return fields[0] if fields else ""


def _proc_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command's name (state first), or []."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _win_pid_alive(pid: int) -> bool:
    import ctypes

    process_query_limited_information = 0x1000
    still_active = 259
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return False
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)
