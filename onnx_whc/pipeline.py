"""The stages every prune shares, set up once: load, analyse, calibrate, score, allocate, recover.

`Pipeline` holds what the stages hand each other (the loaded model and its channel analysis, the
one `Calibration`, the quality probe, the allocator) so that `prune`, the accuracy-aware search
and `sweep` can each cut as many plans as they need from one analysis.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .data.calibration import make_calibration, synthetic_calibration
from .data.samples import Samples
from .errors import UserInputError
from .graph.dependency import analyze_channels
from .graph.equivalence import export, release_weights
from .graph.load import LoadedModel, infer_static_shapes, load, return_freed_memory
from .graph.memory import MemoryBudget, check_fits, current_rss, peak_rss
from .graph.plan import PrunePlan
from .graph.runtime import best_providers, samples_per_run
from .graph.surgery import apply_plan
from .measure.metrics import Cost, model_cost
from .measure.quality import QualityProbe
from .plan.allocate import Allocator, allocated_plan
from .plan.budget import MAX_UNIFORM_RATIO, MacsEstimator, fit_ratio
from .plan.channel_stats import channel_stats
from .plan.criteria import CRITERIA
from .plan.select import CONSUMER_AWARE, DATA_AWARE, consumer_aware_importance, energy_importance, select
from .plan.speed_target import SpeedSearch, Timer, search_speed
from .plan.widths import MEASURED, measure_widths
from .progress import progress_bar
from .recovery import recover as recovery
from .settings import Settings

CRITERION_NAMES = ("auto", *CRITERIA, *CONSUMER_AWARE, *DATA_AWARE)


def resolve_criterion(criterion: str, has_calibration: bool) -> str:
    """`auto`: `energy` when calibration data drives the prune (measured better after recovery), else
    the paper's WHC."""
    if criterion not in CRITERION_NAMES:
        raise UserInputError(f"unknown criterion '{criterion}' (choose from {', '.join(CRITERION_NAMES)})")
    if criterion == "auto":
        return "energy" if has_calibration else "whc"
    if criterion in DATA_AWARE and not has_calibration:
        raise UserInputError(f"--criterion {criterion} needs calibration data: give --calib")
    return criterion


