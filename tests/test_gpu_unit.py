"""GPU hygiene without a GPU: allocator setup, error classification, cleanup, probe fallbacks."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from backend.pipeline import gpu

ROOT = Path(__file__).resolve().parents[1]


# Stand-ins with torch's class names, so classification is tested without torch installed.
class OutOfMemoryError(RuntimeError):
    pass


class AcceleratorError(RuntimeError):
    pass


DSA_FOOTER = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.\nFor debugging consider passing "
    "CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), "oom"),
        (RuntimeError("[CuMesh] CUDA error: out of memory at src/remesh.cu:88"), "oom"),
        (RuntimeError("CUDA error: out of memory" + DSA_FOOTER), "oom"),
        (AcceleratorError("CUDA error: out of memory" + DSA_FOOTER), "oom"),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), "oom"),
        (AcceleratorError("CUDA error: device-side assert triggered" + DSA_FOOTER), "poison"),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "poison"),
        (RuntimeError("CUDA error: unspecified launch failure"), "poison"),
        (RuntimeError("[CuMesh] CUDA error: invalid configuration argument"), "poison"),
        (RuntimeError("CUDA error: misaligned address"), "poison"),
        (RuntimeError("CUDA error: an illegal instruction was encountered"), "poison"),
        (RuntimeError("CUDA error: unknown error"), "poison"),
        (
            RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"),
            "poison",
        ),
        (RuntimeError("cudaErrorLaunchFailure"), "poison"),
        (AcceleratorError("CUDA error: something new"), "poison"),
        (
            RuntimeError("CUDA error: no kernel image is available for execution on the device"),
            None,
        ),
        (RuntimeError("boom"), None),
        (ValueError("resolution must be 512"), None),
        (MemoryError(), None),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"),
            None,
        ),
        (KeyError("shape_slat"), None),
    ],
)
def test_classify_error_without_torch(exc, expected):
    assert gpu.classify_error(exc) == expected


def test_boilerplate_footer_alone_is_not_poison():
    # torch appends "device-side assertions" to every CUDA error; that must not decide.
    assert gpu.classify_error(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED" + DSA_FOOTER)) == "oom"


def test_classify_follows_cause_chain_and_prefers_poison():
    try:
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as inner:
            raise ValueError("decode failed") from inner
    except ValueError as outer:
        assert gpu.classify_error(outer) == "poison"
    try:
        try:
            raise OutOfMemoryError("CUDA out of memory")
        except RuntimeError:
            raise RuntimeError("stage texture failed") from None
    except RuntimeError as wrapped:
        # `from None` hides the context from the user, but __context__ still holds it
        assert gpu.classify_error(wrapped) == "oom"


def test_classify_real_torch_classes():
    torch = pytest.importorskip("torch")
    assert gpu.classify_error(torch.cuda.OutOfMemoryError("x")) == "oom"
    assert gpu.classify_error(torch.OutOfMemoryError("x")) == "oom"
    if hasattr(torch, "AcceleratorError"):
        err = torch.AcceleratorError("CUDA error: device-side assert triggered")
        assert gpu.classify_error(err) == "poison"


def _fresh(code: str, env: dict[str, str]) -> str:
    full = {k: v for k, v in os.environ.items() if "ALLOC_CONF" not in k}
    full.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


CONFIGURE = (
    "import os, sys; from backend.pipeline import gpu; r = gpu.configure_allocator(); "
    "print(r, 'torch' in sys.modules, os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), "
    "os.environ.get('PYTORCH_ALLOC_CONF'))"
)


def test_configure_allocator_sets_expandable_segments_and_keeps_user_options():
    assert _fresh(CONFIGURE, {}) == "True False expandable_segments:True None"
    out = _fresh(CONFIGURE, {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"})
    assert out == "True False max_split_size_mb:128,expandable_segments:True None"
    # the newer variable takes precedence in torch >= 2.9, so it is updated too when set
    out = _fresh(CONFIGURE, {"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.8"})
    assert out.endswith("garbage_collection_threshold:0.8,expandable_segments:True")
    # an explicit user choice is respected
    out = _fresh(CONFIGURE, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"})
    assert out == "False False expandable_segments:False None"


def test_configure_allocator_is_a_no_op_after_torch_import():
    pytest.importorskip("torch")
    code = "import torch; " + CONFIGURE
    assert _fresh(code, {}) == "False True None None"


def test_importing_gpu_does_not_import_torch():
    code = (
        "import sys; from backend.pipeline import gpu; gpu.vram(); gpu.cleanup(); "
        "print('torch' in sys.modules)"
    )
    assert _fresh(code, {}) == "False"


def test_without_torch_loaded_figures_are_none_and_probe_says_no_gpu():
    code = (
        "from backend.pipeline import gpu; print(gpu.vram(), gpu.loaded_torch(), gpu.cuda_ready(), "
        "gpu.probe_health(0.5))"
    )
    assert _fresh(code, {}) == "None None False {'ok': True, 'gpu': False}"


class _Engine:
    name = "fake"

    def __init__(self, fail: bool = False):
        self.released = 0
        self.fail = fail

    def release_gpu(self):
        self.released += 1
        if self.fail:
            raise RuntimeError("release failed")


def test_cleanup_calls_engine_hook_and_survives_its_errors(caplog):
    ok = _Engine()
    gpu.cleanup(ok)
    assert ok.released == 1
    bad = _Engine(fail=True)
    gpu.cleanup(bad)  # must not raise
    assert bad.released == 1
    assert "failed to release the GPU" in caplog.text


class _Payload:
    pass


def test_cleanup_clears_frames_that_pin_objects():
    def failing(holder):
        payload = _Payload()  # stands for a GPU tensor held by the failing stage's frame
        holder.append(weakref.ref(payload))
        raise RuntimeError("CUDA out of memory")

    holder: list = []
    tb = None
    try:
        failing(holder)
    except RuntimeError as exc:
        tb = exc.__traceback__
    gc.collect()
    assert holder[0]() is not None  # the kept traceback pins the frame and its payload
    gpu.cleanup(tb=tb)
    gc.collect()
    assert holder[0]() is None


def test_cleanup_drops_sys_last_exception():
    sys.last_value = RuntimeError("x")
    sys.last_traceback = None
    gpu.cleanup()
    assert not hasattr(sys, "last_value")
    assert not hasattr(sys, "last_traceback")


def test_cleanup_on_cpu_torch_returns_none():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert gpu.cleanup(_Engine()) is None
    assert gpu.vram() is None
    assert gpu.probe_health(0.5) == {"ok": True, "gpu": False}
    with pytest.raises(RuntimeError):
        gpu.set_memory_cap(16 << 30)


def test_probe_reports_a_hung_gpu_and_never_starts_a_second_thread(monkeypatch):
    import threading

    release = threading.Event()
    started = []

    def hang(self, torch):
        started.append(1)
        release.wait(10)
        self._result = {"ok": True, "gpu": True, "ms": 1.0}

    probe = gpu.HealthProbe()
    monkeypatch.setattr(gpu, "_cuda", lambda init: object())
    monkeypatch.setattr(gpu.HealthProbe, "_work", hang)
    first = probe.probe(timeout=0.1)
    assert first["ok"] is False and first["reason"] == "timeout"
    second = probe.probe(timeout=0.1)
    assert second["ok"] is False and second["reason"] == "timeout"
    assert "previous probe" in second["detail"]
    assert len(started) == 1
    release.set()
    probe._thread.join(5)
    assert probe.probe(timeout=2.0) == {"ok": True, "gpu": True, "ms": 1.0}
    assert len(started) == 2


def test_probe_reports_errors_with_their_kind(monkeypatch):
    class _Cuda:
        @staticmethod
        def Stream():  # noqa: N802 - mirrors torch.cuda.Stream
            raise AcceleratorError("CUDA error: device-side assert triggered")

    class _Torch:
        cuda = _Cuda

    monkeypatch.setattr(gpu, "_cuda", lambda init: _Torch)
    result = gpu.HealthProbe().probe(timeout=2.0)
    assert result["ok"] is False and result["reason"] == "error"
    assert result["kind"] == "poison"
    assert "device-side assert" in result["detail"]


def test_poisoned_exit_code_is_distinct():
    code = "from backend.pipeline import gpu; gpu.exit_poisoned('test')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == gpu.POISONED_EXIT_CODE == 75
