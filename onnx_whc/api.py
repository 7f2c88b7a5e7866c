"""The Python API: `prune` and `analyze`, the stages wired in order (saving lives in `storage`)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx

from .data.calibration import load_labelled
from .errors import UserInputError, ValidationError
from .graph.dependency import analyze_channels
from .graph.equivalence import export
from .graph.load import load, read_model
from .graph.plan import PrunePlan
from .graph.runtime import best_providers, run_model, samples_per_run
from .graph.storage import save
from .measure.metrics import model_cost
from .measure.quality import SYNTHETIC_CAVEAT
from .measure.validate import validate as validate_models
from .pipeline import Pipeline, calibration_for, quality_probe, synthetic_beside
from .plan.allocate import Allocation
from .plan.search import QualityFloor, SearchResult, search_budget
from .plan.speed_target import SpeedSearch, SpeedTarget
from .plan.widths import MEASURED
from .progress import progress_bar
from .recovery.distill import distill as distill_model
from .reports.report import (
    AnalysisReport,
    PruneReport,
    SweepReport,
    SweepRow,
    cost_dict,
    group_reports,
    prunable_macs_share,
    validation_dict,
)
from .settings import Settings

DEFAULT_RATIO = 0.4
# Multiples of 8 keep ONNX Runtime's blocked CPU kernels (and GPU tensor cores) in use: ResNet-50 at
# ratio 0.4 runs 2.29x faster instead of 2.13x with 1, as fast as with 16 (2.30x) while removing more
# MACs, and narrow networks keep more of their budget (benchmarks/results/speed.md). The CLI shares it.
DEFAULT_ROUND_TO = 8


def analyze(model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> AnalysisReport:
    """The channel groups of a model, what each costs and why some cannot be pruned."""
    loaded = load(model, input_shapes)
    analysis = analyze_channels(loaded)
    cost = model_cost(loaded.graph, loaded.shapes)
    groups = group_reports(analysis, loaded.shapes, cost.macs, loaded.graph)
    prunable = prunable_macs_share(analysis, loaded.shapes, cost.macs, loaded.graph)
    return AnalysisReport(groups, cost.macs, cost.params, loaded.probe_sizes, prunable)


def _check_number(value, option: str, interval: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{option} must be a number in {interval}, got '{value}'") from None


def _check_ratio(ratio) -> float:
    value = _check_number(ratio, "--ratio", "[0, 1)")
    if not 0.0 <= value < 1.0:
        raise UserInputError(f"--ratio must be in [0, 1), got {value:g}")
    return value


class _Clock:
    """Seconds spent in each stage, timed by `with clock("name"):`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - begin, 4)

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.start, 4)}