class Pipeline:
    """One model analysed and calibrated, ready to turn plans into recovered, measured models.

    `measure` asks for a quality probe even without recovery; `needs_data` makes missing
    calibration data an error (the accuracy-aware search cannot run without it). `round_to`
    "measured" times each group's widths on the provider (at the batch and threads of the speed
    target, if any); with a speed target the allocator then spends the budget per millisecond saved.
    """

    def __init__(self, model, settings: Settings, round_to: int | str, measure: bool, needs_data: bool = False):
        s = self.settings = settings
        self.progress = s.progress
        self.loaded = load(model, s.input_shapes)
        return_freed_memory()
        self.analysis = analyze_channels(self.loaded)
        self.budget = MemoryBudget.of(s.memory)
        check_fits(self.budget, self.loaded.graph, self.loaded.shapes, weight_bytes(self.loaded.graph))
        self.widths = None
        speed = s.speed
        if round_to == MEASURED:  # before calibration: a failing provider fails early
            self.widths = measure_widths(self.loaded, self.analysis, best_providers(s.provider),
                                         speed.threads if speed else None, speed.batch if speed else 1,
                                         progress=progress_bar(s.progress, "timing channel widths"))
            round_to = self.widths
        self.before = model_cost(self.loaded.graph, self.loaded.shapes)
        self.input_types = {t.name: np.dtype(t.dtype or np.float32) for t in self.loaded.graph.inputs
                            if t.name in self.loaded.input_shapes}
        # Synthetic images are refined by inverting the model, unless they will only measure quality.
        fitted = s.recover != "none" or needs_data or bool(s.allocate)
        wanted = fitted or measure  # else synthetic images go unused
        original = export(self.loaded.graph.copy(), self.loaded) if s.calib is None and s.synthetic and fitted else None
        self.calibration, no_data = calibration_for(self.loaded.input_shapes, self.input_types, s, wanted, original,
                                                 self.before.macs, progress_bar(s.progress, "refining synthetic images"))
        self.method = recovery.resolve_method(s.recover, self.calibration is not None)
        data_driven = self.calibration is not None and (self.method != "none" or not self.calibration.synthetic)
        allocate = data_driven or needs_data if s.allocate is None else s.allocate
        if (allocate or needs_data) and self.calibration is None:
            what = "--allocate" if allocate else "--min-agreement/--min-r2"
            raise UserInputError(f"{what} needs calibration data: give --calib ({no_data})")
        self.data_described = self.calibration.source if self.calibration else f"none ({no_data})"
        self.criterion = resolve_criterion(s.criterion, data_driven)
        stats = None
        if allocate or self.criterion in DATA_AWARE:
            stats = channel_stats(self.loaded, self.analysis, self.calibration.fit)
        self.select_args = dict(criterion=self.criterion, round_to=round_to, exclude=tuple(s.exclude), seed=s.seed,
                                importance=_importance(self.criterion, self.analysis, self.loaded, stats, s.seed))
        measure = measure or self.method != "none"
        self.original = (original or export(self.loaded.graph.copy(), self.loaded)) if measure else None
        self.chunk = samples_per_run(self.original, self.loaded.shapes) if measure else 1
        self.probe = quality_probe(self.original, self.calibration, no_data, self.loaded.input_shapes,
                                    self.input_types, self.chunk, s.seed) if measure else None
        self.allocator = Allocator(self.loaded, self.analysis, self.calibration.fit, self.select_args, stats,
                                   progress=progress_bar(s.progress, "measuring group sensitivity"),
                                   latency=self.widths if speed else None, room=self.room()) if allocate else None
        self.recovery_settings = recovery.RecoverySettings(
            **{**vars(s.recovery_settings or recovery.RecoverySettings()), "method": self.method, "seed": s.seed})

    def plan(self, ratio: float | None, target_macs: float | None):
        """(plan, allocation or None, the uniform ratio or None) for a ratio or a MACs budget."""
        if self.allocator is not None:
            plan, allocation = allocated_plan(self.loaded, self.analysis, self.allocator, ratio, target_macs,
                                              self.select_args)
            return plan, allocation, ratio
        if target_macs is None:
            return select(self.analysis, ratio, **self.select_args,
                          progress=progress_bar(self.progress, "scoring groups")), None, ratio
        fit = fit_ratio(self.loaded, self.analysis, target_macs, **self.select_args,
                        progress=progress_bar(self.progress, "fitting the MACs budget"))
        return fit.plan, None, fit.ratio

    def speed_search(self) -> SpeedSearch:
        """The mildest plan measured to meet the latency target (`speed_target`), before recovery."""
        estimator = MacsEstimator(self.loaded, self.analysis)
        if self.allocator is not None:
            smallest = self.allocator.smallest
        else:  # the most a uniform ratio removes
            smallest = estimator.kept(select(self.analysis, MAX_UNIFORM_RATIO, **self.select_args))

        def plan_for(budget: float):
            plan, allocation, _ = self.plan(None, max(budget, smallest))
            return plan, allocation, estimator.kept(plan)

        timer = Timer(self.original, self.loaded.input_shapes, self.settings.speed, self.settings.provider)
        return search_speed(plan_for, lambda plan: prune_copy(self.loaded, self.analysis, plan)[0], smallest, timer,
                            progress_bar(self.progress, f"measuring plans on {timer.provider}"))

    def recovered(self, plan: PrunePlan, in_place: bool = False) -> tuple[onnx.ModelProto, dict | None, Cost]:
        """The model pruned by `plan` and recovered, its recovery report and its cost.

        `in_place` prunes the loaded graph itself and releases its weights: the last plan of a run.
        """
        if not plan.removed_channels:
            model = self.original if self.original is not None else export(self.loaded.graph, self.loaded)
            return model, None, self.before
        pruned, cost = prune_copy(self.loaded, self.analysis, plan, in_place)
        keep = lambda name: self.analysis.keep_mask(name, plan.removed_roots)  # noqa: E731
        pruned, report = recovery.recover(self.original, pruned, keep, self.calibration, self.probe, self.chunk,
                                          self.recovery_settings, self.loaded.shapes,
                                          progress_bar(self.progress and in_place, f"recovering ({self.method})"),
                                          self.room())
        return pruned, report, cost

    def room(self) -> int:
        """Bytes a pass over calibration data may still hold within the budget."""
        return max(0, self.budget.total - current_rss())

    def memory(self) -> dict:
        """The budget, the peak so far, and how many chunks of calibration data were read."""
        calibration = self.calibration
        sources = {id(v.source): v.source for part in (calibration.fit, calibration.held) for v in part.values()} \
            if calibration else {}
        chunks = sum(source.reads for source in sources.values())
        return {"budget_bytes": self.budget.total, "budget": self.budget.source, "peak_bytes": peak_rss(),
                "calibration_chunks": chunks}


