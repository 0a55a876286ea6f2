"""Adaptive start: a per-GPU memory profile learned from past attempts, kept on disk.

Each attempt is recorded under the parameters that decide its memory (engine plus the
effective resolution, token budget, input size, texture size, remesh, guidance and decimation
target). The key is the *effective* parameters, not the ladder level: level 5 of a 1024 request
and level 0 of a 512 request run the same thing and share what was learned. The level is kept
in each entry for people reading the file.

Prediction for one set of parameters, given the bytes available now (`free`):
  * fits  - a complete success peaked at or below free * margin, or succeeded with no more
            memory available than now;
  * fails - an OOM happened with at least this much available, or the known peak is above
            free * margin;
  * unknown otherwise (optimistic: worth trying).
When observations disagree, the most recent decisive one wins (drivers, other programs and the
engine change). Memory only drops down the ladder, so a level predicted to fail also rules out
every better level. The start is the best useful level after the last predicted failure.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..params import GenerationParams
from ..safefs import Folder
from . import ladder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MEMORY_KNOBS = (
    "resolution",
    "max_num_tokens",
    "image_size",
    "texture_size",
    "remesh",
    "remesh_band",
    "guidance",
    "decimation_target",
)
MAX_OBSERVATIONS = 8  # per key; older ones are dropped
MAX_KEYS = 400  # per GPU; the least recently used keys are dropped
MAX_STAGE_OOMS = 200  # per GPU


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def memory_values(params: GenerationParams) -> dict[str, Any]:
    """The parameters that decide memory. The token budget only bites in the 1536 cascade
    (only that cascade reads it), so below 1536 it is left out (0) and cannot split records."""
    values = {k: getattr(params, k) for k in MEMORY_KNOBS}
    if params.resolution < 1536:
        values["max_num_tokens"] = 0
    return values


def memory_key(engine: str, params: GenerationParams) -> str:
    parts = [engine]
    for knob, value in memory_values(params).items():
        parts.append(f"{knob}={int(value) if isinstance(value, bool) else value}")
    return "|".join(parts)


class MemoryProfile:
    """Peak VRAM per engine and effective parameters on one GPU, persisted as JSON.

    One file may hold several GPUs (sections by `gpu_key`); saving rewrites only this GPU's
    section and replaces the file atomically. A corrupt or unreadable file starts an empty
    profile with a warning: the profile is an optimisation and never stops a job."""

    def __init__(self, path: str | Path, gpu_key: str, clock=time.time):
        self.path = Path(path)
        self.gpu_key = gpu_key
        self.clock = clock
        self._lock = threading.Lock()
        section = self._read_all().get(gpu_key, {})
        self._entries: dict[str, dict[str, Any]] = section.get("entries", {})
        # OOMs that also rule out other parameters agreeing on the failed stage's inputs
        self._stage_ooms: list[dict[str, Any]] = section.get("stage_ooms", [])
        # High-resolution tokens per structure voxel by cascade tier (memmodel.py), as seen
        # on this GPU's jobs: the memory prediction's estimate before the shape counts them
        self._tokens_per_voxel: dict[str, float] = section.get("tokens_per_voxel", {})

    # -- persistence -------------------------------------------------------------------

    def _read_all(self) -> dict[str, dict[str, Any]]:
        """{gpu_key: {"entries": {...}, "stage_ooms": [...]}} from disk; bad parts dropped."""
        try:
            with Folder.at(self.path.parent) as folder:  # never through a link
                raw = json.loads(folder.read(self.path.name).decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("memory profile %s unreadable (%s); starting empty", self.path, exc)
            return {}
        gpus = raw.get("gpus") if isinstance(raw, dict) else None
        if not isinstance(gpus, dict) or raw.get("version") != FORMAT_VERSION:
            log.warning("memory profile %s has an unknown format; starting empty", self.path)
            return {}
        clean: dict[str, dict[str, Any]] = {}
        for gpu, section in gpus.items():
            if not isinstance(section, dict):
                continue
            entries = section.get("entries")
            ooms = section.get("stage_ooms")
            ratios = section.get("tokens_per_voxel")
            clean[gpu] = {
                "entries": {k: v for k, v in entries.items() if self._valid_entry(v)}
                if isinstance(entries, dict)
                else {},
                "stage_ooms": [o for o in ooms if self._valid_stage_oom(o)]
                if isinstance(ooms, list)
                else [],
                "tokens_per_voxel": {
                    k: float(v)
                    for k, v in ratios.items()
                    if k.isdigit() and isinstance(v, (int, float)) and 0 < v < 1e4
                }
                if isinstance(ratios, dict)
                else {},
            }
        return clean

    @staticmethod
    def _valid_stage_oom(item: Any) -> bool:
        return (
            isinstance(item, dict)
            and isinstance(item.get("engine"), str)
            and isinstance(item.get("knobs"), dict)
            and isinstance(item.get("free"), (int, float))
            and isinstance(item.get("ts"), (int, float))
        )

    @staticmethod
    def _valid_entry(entry: Any) -> bool:
        if not isinstance(entry, dict) or not isinstance(entry.get("obs"), list):
            return False
        for ob in entry["obs"]:
            if not (
                isinstance(ob, dict)
                and isinstance(ob.get("ok"), bool)
                and isinstance(ob.get("free"), (int, float))
                and (ob.get("peak") is None or isinstance(ob.get("peak"), (int, float)))
            ):
                return False
        return True

    def save(self) -> None:
        """Write this GPU's section, keeping other GPUs' sections as they are on disk."""
        with self._lock:
            data = self._read_all()
            data[self.gpu_key] = {
                "entries": self._entries,
                "stage_ooms": self._stage_ooms,
                "tokens_per_voxel": self._tokens_per_voxel,
            }
            payload = json.dumps({"version": FORMAT_VERSION, "gpus": data}, indent=1)
            with Folder.at(self.path.parent, create=True) as folder:
                folder.write(self.path.name, payload.encode("utf-8"))

    # -- learning ----------------------------------------------------------------------

    def tokens_per_voxel(self) -> dict[int, float]:
        with self._lock:
            return {int(k): v for k, v in self._tokens_per_voxel.items()}

    def learn_tokens_per_voxel(self, tier: int, ratio: float) -> None:
        """Keep what a job's shape counted, so the next job (also after a respawn) predicts
        its memory from this GPU's objects rather than the defaults."""
        if not (ratio > 0):
            return
        with self._lock:
            self._tokens_per_voxel[str(int(tier))] = round(float(ratio), 4)
        self.save()

    def record(
        self,
        engine: str,
        level: int,
        params: GenerationParams,
        peak_bytes: int | None,
        free_before: int | None,
        ok: bool,
        partial: bool = False,
        depends_on: Iterable[str] | None = None,
        save: bool = True,
    ) -> None:
        """Record one attempt at `params` (the effective parameters of `level`).

        `free_before`: bytes available when the attempt began (compare like with like: pass the
        same figure that `choose_start_level` gets). `ok=False` means it ran out of memory.
        `partial=True`: a resumed attempt whose earlier stages were kept, so its peak covers
        only the later stages; it cannot vouch for the whole run and is kept as a note only.
        `depends_on` (for an OOM): the knobs read by the failed stage and every stage before it.
        Any parameters agreeing on those knobs run the same failing stage on the same inputs, so
        the OOM predicts their failure too (e.g. "remesh off" cannot help a structure OOM)."""
        if free_before is None or free_before <= 0:
            return  # no VRAM figures (CPU run): nothing to learn
        key = memory_key(engine, params)
        with self._lock:
            entry = self._entries.pop(key, None) or {
                "engine": engine,
                "params": memory_values(params),
                "levels": [],
                "obs": [],
            }
            if level not in entry["levels"]:
                entry["levels"] = sorted([*entry["levels"], int(level)])
            entry["obs"].append(
                {
                    "ok": bool(ok),
                    "peak": int(peak_bytes) if peak_bytes is not None else None,
                    "free": int(free_before),
                    "partial": bool(partial),
                    "ts": round(self.clock(), 3),
                }
            )
            entry["obs"] = entry["obs"][-MAX_OBSERVATIONS:]
            self._entries[key] = entry  # re-inserted last: dict order is recency
            if not ok and depends_on:
                values = memory_values(params)
                knobs = {k: values[k] for k in sorted(set(depends_on)) if k in values}
                self._stage_ooms.append(
                    {
                        "engine": engine,
                        "knobs": knobs,
                        "free": int(free_before),
                        "ts": round(self.clock(), 3),
                    }
                )
                self._stage_ooms = self._stage_ooms[-MAX_STAGE_OOMS:]
            while len(self._entries) > MAX_KEYS:
                self._entries.pop(next(iter(self._entries)))
        if save:
            try:
                self.save()
            except OSError as exc:
                log.warning("cannot save memory profile %s: %s", self.path, exc)

    # -- prediction --------------------------------------------------------------------

    def predict(
        self, engine: str, params: GenerationParams, free_bytes: int, margin: float = 0.9
    ) -> tuple[str, str]:
        """('fits' | 'fails' | 'unknown', why) for running `params` with `free_bytes`."""
        entry = self._entries.get(memory_key(engine, params)) or {"obs": []}
        budget = free_bytes * margin
        verdict, why, decided_at = "unknown", "no record", float("-inf")
        peaks = [
            ob["peak"]
            for ob in entry["obs"]
            if ob["ok"] and not ob.get("partial") and ob["peak"] is not None
        ]
        for ob in entry["obs"]:  # oldest first: the last decisive observation wins
            if ob["ok"] and not ob.get("partial"):
                if (ob["peak"] is not None and ob["peak"] <= budget) or ob["free"] <= free_bytes:
                    verdict, decided_at = "fits", ob.get("ts", 0.0)
                    why = (
                        f"peaked at {_gib(ob['peak'])}"
                        if ob["peak"] is not None
                        else f"succeeded with {_gib(ob['free'])} available"
                    )
            elif not ob["ok"] and ob["free"] >= free_bytes:
                verdict, decided_at = "fails", ob.get("ts", 0.0)
                why = f"ran out of memory with {_gib(ob['free'])} available"
        values = memory_values(params)
        for oom in self._stage_ooms:
            if (
                oom["engine"] == engine
                and oom["free"] >= free_bytes
                and oom["ts"] > decided_at
                and all(values.get(k) == v for k, v in oom["knobs"].items())
                and not self._passed_since(oom)
            ):
                verdict, decided_at = "fails", oom["ts"]
                why = (
                    f"a stage these settings share ran out of memory with "
                    f"{_gib(oom['free'])} available"
                )
        if verdict == "unknown" and peaks and max(peaks) > budget:
            verdict, why = "fails", f"peaks at {_gib(max(peaks))}"
        return verdict, why

    def _passed_since(self, oom: dict[str, Any]) -> bool:
        """A complete run after a stage OOM, with the same knobs that stage reads and no more
        memory: the stage fits now, for every level that shares those knobs (not only the
        parameters that ran)."""
        for entry in self._entries.values():
            if entry.get("engine") != oom["engine"]:
                continue
            if not all(entry["params"].get(k) == v for k, v in oom["knobs"].items()):
                continue
            if any(
                ob["ok"]
                and not ob.get("partial")
                and ob["ts"] > oom["ts"]
                and ob["free"] <= oom["free"]
                for ob in entry["obs"]
            ):
                return True
        return False

    def choose_start_level(
        self,
        engine: str,
        request: GenerationParams,
        capabilities: Iterable[str],
        free_bytes: int,
        margin: float = 0.9,
    ) -> tuple[int, str]:
        """The best useful ladder level predicted to fit `free_bytes` (see the module doc),
        with a short reason. Wrong predictions cost little: the runner walks on down."""
        levels = ladder.useful_levels(request, capabilities)
        verdicts = [
            (level, *self.predict(engine, ladder.params_at(request, level), free_bytes, margin))
            for level in levels
        ]
        failed = [i for i, (_, verdict, _) in enumerate(verdicts) if verdict == "fails"]
        avail = f"{_gib(free_bytes)} available"
        if not failed:
            level, verdict, why = verdicts[0]
            if verdict == "fits":
                return level, f"as requested: {why} before, {avail}"
            return level, f"as requested: no memory record yet, {avail}"
        last_fail = failed[-1]
        fail_level, _, fail_why = verdicts[last_fail]
        if last_fail + 1 >= len(verdicts):
            level = verdicts[-1][0]
            return level, (
                f"every level predicted not to fit ({avail}); trying the lowest, level {level}"
            )
        level, verdict, why = verdicts[last_fail + 1]
        detail = why if verdict == "fits" else "no record"
        return level, (
            f"level {fail_level} ({ladder.describe(fail_level)}) {fail_why}, "
            f"{avail} now; level {level} ({ladder.describe(level)}): {detail}"
        )

    # -- inspection --------------------------------------------------------------------

    def entries(self) -> dict[str, dict[str, Any]]:
        """A copy of this GPU's entries (for `doctor` and tests)."""
        with self._lock:
            return json.loads(json.dumps(self._entries))

    def stage_ooms(self) -> list[dict[str, Any]]:
        with self._lock:
            return json.loads(json.dumps(self._stage_ooms))

    def summary(self) -> list[dict[str, Any]]:
        """One row per key: engine, parameters, levels seen, max complete peak, OOM count."""
        rows = []
        for entry in self.entries().values():
            peaks = [
                o["peak"]
                for o in entry["obs"]
                if o["ok"] and not o.get("partial") and o["peak"] is not None
            ]
            rows.append(
                {
                    "engine": entry.get("engine"),
                    "params": entry.get("params"),
                    "levels": entry.get("levels"),
                    "peak_max": max(peaks) if peaks else None,
                    "ooms": sum(1 for o in entry["obs"] if not o["ok"]),
                    "runs": len(entry["obs"]),
                }
            )
        return rows
