"""`zeropass index --profile`: seconds per phase and per layer, beside each GEMM phase's arithmetic floor.

The build and its kernels mark their phases with ``with phase("vector GEMMs", flops=...):``. When
no profile is running, ``phase`` returns one shared do-nothing context (an attribute test and a
call), so the hooks cost nothing in a normal build. While one runs, time is *exclusive*: entering
a phase pauses the phase around it, so the phases' seconds add up to the run's wall time (what
no phase claims is reported as ``other``). Only the thread that started the profile is accounted
that way; a phase entered on another thread (the circuit workers, the background Parquet writer)
is reported apart, in thread seconds that overlapped the main thread's.

The floor of a GEMM phase is its FLOPs over this machine's GEMM rate for that dtype, measured in
the same run on the shapes the indexer uses (``measure_rates``), so ``seconds / floor`` says how
far the phase is from its arithmetic.

    >>> with profiling(True) as prof:                  # doctest: +SKIP
    ...     with phase("vector GEMMs", flops=2e9, dtype="fp32"):
    ...         ...
    >>> print(prof.report())                           # doctest: +SKIP
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Optional

# Report order; a phase not listed here is reported after these, in the order first seen.
PHASES = (
    "load/dequantise", "canonicalise and fold", "vector GEMMs", "top-k selection", "vector tables",
    "circuit factors", "circuit basis and layout", "screening", "exact rescoring", "head metrics",
    "head tables", "parquet writes", "by-token sort", "commit",
)
OTHER = "other"


class _Off:
    """The context ``phase`` returns when no profile runs."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_OFF = _Off()