def prune_copy(loaded: LoadedModel, analysis, plan, in_place: bool = False) -> tuple[onnx.ModelProto, Cost]:
    """The model pruned by `plan` and its cost; `loaded` is left as it was unless `in_place`.

    In place, the graph's weights are released once exported: never both copies for long.
    """
    work = loaded if in_place else dataclasses.replace(loaded, graph=loaded.graph.copy())
    apply_plan(work, analysis, plan)
    cost = model_cost(work.graph, infer_static_shapes(work.graph, work.input_shapes))
    model = export(work.graph, work)
    if in_place:
        release_weights(work.graph)
    return model, cost


def weight_bytes(graph) -> int:
    return sum(t.values.nbytes for t in graph.tensors().values() if hasattr(t, "values"))


def calibration_for(input_shapes, types, s: Settings, wanted: bool, original: onnx.ModelProto | None, macs: int,
                 progress):
    """(the Calibration, or None and why there is none); synthetic images only when `wanted`,
    refined by inverting `original` when it is given."""
    if s.calib is not None:
        return make_calibration(s.calib, input_shapes, types, s.calib_size, s.preprocess, s.seed), ""
    if not s.synthetic:
        return None, "no --calib, and --no-synthetic"
    if not wanted:
        return None, "none needed: no recovery and no validation"
    return synthetic_calibration(input_shapes, types, s.preprocess, s.seed, model=original, macs=macs,
                                 progress=progress)


def synthetic_beside(calibration, input_shapes, types, s: Settings, original: onnx.ModelProto,
                     macs: int) -> Samples | None:
    """The built-in synthetic images distillation trains on beside the user's (`DistillSettings.synthetic`):
    their fitting samples, refined by inverting `original` where it can be; None when not asked for,
    or when the calibration is already synthetic."""
    if s.distill is None or not s.distill.synthetic or calibration is None or calibration.synthetic:
        return None
    synthetic, why = synthetic_calibration(input_shapes, types, s.preprocess, s.seed, model=original, macs=macs,
                                           progress=progress_bar(s.progress, "refining synthetic images"))
    if synthetic is None:
        raise UserInputError(f"--distill-synthetic: no synthetic images for this model ({why})")
    return next(iter(synthetic.fit.values()))


def _importance(criterion: str, analysis, loaded: LoadedModel, stats, seed: int):
    """The per-class importance of consumer- and data-aware criteria (None: `select` scores filters)."""
    if criterion in CONSUMER_AWARE:
        return consumer_aware_importance(analysis, loaded.graph, criterion, seed)
    if criterion in DATA_AWARE:
        return energy_importance(analysis, loaded.graph, stats.var)
    return None


def quality_probe(original, calibration, no_data: str, input_shapes, types, chunk: int, seed: int) -> QualityProbe:
    if calibration is not None:
        return QualityProbe(original, calibration.quality_feeds, calibration.quality_on, chunk)
    rng = np.random.default_rng(seed)  # nothing better to measure on: say so
    feeds = {name: rng.standard_normal((16, *shape[1:])).astype(types.get(name, np.float32))
             for name, shape in input_shapes.items()}
    return QualityProbe(original, feeds, f"16 random-normal inputs, nothing like real data ({no_data})", chunk)
