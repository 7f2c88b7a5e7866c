"""Latency budgets: the search finds the mildest plan measured fast enough, and says how it got there."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_whc import api
from onnx_whc.errors import UserInputError
from onnx_whc.plan.speed_target import MAX_PROBES, SpeedTarget, search_speed

from .test_bench import RESNET20


class _Plan:
    def __init__(self, budget: float):
        self.budget = round(budget, 2)  # plans come in steps, as allocator paths do
        self.removed_roots = np.arange(int(100 * (1 - self.budget)))


class _FakeTimer:
    """Latency that falls more slowly than the MACs (speedup = 1 / kept^0.8), without a clock."""

    def __init__(self, target: SpeedTarget):
        self.target, self.provider, self.original_ms, self.timed = target, "FakeProvider", 10.0, []

    def measure(self, model):
        self.timed.append(model.budget)
        return self.original_ms, self.original_ms * model.budget ** 0.8


def _search(target: SpeedTarget, smallest: float = 0.1):
    timer = _FakeTimer(target)
    plan_for = lambda budget: (_Plan(budget), None, _Plan(budget).budget)  # noqa: E731
    return search_speed(plan_for, lambda plan: plan, smallest, timer), timer


def test_the_mildest_plan_that_meets_the_speedup_is_chosen():
    result, timer = _search(SpeedTarget(speedup=2.0))
    wanted = 0.5 ** (1 / 0.8)  # 0.42: where 1 / kept^0.8 reaches 2
    assert result.chosen.speedup >= 2.0 and result.macs_kept == pytest.approx(wanted, abs=0.03)
    assert result.probes[0].target_macs == 0.5  # first the budget the MACs promise: it misses
    assert not result.probes[0].met
    assert len(result.probes) <= MAX_PROBES + 1 and len(set(timer.timed)) == len(timer.timed)  # no plan timed twice
    assert all(p.met == (p.speedup >= 2.0) for p in result.probes)


def test_a_latency_target_starts_from_the_originals_latency():
    result, _ = _search(SpeedTarget(latency_ms=5.0))
    assert result.probes[0].target_macs == 0.5 and result.chosen.pruned_ms <= 5.0


def test_an_unreachable_target_says_how_fast_the_fastest_plan_was():
    with pytest.raises(UserInputError, match=r"no plan meets the speed target 20x .* the fastest probe ran "
                                             r"\d\.\d\dx faster .* keeping 10\.0% of the MACs"):
        _search(SpeedTarget(speedup=20.0))


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give one of --target-speedup and --target-latency"),
    ({"speedup": 2.0, "latency_ms": 3.0}, "give one of"),
    ({"speedup": 0.9}, "--target-speedup must be above 1"),
    ({"latency_ms": -1.0}, "--target-latency must be positive"),
    ({"speedup": 2.0, "batch": 0}, "--batch and --threads must be at least 1"),
])
def test_bad_speed_targets_are_user_errors(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        SpeedTarget(**kwargs)


def test_a_speed_target_excludes_other_budgets():
    with pytest.raises(UserInputError, match="--ratio and --target-speedup/--target-latency are mutually exclusive"):
        api.prune(RESNET20, ratio=0.3, speed=SpeedTarget(speedup=1.5))


def test_a_real_speed_target_is_measured_and_checked_after_recovery():
    """ResNet-20 at batch 16 on one thread: a modest target the pruning reaches, timed on the CPU."""
    _, report = api.prune(RESNET20, speed=SpeedTarget(speedup=1.1, batch=16, threads=1, runs=5, warmup=1),
                          provider="cpu")
    speed = report.speed
    assert speed["provider"] == "CPUExecutionProvider" and speed["probes"]
    chosen = [p for p in speed["probes"] if p["macs_kept"] == speed["chosen_macs_kept"]]
    assert chosen and all(p["met"] and p["speedup"] >= 1.1 for p in chosen)
    assert speed["final_speedup"] > 0 and report.macs_kept == pytest.approx(speed["chosen_macs_kept"], abs=0.02)
    assert "speed target 1.1x (batch 16, 1 thread) on CPUExecutionProvider" in report.summary()


def test_a_batch_the_model_cannot_run_is_a_user_error():
    from .builder import GraphBuilder
    b = GraphBuilder(dynamic_batch=False)
    x = b.input("x", [1, 3, 8, 8])
    model = b.build([b.conv(b.relu(b.conv(x, 8, name="c1")), 4, name="c2")])
    with pytest.raises(UserInputError, match="the model does not run at --batch 4"):
        api.prune(model, speed=SpeedTarget(speedup=1.5, batch=4, runs=1, warmup=0), recover="none", synthetic=False)