class Profile:
    """Exclusive seconds per (phase, layer), FLOPs per phase, and the GEMM rates of this machine."""

    def __init__(self):
        self.thread = threading.get_ident()
        self._lock = threading.Lock()  # flops and overlapped are added to from two threads
        self.seconds: dict[tuple[str, object], float] = {}
        # Process CPU seconds (every thread's) while each phase ran: on a machine shared with other
        # jobs, wall seconds stretch with their load and CPU seconds much less.
        self.cpu: dict[str, float] = {}
        self.overlapped: dict[str, float] = {}  # phases run on other threads (seconds of theirs)
        self.flops: dict[str, float] = {}
        self.dtype: dict[str, str] = {}
        self.rates: dict[str, float] = {}
        self.layer: object = None  # the layer the build is on (None: model-wide work)
        self._stack: list[str] = [OTHER]
        self._since = time.perf_counter()
        self._cpu_since = time.process_time()
        self.t0 = self._since
        self.wall: Optional[float] = None

    def _charge(self, now: float) -> None:
        key = (self._stack[-1], self.layer)
        self.seconds[key] = self.seconds.get(key, 0.0) + now - self._since
        self._since = now
        cpu = time.process_time()
        self.cpu[key[0]] = self.cpu.get(key[0], 0.0) + cpu - self._cpu_since
        self._cpu_since = cpu

    @contextmanager
    def phase(self, name: str, flops: float = 0.0, dtype: Optional[str] = None):
        if flops:
            self.add_flops(name, flops, dtype or "fp32")
        if threading.get_ident() != self.thread:
            t = time.perf_counter()
            try:
                yield self
            finally:
                self.add_overlapped(name, time.perf_counter() - t)
            return
        self._charge(time.perf_counter())
        self._stack.append(name)
        try:
            yield self
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()

    def add_overlapped(self, name: str, seconds: float) -> None:
        """Seconds of a phase run beside the main thread (another thread's, or a worker process's)."""
        with self._lock:
            self.overlapped[name] = self.overlapped.get(name, 0.0) + seconds

    def add_flops(self, name: str, flops: float, dtype: str) -> None:
        with self._lock:
            self.flops[name] = self.flops.get(name, 0.0) + flops
            self.dtype[name] = dtype

    def stop(self) -> None:
        now = time.perf_counter()
        self._charge(now)
        self.wall = now - self.t0

    def by_phase(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (name, _layer), s in self.seconds.items():
            out[name] = out.get(name, 0.0) + s
        return out

    def floor(self, name: str) -> Optional[float]:
        """Seconds the phase's FLOPs take at the measured rate of its dtype (None: no GEMM)."""
        rate = self.rates.get(self.dtype.get(name, ""))
        return self.flops[name] / rate if name in self.flops and rate else None

    def report(self) -> str:
        """The phase table, then seconds per layer and phase (stderr text, fixed-width)."""
        wall = self.wall if self.wall is not None else time.perf_counter() - self.t0
        totals = self.by_phase()
        names = [p for p in PHASES if p in totals] + [p for p in totals if p not in PHASES and p != OTHER]
        names += [OTHER] if OTHER in totals else []
        lines = [f"profile: {wall:.2f} s wall; GEMM rates measured in this run: "
                 + ", ".join(f"{d} {r / 1e9:.0f} GFLOP/s" for d, r in sorted(self.rates.items())),
                 f"{'phase':<30} {'seconds':>8} {'share':>6} {'CPU s':>8} {'GFLOP':>8} {'floor s':>8} {'s/floor':>8}"]
        for name in names:
            s, fl = totals[name], self.floor(name)
            gf = f"{self.flops[name] / 1e9:.0f}" if name in self.flops else ""
            lines.append(f"{name:<30} {s:8.2f} {s / wall:6.1%} {self.cpu.get(name, 0.0):8.2f} {gf:>8} "
                         + (f"{fl:8.2f} {s / fl:8.1f}" if fl else f"{'':>8} {'':>8}"))
        lines.append(f"{'sum':<30} {sum(totals.values()):8.2f} {sum(totals.values()) / wall:6.1%} "
                     f"{sum(self.cpu.values()):8.2f}")
        if self.overlapped:
            # The circuits run on worker threads (two at once) beside the main thread: their
            # seconds are summed over the workers and overlap the table above.
            lines.append(f"{'on other threads':<30} {'thread s':>8} {'':>6} {'':>8} {'GFLOP':>8} {'floor s':>8} {'s/floor':>8}")
            for name in [p for p in PHASES if p in self.overlapped] + [p for p in self.overlapped if p not in PHASES]:
                s, fl = self.overlapped[name], self.floor(name)
                gf = f"{self.flops[name] / 1e9:.0f}" if name in self.flops and name not in totals else ""
                ratio = f"{fl:8.2f} {s / fl:8.1f}" if fl and name not in totals else f"{'':>8} {'':>8}"
                lines.append(f"{name + ' (background)':<30} {s:8.2f} {'':>6} {'':>8} {gf:>8} " + ratio)
        layers = sorted({lay for (_n, lay) in self.seconds if isinstance(lay, int)})
        if layers:
            cols = [n for n in names if any((n, lay) in self.seconds for lay in layers)]
            lines.append("seconds per layer: " + "; ".join(f"{_short(c)} = {c}" for c in cols))
            lines.append(f"{'layer':>5} " + " ".join(f"{_short(c):>6}" for c in cols) + f" {'total':>7}")
            for lay in layers:
                row = [self.seconds.get((c, lay), 0.0) for c in cols]
                lines.append(f"{lay:>5} " + " ".join(f"{v:6.2f}" for v in row) + f" {sum(row):7.2f}")
        return "\n".join(lines)


def _short(name: str) -> str:
    return "".join(w[0] for w in name.replace("/", " ").replace("-", " ").split())[:6]


_active: Optional[Profile] = None


def phase(name: str, flops: float = 0.0, dtype: Optional[str] = None):
    """Time a phase of the running profile (``flops``: the GEMM work it does, in ``dtype``);
    a shared no-op when none runs."""
    return _OFF if _active is None else _active.phase(name, flops, dtype)


def add_flops(name: str, flops: float, dtype: str) -> None:
    """Count GEMM work for ``name`` done inside a phase that also does other work (no timer)."""
    if _active is not None:
        _active.add_flops(name, flops, dtype)


def profile_running() -> bool:
    """Whether a profile runs in this process (a circuit worker process is told, and profiles its circuit)."""
    return _active is not None


def phases_of(prof: Profile) -> dict[str, tuple[float, float, Optional[str]]]:
    """A finished profile's named phases as ``{name: (seconds, flops, dtype)}``, for ``add_background``."""
    out = {name: (s, prof.flops.get(name, 0.0), prof.dtype.get(name)) for name, s in prof.by_phase().items()
           if name != OTHER}
    for name in prof.flops.keys() - out.keys():
        out[name] = (0.0, prof.flops[name], prof.dtype.get(name))
    return out


def add_background(phases: dict[str, tuple[float, float, Optional[str]]]) -> None:
    """Charge phases run in another process (``phases_of``) to the running profile as work on
    other threads: their seconds overlap the main thread's, as a circuit thread's do."""
    if _active is None:
        return
    for name, (seconds, flops, dtype) in phases.items():
        _active.add_overlapped(name, seconds)
        if flops:
            _active.add_flops(name, flops, dtype or "fp32")


def set_layer(layer: object) -> None:
    """Charge what follows to ``layer`` (None: model-wide work)."""
    if _active is not None:
        _active._charge(time.perf_counter())
        _active.layer = layer


@contextmanager
def profiling(enabled: bool, report=None):
    """Run a profile around the block when ``enabled`` (a nested call joins the running one);
    at its end, with a ``report`` function, the GEMM rates are measured and ``report`` gets the table."""
    global _active
    if not enabled or _active is not None:
        yield _active
        return
    _active = prof = Profile()
    try:
        yield prof
    finally:
        prof.stop()
        _active = None
    if report is not None:
        prof.rates = measure_rates()
        report(prof.report())


def measure_rates(budget_s: float = 0.1) -> dict[str, float]:
    """FLOP/s of this machine's GEMMs on the indexer's shapes, each timed for about ``budget_s``
    after a warm-up: fp32 through numpy (the vector projections: [block, d_model] @ [d_model,
    d_vocab]), bf16 through torch (a screened block: [512, 64] @ [64, 8192]) and fp64 through torch
    (a block of a circuit factor: [64, 576] @ [576, 2048], indexer/build.py ``_factor_product``)."""
    import numpy as np
    import torch

    def rate(fn, flops: float) -> float:
        fn()  # warm-up
        n, t = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t < budget_s:
            fn()
            n += 1
        return n * flops / (time.perf_counter() - t)

    # Constant operands: a GEMM's speed does not depend on its (normal) values, and drawing
    # random ones would take longer than the timing.
    a, b = np.full((256, 576), 0.5, dtype=np.float32), np.full((576, 49152), 0.25, dtype=np.float32)
    out = np.empty((256, 49152), dtype=np.float32)
    A, B = torch.full((512, 64), 0.5, dtype=torch.bfloat16), torch.full((8192, 64), 0.25, dtype=torch.bfloat16)
    W, E = torch.full((64, 576), 0.5, dtype=torch.float64), torch.full((576, 2048), 0.25, dtype=torch.float64)
    return {
        "fp32": rate(lambda: np.matmul(a, b, out=out), 2 * 256 * 576 * 49152),
        "bf16": rate(lambda: torch.mm(A, B.T), 2 * 512 * 64 * 8192),
        "fp64": rate(lambda: W @ E, 2 * 64 * 576 * 2048),
    }
