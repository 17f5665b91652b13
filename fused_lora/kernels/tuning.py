"""Per-problem choices — a kernel configuration, or an implementation — timed once on the device and
remembered in memory and on disk.

    table = Choices("gemm")
    name = table.pick(key, ["128x256x64 w8 s3", ...], bench=lambda name: (lambda: run(name)))

Why not ``triton.autotune``: its Autotuner keeps the current call's arguments on the shared object
(``self.nargs``) and zeroes accumulation buffers through hooks that read them, so two threads launching
at once can zero each other's buffer; and it would time configurations inside a CUDA graph capture.
Here nothing about a call is stored on shared state: the caller owns its buffers (a K-split shrink gets
a zeroed output from the call that launches it), a lock serialises the timing, and the first use of a
key inside a graph capture takes the documented default (``candidates[0]``) without timing or caching.

Rules, in order:
  - a choice forced by :func:`force` (tests) or ``FUSED_LORA_AUTOTUNE=0`` (always the default);
  - a cached choice (memory, then the disk file for this GPU, torch, triton and kernel source);
  - on a CPU tensor (the interpreter) or during CUDA graph capture: the default, not cached;
  - otherwise each candidate is timed (``triton.testing.do_bench``, median), the fastest is cached.
The disk cache lives in ``$FUSED_LORA_CACHE_DIR`` (default ``~/.cache/fused_lora``); set
``FUSED_LORA_CACHE_DIR=off`` to keep choices in memory only.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import math
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

_LOCK = threading.RLock()
_FORCED: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("fused_lora_forced", default={})  # noqa: B039
_TIMINGS: dict[tuple, dict[str, float]] = {}  # (table, key) -> {candidate: ms}, for reports and tests


@contextlib.contextmanager
def force(table: str, choice: str) -> Iterator[None]:
    """Within the block (this thread / task), table `table` picks `choice` wherever it is a candidate."""
    token = _FORCED.set({**_FORCED.get(), table: choice})
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced(table: str) -> str | None:
    """The choice :func:`force` set for `table` in this thread / task, or None."""
    return _FORCED.get().get(table)


_ON, _OFF = ("", "1", "true", "on", "yes"), ("0", "false", "off", "no")


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_label(device: torch.device) -> str:
    """What a timing is valid for: the GPU model (one process may drive different models), else the
    device type."""
    if device.type != "cuda":
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


def autotune_enabled() -> bool:
    """``FUSED_LORA_AUTOTUNE``: 1 / true / on / yes (default) or 0 / false / off / no, any case."""
    value = os.environ.get("FUSED_LORA_AUTOTUNE", "1").strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(
            f"FUSED_LORA_AUTOTUNE must be one of 1, true, on, yes, 0, false, off, no (any case), "
            f"got {os.environ['FUSED_LORA_AUTOTUNE']!r}"
        )
    return value in _ON


class Choices:
    """One table of choices (e.g. the GEMM's configurations), keyed by problem."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._memory: dict[tuple, str] = {}

    def pick(
        self,
        key: tuple,
        candidates: Sequence[str],
        bench: Callable[[str], Callable[[], object]] | None,
        device: torch.device,
    ) -> str:
        """The candidate for `key`: forced, cached, default, or the fastest of `candidates` timed with
        `bench(name)` (a function that runs the candidate once on the real inputs)."""
        if not candidates:
            raise ValueError(f"{self.name}: no candidate for {key}")
        forced = _FORCED.get().get(self.name)
        if forced is not None and forced in candidates:
            return forced
        if len(candidates) == 1 or not autotune_enabled():
            return candidates[0]
        full_key = (device_label(device), *key, tuple(candidates))  # a choice belongs to one GPU model
        hit = self._memory.get(full_key)
        if hit is not None:
            return hit
        if not can_time(device):  # the interpreter: nothing to measure
            return candidates[0]
        with _LOCK:
            hit = self._memory.get(full_key) or _disk().get(self.name, full_key)
            if hit in candidates:
                self._memory[full_key] = hit
                return hit
            if bench is None or capturing(device):
                return candidates[0]  # the documented default, neither timed nor cached
            times = {c: measure(bench(c)) for c in candidates}
            best = min(candidates, key=lambda c: times[c])
            _TIMINGS[(self.name, full_key)] = times
            self._memory[full_key] = best
            _disk().put(self.name, full_key, best)
            return best

    def clear(self) -> None:
        self._memory.clear()


def can_time(device: torch.device) -> bool:
    """Timing needs a real GPU (the interpreter's timings would mean nothing)."""
    return device.type == "cuda"


def capturing(device: torch.device) -> bool:
    """True inside a CUDA graph capture on the current stream (nothing may be timed or synchronised)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def measure(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn() (warm-up call first); inf for a candidate that cannot run here."""
    from triton.testing import do_bench

    try:
        fn()  # compile outside the timing
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    except Exception as e:  # a configuration that cannot run here (e.g. out of shared memory) loses
        if "out of resource" in str(e).lower() or type(e).__name__ == "OutOfResources":
            return math.inf
        raise


class _DiskCache:
    """choices-<scope hash>.json: {"scope": ..., "choices": {"table|key": choice}}; re-read and merged
    before every write, under an advisory lock (choices-<hash>.lock), so processes sharing the directory
    keep each other's choices; written to a temporary file and renamed, so a reader never sees half."""

    def __init__(self, directory: Path | None, scope: str) -> None:
        self.path = directory / f"choices-{hashlib.sha1(scope.encode()).hexdigest()[:16]}.json" if directory else None
        self.scope = scope
        self.entries: dict[str, str] | None = None

    def _read(self) -> dict[str, str]:
        """The file's choices; {} for a missing, unreadable (any OSError: permissions, a name too long),
        corrupt or foreign file, or one whose JSON is not the shape written here."""
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("scope") != self.scope:
            return {}
        choices = data.get("choices")
        if not isinstance(choices, dict):
            return {}
        return {k: v for k, v in choices.items() if isinstance(k, str) and isinstance(v, str)}

    def get(self, table: str, key: tuple) -> str | None:
        if self.entries is None:
            self.entries = self._read()
        return self.entries.get(f"{table}|{key!r}")

    def put(self, table: str, key: tuple, choice: str) -> None:
        new = {f"{table}|{key!r}": choice}
        if self.path is None:
            self.entries = {**(self.entries or {}), **new}
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_suffix(".lock")):  # read, merge and replace as one step
                self.entries = {**self._read(), **(self.entries or {}), **new}
                tmp = self.path.with_suffix(f".{socket.gethostname()}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"scope": self.scope, "choices": self.entries}, indent=0))
                tmp.replace(self.path)
        except OSError:  # a read-only home: keep the choice in memory
            self.entries = {**(self.entries or {}), **new}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An advisory lock between processes sharing the cache directory (best effort: where flock does not
    exist or fails, e.g. some network file systems, the merge still happens, only unserialised)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a") as f:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


_DISK: _DiskCache | None = None


def _disk() -> _DiskCache:
    global _DISK
    if _DISK is None:
        _DISK = _DiskCache(cache_dir(), _scope())
    return _DISK


def cache_dir() -> Path | None:
    """``$FUSED_LORA_CACHE_DIR`` (``~`` expanded, made absolute so a later chdir does not move it), or
    ``~/.cache/fused_lora``; None (memory only) for off / 0 / none, or when there is no home to expand."""
    value = os.environ.get("FUSED_LORA_CACHE_DIR", "").strip()
    if value.lower() in ("off", "0", "none"):
        return None
    try:
        return Path(value).expanduser().absolute() if value else Path.home() / ".cache" / "fused_lora"
    except RuntimeError:  # no home directory to expand ~ to
        return None


def _scope() -> str:
    """What a cached choice depends on: the GPU, the versions, and the kernels' source."""
    import triton

    src = hashlib.sha1()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        src.update(f.read_bytes())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{gpu}|torch {torch.__version__}|triton {triton.__version__}|src {src.hexdigest()[:16]}"


def reset_caches() -> None:
    """Forget every choice in memory and re-read the disk cache location (tests)."""
    global _DISK
    with _LOCK:
        _DISK = None
        _TIMINGS.clear()
        for table in list(_TABLES.values()):
            table.clear()


_TABLES: dict[str, Choices] = {}


def table(name: str) -> Choices:
    """The process-wide table `name` (created on first use)."""
    with _LOCK:
        if name not in _TABLES:
            _TABLES[name] = Choices(name)
        return _TABLES[name]


def timings() -> dict[tuple, dict[str, float]]:
    """What was timed so far: {(table, key): {candidate: median ms}}."""
    return dict(_TIMINGS)
