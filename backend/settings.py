"""Every setting and name that more than one module uses, each defined once: queue depths,
exit codes, time limits, the recovery count, free-disk thresholds, job state names,
environment variables and the extension root.

Standard library only and importing nothing of the backend, so the add-on's side (client,
supervisor) and the heavy side (server, runner) can both use it. Request parameters (presets,
limits on what a job may ask for) are `params.py`'s; this module holds how the software runs.
"""

from __future__ import annotations

from pathlib import Path

# -- where things are ------------------------------------------------------------------------

# The folder that holds `backend/`: the extension root (and a backend's working directory).
EXTENSION_ROOT = Path(__file__).resolve().parent.parent

# -- environment variables -------------------------------------------------------------------

ENV_OUTPUT_DIR = "TRELLIS2_OUTPUT_DIR"  # default job folder
ENV_WEIGHTS = "TRELLIS2_WEIGHTS"  # TRELLIS.2 weights folder
ENV_DINOV3 = "TRELLIS2_DINOV3"  # DINOv3 image encoder folder
ENV_REMBG = "TRELLIS2_REMBG"  # background-removal model folder
ENV_CHECKOUT = "TRELLIS2_CHECKOUT"  # a TRELLIS.2 source checkout
# Set by a supervisor on the backend it spawns after one went: JSON {pid, why, log_path} of
# the backend before it (backend/backendlogs.py), for the jobs that backend left running.
ENV_PREDECESSOR = "TRELLIS2_PREDECESSOR"
ENGINE_ENV = {  # engine option -> the environment variable that supplies it
    "weights_dir": ENV_WEIGHTS,
    "dinov3_path": ENV_DINOV3,
    "rembg_path": ENV_REMBG,
    "trellis_checkout": ENV_CHECKOUT,
}

# -- queues ----------------------------------------------------------------------------------

QUEUE_DEPTH = 8  # jobs waiting in one backend before `busy`
GATEWAY_QUEUE_DEPTH = 32  # jobs waiting for a studio worker before `busy`
MAX_CONCURRENT = 1  # jobs at once (GPU engines: one); above 1 each runs in a job process

# -- disk ------------------------------------------------------------------------------------

MIN_FREE_DISK = 1 << 30  # bytes free before a job is accepted and before it runs
MIN_FREE_DISK_MB = MIN_FREE_DISK / 2**20  # the same, as the command lines take it
# doctor warns below twice that: room for a few jobs' GLBs, textures and latents
DOCTOR_FREE_DISK = 2 * MIN_FREE_DISK

# -- jobs ------------------------------------------------------------------------------------

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
TERMINAL_STATES = frozenset({"done", "failed", "cancelled"})  # never change again
TERMINAL_EVENTS = ("job_done", "job_failed", "job_cancelled")  # one per job, its last
# A job whose backend died or was poisoned while running it runs once more, then fails.
MAX_RECOVERIES = 1

# -- exit codes of `python -m backend serve` ---------------------------------------------------

EXIT_OK = 0  # stopped on request, by a signal, or because its parent exited
EXIT_START_FAILED = 1
EXIT_LOCKED = 73  # another process owns the output folder (EX_CANTCREAT)
EXIT_POISONED = 75  # the CUDA context broke: respawn (EX_TEMPFAIL)

# -- time (seconds) --------------------------------------------------------------------------

HEARTBEAT_INTERVAL = 1.0  # backend heartbeat events
HEARTBEAT_TIMEOUT = 5.0  # silence before the supervisor respawns a backend
BUSY_HEARTBEAT_TIMEOUT = 300.0  # ... while a job runs (native calls may hold the GIL)
GPU_HEALTH_INTERVAL = 5.0  # the backend probes its GPU this often (off the control loop)
STATUS_INTERVAL = 5.0  # the supervisor asks a ready backend for `status` this often
SHUTDOWN_GRACE = 30.0  # after `shutdown`, a running job may take this long to a checkpoint
TERMINATE_WAIT = 10.0  # the supervisor's wait between SIGTERM and SIGKILL
# after SIGTERM or SIGINT: shorter than TERMINATE_WAIT, so a backend whose job hangs (the
# supervisor's watchdog sends SIGTERM) still exits by itself, and that job counts as died
SIGNAL_GRACE = TERMINATE_WAIT / 2
ACTIVATE_TIMEOUT = 10.0  # a warm standby's answer to `activate`
DOCTOR_TIMEOUT = 180.0  # `doctor` run as a child process for the protocol's request
OFFLINE_CANCEL_TIMEOUT = 30.0  # `python -m backend cancel`, run by a supervisor with no backend
# The reader process (backend/server/reader.py) answers `jobs`, `job` and `stats`.
READER_TIMEOUT = 20.0  # an answer later than this: the reader is replaced, the request answered
# ... sooner, under the clients' 5 s timeout, when it is not working on it: stopped, or its CPU
# time has not moved for this long while a request waits (Linux; elsewhere READER_TIMEOUT).
READER_STALL = 2.5
READER_MAX_INFLIGHT = 64  # requests handed to it at once; more are answered in-process
# Requests it answers at once. 2 let a `job` poll pass a long search, but on 2 cores with a
# client listing non-stop they put ping p99 at 4.0-4.6 ms against 1.6-1.8 ms with 1 (three
# alternating runs each; why was not established).
READER_THREADS = 1
# Its niceness (POSIX; below normal priority on Windows): the control loop, the client and the
# jobs get the CPU first. On 2 cores with a client listing non-stop, ping p99 ~4 ms at 0 and
# ~1.5 ms at 10 (docs/PERFORMANCE.md); the listing is slower only when the CPU is contended.
READER_NICE = 10
# A job process's niceness (POSIX; below normal priority on Windows), for a backend running
# several CPU jobs at once: the control loop, its clients (Blender) and the reader get the CPU
# first, the jobs all that is left (all of it when nothing else wants it).
JOB_PROCESS_NICE = 10
# A cancelled job in a job process that has not ended this long after its cancel (its process
# SIGSTOPped, or stuck in native code) is stopped with its process and ends cancelled: until
# then its slot runs nothing. A healthy job ends by itself well within it (at a checkpoint,
# cleaning up its own files): the preview engine's longest stretch between checkpoints is its
# export, ~0.34 s (docs/PERFORMANCE.md), some times that at JOB_PROCESS_NICE on a busy
# machine. Stopping one that was merely slow costs only its process's restart. The same 5 s
# as SIGNAL_GRACE, the time a job gets to reach a checkpoint after a signal.
JOB_PROCESS_CANCEL_GRACE = 5.0
READER_CHECK_INTERVAL = 0.05  # how often the loop looks whether it died or hangs
READER_START_TIMEOUT = 30.0  # a reader that has not said it is up by then is replaced
READER_YOUNG = 10.0  # a reader that ended sooner died young: the next starts after a pause
READER_MIN_PAUSE = 0.5  # ... of this, doubling after each young death, up to
READER_MAX_PAUSE = 30.0
# A request whose buffers are larger is checked (signature included) on the intake lane, not
# on the control loop: hashing 64 MiB takes ~30 ms at 2 GB/s, which on the loop would hold up
# every client, and off it lets go of the GIL (unsigned floods of large messages included).
LOOP_VERIFY_BYTES = 256 << 10
GIL_SWITCH_INTERVAL = 0.0005  # `serve`: how long a busy thread may keep the loop waiting
PNG_ENCODE_CHUNK = 16_384  # `serve`: bytes Pillow encodes per GIL hold (its default 65,536)