def prune(model, ratio: float | None = None, *, settings: Settings | None = None,
          **options) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove floor(ratio * N) channels from every prunable group; return the model and a report.

    `model` is a path or a ModelProto (never modified). Every option is a field of `Settings`, given
    as `settings` or by name (`prune(m, ratio=0.4, calib="calib/")`); names override `settings`.
    `ratio` defaults to 0.4; `target_macs=F` instead picks the smallest ratio whose model keeps at
    most a fraction F of the MACs.

    `calib` is a folder of images, an .npy, an .npz or arrays keyed by input name (`calib_size`
    samples, `preprocess` a `calibration.Preprocess`). Without it, an image model gets built-in
    synthetic dead-leaves images, refined by model inversion where it is a classifier of 64 px or
    more (`synthetic=False` turns them off). With data, `allocate`
    (default on) spends the MACs budget per group where it costs the least, and recovery
    (`recover`: auto, none, bias, stats, lsq; see `onnx_whc.recovery.recover`) refits the changed layers.
    Quality (`onnx_whc.measure.quality`) is measured on held-out samples. `floor` (a `QualityFloor`)
    prunes as far as the recovered model keeps that quality, searching the allocator's path.
    `eval_set` (a labelled image folder or CSV) adds top-1 before and after. `speed` (a
    `SpeedTarget`) prunes until the model is measured that much faster on `provider`.

    `round_to` makes kept counts multiples of it, or with "measured" the widths at which each
    group's layers are timed faster on `provider` (`onnx_whc.plan.widths`); the default is 8, and
    measured widths with a speed target.
    """
    s = (settings or Settings()).but(**options, **({} if ratio is None else {"ratio": ratio}))
    ratio, target_macs = _check_budget(s.ratio, s.target_macs, s.floor, s.speed)
    round_to = _check_round_to(s.round_to, s.speed)
    if s.validate:
        best_providers(s.provider)  # a wrong --provider fails now, not after the pruning
    clock = _Clock()
    with clock("analyzed"):
        run = Pipeline(model, s, round_to,
                       measure=s.validate or bool(s.floor) or s.eval_set is not None or s.speed is not None
                       or s.distill is not None,
                       needs_data=bool(s.floor))
        labelled = Labelled(s.eval_set, run, s.preprocess) if s.eval_set is not None else None
    with clock("selected"):
        choice = _choose(run, ratio, target_macs)
    # read before the last plan prunes the loaded graph in place
    groups = group_reports(run.analysis, run.loaded.shapes, run.before.macs, run.loaded.graph, choice.plan)
    with clock("pruned"):
        pruned, recovery_report, after = _pruned(run, choice)
    report = _report(run, choice, groups, round_to, after, recovery_report)
    if s.distill is not None and choice.plan.removed_channels:
        with clock("distilled"):
            synthetic = synthetic_beside(run.calibration, run.loaded.input_shapes, run.input_types, s, run.original,
                                         run.before.macs)
            pruned, distilled = distill_model(run.original, pruned, run.calibration, run.probe,
                                              run.loaded.input_shapes, s.distill, s.preprocess, s.progress,
                                              synthetic=synthetic)
        report.distill = distilled.to_dict()
        report.distill_summary = distilled.summary()
    if choice.speed is not None:
        with clock("timed"):  # the recovered model, timed as its plan was: recovery changes no shape
            original_ms, pruned_ms = choice.speed.timer.measure(pruned)
        report.speed = {**choice.speed.to_dict(), "final_speedup": round(original_ms / pruned_ms, 3),
                        "final_ms": round(pruned_ms, 3)}
    if s.validate and choice.plan.removed_channels:  # an unchanged model needs no checking
        with clock("validated"):
            report.validation = validation_dict(validate_models(run.original, pruned, run.loaded.input_shapes,
                                                                provider=s.provider))
    if run.probe is not None and choice.plan.removed_channels:
        with clock("measured"):
            _add_quality(report, run, pruned)
    if labelled is not None:
        with clock("evaluated"):
            report.top1 = {"before": labelled.top1(run.original), "after": labelled.top1(pruned), "on": labelled.on}
    report.seconds = clock.total()
    report.memory = run.memory()
    return pruned, report


@dataclass
class _Choice:
    """The plan a budget, a quality floor or a speed target chose, and how."""
    plan: PrunePlan
    allocation: Allocation | None
    ratio: float | None
    target_macs: float | None
    search: SearchResult | None = None  # --min-agreement / --min-r2
    speed: SpeedSearch | None = None  # --target-speedup / --target-latency


def _pruned(run: Pipeline, choice: _Choice):
    """The recovered model of the chosen plan, its recovery report and its cost."""
    if choice.search is not None:  # the accuracy search recovered its plans already
        pruned, recovery, after = choice.search.model, choice.search.recovery, choice.search.cost
    else:
        pruned, recovery, after = run.recovered(choice.plan, in_place=True)
    if choice.target_macs is not None and after.macs > choice.target_macs * run.before.macs:
        chosen = "the allocated ratios keep" if choice.ratio is None else f"ratio {choice.ratio:g} keeps"
        raise ValidationError(f"{chosen} {after.macs / run.before.macs:.2%} of the MACs, "
                              f"over --target-macs {choice.target_macs:g} (the estimate from the plan was wrong)")
    return pruned, recovery, after


def _report(run: Pipeline, choice: _Choice, groups, round_to, after, recovery: dict | None) -> PruneReport:
    """What was pruned and how (the measurements after it are added by `prune`)."""
    report = PruneReport(choice.ratio, run.criterion, round_to, cost_dict(run.before), cost_dict(after), groups)
    report.target_macs, report.recovery, report.calibration = choice.target_macs, recovery, run.data_described
    report.allocation = choice.allocation.to_dict() if choice.allocation else None
    report.search = choice.search.to_dict() if choice.search else None
    report.probe_sizes = run.loaded.probe_sizes
    report.widths = run.widths.to_dict() if run.widths else None
    return report


def _add_quality(report: PruneReport, run: Pipeline, pruned: onnx.ModelProto) -> None:
    """The recovered model's quality on the held-out samples, with its warning and caveat."""
    quality = run.probe.measure(pruned)
    synthetic = run.calibration is not None and run.calibration.synthetic
    own_data = run.calibration is not None and not synthetic
    brief = run.calibration.quality_samples if run.calibration is not None else None
    report.quality, report.quality_on, report.warning = quality.to_dict(), quality.on, quality.warning(own_data, brief)
    report.quality_samples = brief
    if synthetic:
        report.caveat = SYNTHETIC_CAVEAT


