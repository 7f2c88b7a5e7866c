"""Latency budgets (`--target-speedup`, `--target-latency`): prune until the model is measured fast enough.

MACs are a proxy: narrow layers, blocked kernels and memory-bound ops make the speedup of a plan
anything from its MACs ratio down to none (benchmarks/results/speed.md). So the MACs budget is
searched by measuring: each probe's plan is pruned (recovery changes no shape, so timing needs
none) and timed on the chosen provider, batch and threads, interleaved run by run with the
original. The first probe is the budget the MACs promise (1 / speedup); bisection then finds the
largest budget that is measured to meet the target. The report lists every probe.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import UserInputError, ValidationError, first_line
from ..graph.runtime import best_providers, random_inputs, session
from ..measure.validate import time_pair

TOLERANCE = 0.02  # stop when the passing and failing budgets are this close (share of MACs)
MAX_PROBES = 7
SMALLEST_BUDGET = 0.05  # without an allocator: the least share of the MACs a uniform ratio is asked for


@dataclass(frozen=True)
class SpeedTarget:
    """A measured speedup over the original, or a latency, at one batch size and thread count."""

    speedup: float | None = None
    latency_ms: float | None = None
    batch: int = 1
    threads: int | None = None
    runs: int = 20
    warmup: int = 3

    def __post_init__(self) -> None:
        if (self.speedup is None) == (self.latency_ms is None):
            raise UserInputError("give one of --target-speedup and --target-latency")
        if self.speedup is not None and self.speedup <= 1.0:
            raise UserInputError(f"--target-speedup must be above 1, got {self.speedup:g}")
        if self.latency_ms is not None and self.latency_ms <= 0:
            raise UserInputError(f"--target-latency must be positive, got {self.latency_ms:g}")
        if self.batch < 1 or (self.threads is not None and self.threads < 1):
            raise UserInputError("--batch and --threads must be at least 1")

    def met(self, original_ms: float, pruned_ms: float) -> bool:
        if self.speedup is not None:
            return original_ms / pruned_ms >= self.speedup
        return pruned_ms <= self.latency_ms

    def first_budget(self, original_ms: float | None) -> float:
        """The share of the MACs that would meet the target if latency followed the MACs.

        `original_ms` (the original's latency) is needed for a latency target only.
        """
        wanted = self.speedup if self.speedup is not None else original_ms / self.latency_ms
        return float(np.clip(1.0 / wanted, SMALLEST_BUDGET, 1.0))

    def describe(self) -> str:
        goal = f"{self.speedup:g}x" if self.speedup is not None else f"{self.latency_ms:g} ms"
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else "default threads"
        return f"{goal} (batch {self.batch}, {threads})"


class Timer:
    """The original model's session, opened once; candidates are timed interleaved with it."""

    def __init__(self, original, input_shapes: dict, target: SpeedTarget, provider: str | None):
        self.target = target
        try:
            self.providers = best_providers(provider)
        except ValidationError as err:
            raise UserInputError(str(err)) from None
        self.original = session(original, self.providers, target.threads)
        self.provider = self.original.get_providers()[0]
        self.feeds = random_inputs(self.original, input_shapes, target.batch)
        try:
            self.original.run(None, self.feeds)
        except Exception as err:  # ORT raises several types; a fixed batch is the usual cause
            raise UserInputError(f"the model does not run at --batch {target.batch} ({first_line(err)})") from None

    @functools.cached_property
    def original_ms(self) -> float:
        """The original's median latency alone: a latency target's first guess."""
        times = []
        for _ in range(self.target.warmup + self.target.runs):
            start = time.perf_counter()
            self.original.run(None, self.feeds)
            times.append((time.perf_counter() - start) * 1000)
        return float(np.median(times[self.target.warmup:]))

    def measure(self, model) -> tuple[float, float]:
        """(original, candidate) median milliseconds."""
        candidate = session(model, self.providers, self.target.threads)
        before, after = time_pair(self.original, candidate, self.feeds, self.target.runs, self.target.warmup)
        return float(np.median(before)), float(np.median(after))


@dataclass
class SpeedProbe:
    target_macs: float  # the MACs budget tried
    macs_kept: float  # what the pruned model keeps
    original_ms: float
    pruned_ms: float
    met: bool

    @property
    def speedup(self) -> float:
        return self.original_ms / self.pruned_ms if self.pruned_ms else 0.0


@dataclass
class SpeedSearch:
    timer: Timer  # its target, and the original's session: the recovered model is timed by it too
    plan: object  # PrunePlan
    allocation: object  # Allocation or None
    macs_kept: float
    chosen: SpeedProbe
    probes: list[SpeedProbe] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"target": self.timer.target.describe(), "provider": self.timer.provider,
                "chosen_macs_kept": round(self.macs_kept, 4), "measured_speedup": round(self.chosen.speedup, 3),
                "measured_ms": round(self.chosen.pruned_ms, 3), "original_ms": round(self.chosen.original_ms, 3),
                "probes": [{**vars(p), "speedup": round(p.speedup, 3)} for p in self.probes]}


def search_speed(plan_for: Callable[[float], tuple], pruned: Callable, smallest: float, timer: Timer,
                 progress: Callable = lambda items: items) -> SpeedSearch:
    """The largest MACs budget whose pruned model is measured to meet `timer.target`.

    `plan_for(budget)` returns (plan, allocation or None, MACs kept); `pruned(plan)` the model.
    """
    target = timer.target
    tried: dict[tuple, SpeedProbe] = {}
    probes: list[SpeedProbe] = []
    passing = None

    def attempt(budget: float):
        plan, allocation, kept = plan_for(budget)
        key = tuple(plan.removed_roots.tolist())
        if key not in tried:
            original_ms, pruned_ms = timer.measure(pruned(plan))
            tried[key] = SpeedProbe(round(budget, 4), round(kept, 4), original_ms, pruned_ms,
                                    target.met(original_ms, pruned_ms))
        probe = tried[key]
        probes.append(probe)
        return probe, (plan, allocation, kept, probe)

    lo, hi = smallest, 1.0  # lo: assumed fast enough until measured; hi: the original, not faster
    for step in progress(range(MAX_PROBES)):
        if step and hi - lo <= TOLERANCE:
            break
        if step:
            budget = (lo + hi) / 2
        else:
            budget = float(np.clip(target.first_budget(timer.original_ms if target.latency_ms else None), lo, hi))
        probe, result = attempt(budget)
        if probe.met:
            lo, passing = budget, result
        else:
            hi = budget
    if passing is None and lo == smallest:  # the fastest plan, if bisection never went that far
        probe, result = attempt(smallest)
        passing = result if probe.met else None
    if passing is None:
        best = max(probes, key=lambda p: p.speedup)
        raise UserInputError(f"no plan meets the speed target {target.describe()} on {timer.provider}: the fastest "
                             f"probe ran {best.speedup:.2f}x faster ({best.pruned_ms:.2f} ms) keeping "
                             f"{best.macs_kept:.1%} of the MACs")
    plan, allocation, kept, probe = passing
    return SpeedSearch(timer, plan, allocation, kept, probe, probes)
