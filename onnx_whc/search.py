"""Accuracy-aware budgets (`--min-agreement`, `--min-r2`): prune as far as the quality floor allows.

The allocator's greedy path orders every per-group step from the cheapest to the dearest; the
budget (share of MACs kept) is bisected along it. Each probe prunes, recovers and measures the
model on held-out samples, so the floor is checked on what the user will get, not on a proxy.
About log2(range / tolerance) probes: six or seven, not a grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import onnx

from .allocate import Allocation, Allocator
from .errors import UserInputError
from .metrics import Cost
from .quality import Quality, QualityProbe
from .select import PrunePlan

TOLERANCE = 0.02  # stop when the passing and failing budgets are this close (share of MACs)
MAX_PROBES = 7  # halving from the whole path down to TOLERANCE


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
    floor: dict
    probes: list[Probe] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"floor": self.floor, "chosen_macs_kept": round(self.macs_kept, 4),
                "probes": [vars(p) for p in self.probes]}


def search_budget(allocator: Allocator, analysis, recovered: Callable, probe: QualityProbe, floor,
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
        raise UserInputError(f"no pruned model meets the quality floor ({_floor_text(floor)}) on {probe.on}; "
                             f"the mildest probe kept {probes[-1].macs_kept:.1%} of the MACs"
                             if probes else "the quality floor leaves nothing to prune")
    plan, allocation, model, report, cost, quality = passing
    return SearchResult(plan, allocation, model, report, cost, quality, allocation.macs_kept,
                        {"agreement": floor.agreement, "r2": floor.r2}, probes)


def _floor_text(floor) -> str:
    parts = [f"agreement >= {floor.agreement:g}" if floor.agreement is not None else "",
             f"R² >= {floor.r2:g}" if floor.r2 is not None else ""]
    return ", ".join(p for p in parts if p)