def _choose(run: Pipeline, ratio, target_macs) -> _Choice:
    s = run.settings
    if s.speed is not None:
        found = run.speed_search()
        return _Choice(found.plan, found.allocation, None, None, speed=found)
    if s.floor:
        found = search_budget(run.allocator, run.analysis, run.recovered, run.probe, s.floor,
                              progress_bar(s.progress, "searching the budget"))
        return _Choice(found.plan, found.allocation, None, found.macs_kept, search=found)
    plan, allocation, ratio = run.plan(ratio, target_macs)
    return _Choice(plan, allocation, ratio, target_macs)


def _check_round_to(value, speed: SpeedTarget | None) -> int | str:
    if value is None:
        return MEASURED if speed is not None else DEFAULT_ROUND_TO
    text = str(value).strip()
    if text == MEASURED:
        return MEASURED
    if not text.lstrip("-").isdigit():
        raise UserInputError(f"--round-to must be a whole number or '{MEASURED}', got '{value}'")
    if int(text) < 1:
        raise UserInputError("--round-to must be at least 1")
    return int(text)


def _check_budget(ratio, target_macs, floor, speed=None) -> tuple[float | None, float | None]:
    given = [name for name, value in (("--ratio", ratio), ("--target-macs", target_macs)) if value is not None]
    if speed is not None:
        if given or floor:
            what = given[0] if given else "--min-agreement/--min-r2"
            raise UserInputError(f"{what} and --target-speedup/--target-latency are mutually exclusive: "
                                 "the speed target chooses the budget")
        return None, None
    if floor:
        if given:
            raise UserInputError(f"{given[0]} and --min-agreement/--min-r2 are mutually exclusive: "
                                 "the quality floor chooses the budget")
        return None, None
    if len(given) == 2:
        raise UserInputError("--ratio and --target-macs are mutually exclusive: give one of them")
    if target_macs is not None:
        return None, _check_number(target_macs, "--target-macs", "(0, 1]")
    return _check_ratio(DEFAULT_RATIO if ratio is None else ratio), None


