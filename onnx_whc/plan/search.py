"""Accuracy-aware budgets (`--min-agreement`, `--min-r2`): prune as far as the quality floor allows.

The allocator's greedy path orders every per-group step from the cheapest to the dearest; the
budget (share of MACs kept) is bisected along it. Each probe prunes, recovers and measures the
model on held-out samples, so the floor is checked on what the user will get, not on a proxy.
About log2(range / tolerance) probes: six or seven, not a grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..errors import UserInputError
from ..graph.plan import PrunePlan
from ..measure.metrics import Cost
from ..measure.quality import Quality, QualityProbe
from .allocate import Allocation, Allocator

TOLERANCE = 0.02  # stop when the passing and failing budgets are this close (share of MACs)
MAX_PROBES = 7  # halving from the whole path down to TOLERANCE


@dataclass(frozen=True)
class QualityFloor:
    """`--min-agreement` / `--min-r2`: the least quality the pruned model must keep on held-out samples."""

    agreement: float | None = None
    r2: float | None = None

    def __post_init__(self) -> None:
        if self.agreement is not None and not 0.0 <= self.agreement <= 1.0:
            raise UserInputError(f"--min-agreement must be in [0, 1], got {self.agreement:g}")
        if self.r2 is not None and self.r2 > 1.0:
            raise UserInputError(f"--min-r2 must be at most 1, got {self.r2:g}")

    def met(self, quality: Quality) -> bool:
        """Every rated output at or above its floor; agreement less one standard error of its estimate.

        The search picks the deepest probe that passes, which favours probes whose held-out figure
        came out high by chance: the margin keeps the floor on data the samples stand for.
        """
        for q in quality.outputs.values():
            floor = {"agreement": self.agreement, "r2": self.r2}.get(q.metric)
            if floor is None or q.value is None:
                continue
            margin = np.sqrt(q.value * (1 - q.value) / q.details["rows"]) if q.metric == "agreement" else 0.0
            if q.value - margin < floor:
                return False
        return True

    def describe(self) -> str:
        parts = [f"agreement >= {self.agreement:g}" if self.agreement is not None else "",
                 f"R² >= {self.r2:g}" if self.r2 is not None else ""]
        return ", ".join(p for p in parts if p)

    def __bool__(self) -> bool:
        return self.agreement is not None or self.r2 is not None


@dataclass
class Probe:
    target: float  # MACs budget tried
    macs_kept: float  # what the pruned model really keeps
    passed: bool
    quality: dict[str, float | None]


@dataclass
class SearchResult:
    plan: PrunePlan
    allocation: Allocation
    model: onnx.ModelProto
    recovery: dict | None
    cost: Cost
    quality: Quality
    macs_kept: float
    floor: QualityFloor
    probes: list[Probe] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"floor": {"agreement": self.floor.agreement, "r2": self.floor.r2},
                "floor_text": self.floor.describe(), "chosen_macs_kept": round(self.macs_kept, 4),
                "probes": [vars(p) for p in self.probes]}


def search_budget(allocator: Allocator, analysis, recovered: Callable, probe: QualityProbe, floor: QualityFloor,
                  progress: Callable = lambda items: items) -> SearchResult:
    """The smallest MACs budget on the allocator's path whose recovered model meets `floor`.

    `recovered(plan)` returns (model, recovery report, cost); `probe` measures quality.
    """
    if allocator is None:
        raise UserInputError("--min-agreement/--min-r2 search along the allocator's plans: drop --no-allocate")
    total = allocator.path[0][1]
    passing = None
    lo, hi = allocator.smallest, total  # lo: not known to pass; hi: passes (the unpruned model)
    probes: list[Probe] = []

    tried: dict[tuple, tuple] = {}  # nearby budgets often cut the path at the same step: prune it once

    def attempt(target: float):
        allocation = allocator.allocation(target)
        key = tuple(sorted(allocation.ratios.items()))
        if key not in tried:
            plan = allocator.plan(analysis, allocation)
            model, report, cost = recovered(plan)
            quality = probe.measure(model)
            tried[key] = plan, model, report, cost, quality
        plan, model, report, cost, quality = tried[key]
        ok = floor.met(quality)
        probes.append(Probe(round(target, 4), round(allocation.macs_kept, 4), ok, quality.headline()))
        return ok, (plan, allocation, model, report, cost, quality)

    for _ in progress(range(MAX_PROBES)):
        if hi - lo <= TOLERANCE:
            break
        target = (lo + hi) / 2
        ok, result = attempt(target)
        if ok:
            hi, passing = target, result
        else:
            lo = target
    if passing is None:
        raise UserInputError(f"no pruned model meets the quality floor ({floor.describe()}) on {probe.on}; "
                             f"the mildest probe kept {probes[-1].macs_kept:.1%} of the MACs"
                             if probes else "the quality floor leaves nothing to prune")
    plan, allocation, model, report, cost, quality = passing
    return SearchResult(plan, allocation, model, report, cost, quality, allocation.macs_kept, floor, probes)

