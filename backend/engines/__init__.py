"""The engines and their registry (a registered name or an import path `package.module:Class`).
`base` is the Engine interface `pipeline/` runs; `preview` is the CPU engine, `trellis2` the real
one with what only it needs (`upstream`, `weights`, `attention`, `sparse_attention`,
`upstream_fixes`); `surface` is the texture helpers both use before writing a GLB."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import BackendError, ErrorCode
from .base import Engine

# Built-in engines by import path, so that importing the registry imports no engine.
_REGISTRY: dict[str, str] = {
    "preview": "backend.engines.preview:PreviewEngine",
    "trellis2": "backend.engines.trellis2:Trellis2Engine",
}


def register(name: str, target: str | type[Engine]) -> None:
    """Register an engine class (or its import path) under a name. Tests use this too."""
    _REGISTRY[name] = target  # type: ignore[assignment]


def available() -> list[str]:
    return sorted(_REGISTRY)


def resolve(spec: str) -> type[Engine]:
    """Turn `preview` or `pkg.mod:Class` into an Engine class; typed error if impossible."""
    target: Any = _REGISTRY.get(spec, spec)
    if isinstance(target, type):
        return target
    if ":" not in target:
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"unknown engine {spec!r}",
            f"Use one of {', '.join(available())} or an import path like pkg.module:Class.",
        )
    module_name, _, attr = target.partition(":")
    if module_name.startswith("backend."):
        module_name = __name__.rsplit(".", 1)[0] + module_name[len("backend") :]
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise BackendError(
            ErrorCode.ENGINE_UNAVAILABLE,
            f"cannot load engine {spec!r}: {exc}",
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise BackendError(ErrorCode.ENGINE_UNAVAILABLE, f"{spec!r} is not an Engine class")
    return cls


def create(spec: str, **options: Any) -> Engine:
    return resolve(spec)(**options)


def load_error(exc: BaseException) -> BackendError:
    """What an engine that did not load reports: its own typed error, else
    `engine_unavailable` naming the exception (in the backend and in a job process alike)."""
    if isinstance(exc, BackendError):
        return exc
    return BackendError(ErrorCode.ENGINE_UNAVAILABLE, f"{type(exc).__name__}: {exc}")