def sweep(model, budgets, *, settings: Settings | None = None, **options) -> SweepReport:
    """Prune at every MACs budget in `budgets` from one analysis; measure each (quality, latency, top-1).

    Options are `Settings` fields, as for `prune` (the budget ones aside). `eval_set` is a labelled
    image folder or CSV (`calibration.load_labelled`) for top-1.
    """
    s = (settings or Settings()).but(**options)
    budgets = [_check_number(b, "--budgets", "(0, 1]") for b in budgets]
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise UserInputError("--budgets must be shares of the MACs in (0, 1], e.g. 0.9,0.8,0.7")
    best_providers(s.provider)
    run = Pipeline(model, s, _check_round_to(s.round_to, None), measure=True)
    labelled = Labelled(s.eval_set, run, s.preprocess) if s.eval_set is not None else None
    rows = []
    for budget in progress_bar(s.progress, "sweeping budgets")(sorted(budgets, reverse=True)):
        start = time.perf_counter()
        plan, _, _ = run.plan(None, budget)
        pruned, _, cost = run.recovered(plan)
        quality = run.probe.measure(pruned)
        timing = validate_models(run.original, pruned, run.loaded.input_shapes, provider=s.provider)
        rows.append(SweepRow(budget, cost.macs / run.before.macs, timing.latency_ms_before, timing.latency_ms_after,
                             quality.to_dict(), labelled.top1(pruned) if labelled else None,
                             round(time.perf_counter() - start, 2)))
    return SweepReport(rows, run.probe.on, run.data_described, timing.provider,
                       labelled.top1(run.original) if labelled else None, labelled.on if labelled else None)


def distill(original, pruned, *, settings: Settings | None = None, on_checkpoint=None, **options):
    """`pruned` trained towards `original` on the calibration data: (the model, a `DistillReport`).

    `settings.distill` (a `DistillSettings`) sets the budget; the other `Settings` fields read are
    the calibration's (calib, calib_size, preprocess, synthetic, seed, input_shapes). `pruned` keeps
    its graph (any model with the original's inputs and outputs); only initializer values change.
    """
    s = (settings or Settings()).but(**options)
    if s.distill is None:
        raise UserInputError("give a distillation budget: --time (e.g. 15m) or --distill-steps")
    best_providers(s.distill.provider)  # a wrong --provider fails now
    loaded = load(original, s.input_shapes)
    teacher = export(loaded.graph, loaded)
    student = read_model(pruned)  # read once, external data too; distillation writes a copy, never this one
    ins = lambda m: [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]  # noqa: E731
    outs = lambda m: [o.name for o in m.graph.output]  # noqa: E731
    if ins(student) != ins(teacher) or outs(student) != outs(teacher):
        raise UserInputError(f"{pruned}: its inputs and outputs ({', '.join(ins(student) + outs(student))}) are not "
                             f"the original's ({', '.join(ins(teacher) + outs(teacher))})")
    types = {t.name: np.dtype(t.dtype or np.float32) for t in loaded.graph.inputs if t.name in loaded.input_shapes}
    macs = model_cost(loaded.graph, loaded.shapes).macs
    calibration, no_data = calibration_for(loaded.input_shapes, types, s, True, teacher, macs,
                                           progress_bar(s.progress, "refining synthetic images"))
    if calibration is None:
        raise UserInputError(f"distillation needs calibration data: give --calib DIR ({no_data})")
    probe = quality_probe(teacher, calibration, no_data, loaded.input_shapes, types,
                          samples_per_run(teacher, loaded.shapes), s.seed)
    synthetic = synthetic_beside(calibration, loaded.input_shapes, types, s, teacher, macs)
    return distill_model(teacher, student, calibration, probe, loaded.input_shapes, s.distill, s.preprocess,
                         s.progress, on_checkpoint, synthetic)


class Labelled:
    """A labelled set and top-1 on it, read from the model's first classifier output."""

    def __init__(self, path, run: Pipeline, preprocess):
        self.inputs, self.labels, self.on = load_labelled(path, run.loaded.input_shapes, preprocess, run.input_types)
        kinds = [name for name, kind in run.probe.kinds.items() if kind.kind == "classifier"]
        if not kinds:
            raise UserInputError("--eval needs a classifier output (N x classes); this model has none")
        self.output, self.axis, self.chunk = kinds[0], run.probe.kinds[kinds[0]].axis, run.chunk
        self.index = run.probe.names.index(self.output)

    def top1(self, model: onnx.ModelProto) -> float:
        scores = run_model(model, self.inputs, self.chunk)[self.index]
        return float(np.mean(scores.argmax(self.axis) == self.labels))


__all__ = ["analyze", "prune", "sweep", "distill", "save", "read_model", "Settings", "QualityFloor", "SpeedTarget"]
