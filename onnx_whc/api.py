"""The Python API: `prune` and `analyze`, the stages wired in order, and atomic saving."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterable

import click
import onnx

from . import recover as recovery
from .allocate import allocated_plan
from .budget import fit_ratio
from .channel_stats import channel_stats
from .dependency import analyze_channels
from .equivalence import export, release_weights
from .errors import UserInputError, ValidationError
from .load import infer_static_shapes, load, read_model, return_freed_memory
from .metrics import model_cost
from .report import AnalysisReport, PruneReport, cost_dict, group_reports, validation_dict
from .criteria import CRITERIA
from .select import CONSUMER_AWARE, DATA_AWARE, consumer_aware_importance, energy_importance, select
from .storage import fits_protobuf, save_external
from .surgery import apply_plan
from .validate import best_providers
from .validate import validate as validate_models

DEFAULT_RATIO = 0.4
# Multiples of 8 keep ONNX Runtime's blocked CPU kernels (and GPU tensor cores) in use: ResNet-50 at
# ratio 0.4 runs 2.29x faster instead of 2.13x with 1, as fast as with 16 (2.30x) while removing more
# MACs, and narrow networks keep more of their budget (benchmarks/results/speed.md). The CLI shares it.
DEFAULT_ROUND_TO = 8


def progress_bar(enabled: bool, label: str):
    """A wrapper that shows a progress bar on stderr over an iterable, or does nothing."""

    def wrap(items: Iterable):
        items = list(items)
        if not enabled or not items:
            return items
        return _bar(items, label)

    return wrap


def _bar(items, label):
    with click.progressbar(items, label=label, file=sys.stderr, show_pos=True) as bar:
        yield from bar


def analyze(model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> AnalysisReport:
    """The channel groups of a model, what each costs and why some cannot be pruned."""
    loaded = load(model, input_shapes)
    analysis = analyze_channels(loaded)
    cost = model_cost(loaded.graph, loaded.shapes)
    groups = group_reports(analysis, loaded.shapes, cost.macs, loaded.graph)
    return AnalysisReport(groups, cost.macs, cost.params)


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


CRITERION_NAMES = ("auto", *CRITERIA, *CONSUMER_AWARE, *DATA_AWARE)


def resolve_criterion(criterion: str, has_calibration: bool) -> str:
    """`auto`: `energy` with calibration data (measured better after recovery), else the paper's WHC."""
    if criterion not in CRITERION_NAMES:
        raise UserInputError(f"unknown criterion '{criterion}' (choose from {', '.join(CRITERION_NAMES)})")
    if criterion == "auto":
        return "energy" if has_calibration else "whc"
    if criterion in DATA_AWARE and not has_calibration:
        raise UserInputError(f"--criterion {criterion} needs calibration data: give --calib")
    return criterion


def prune(
    model,
    ratio: float | None = None,
    criterion: str = "auto",
    exclude: tuple[str, ...] = (),
    round_to: int = DEFAULT_ROUND_TO,
    seed: int = 0,
    validate: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    provider: str | None = None,
    progress: bool = False,
    target_macs: float | None = None,
    recover: str = "auto",
    calib=None,
    calib_size: int | None = None,
    preprocess=None,
    allocate: bool | None = None,
    recovery_settings: recovery.RecoverySettings | None = None,
) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove floor(ratio * N) channels from every prunable group; return the model and a report.

    `model` is a path or a ModelProto (never modified). `ratio` defaults to 0.4; `target_macs=F`
    instead picks the smallest ratio whose model keeps at most a fraction F of the MACs.

    Recovery (`recover`: auto, none, bias, stats, lsq; see `onnx_whc.recover`) runs after surgery,
    before validation. `calib` is a folder of images, an .npy, an .npz or arrays keyed by input name
    (`calib_size` samples, `preprocess` a `calibration.Preprocess`). With calibration data,
    `allocate` (default on) spends the same MACs budget per group where calibration shows the least
    damage instead of one uniform ratio (see `onnx_whc.allocate`).
    """
    if ratio is not None and target_macs is not None:
        raise UserInputError("--ratio and --target-macs are mutually exclusive: give one of them")
    ratio = _check_ratio(DEFAULT_RATIO if ratio is None else ratio) if target_macs is None else None
    if validate:
        best_providers(provider)  # a wrong --provider fails now, not after the pruning
    clock = {"start": time.perf_counter()}
    loaded = load(model, input_shapes)
    return_freed_memory()
    analysis = analyze_channels(loaded)
    before = model_cost(loaded.graph, loaded.shapes)
    method = recovery.resolve_method(recover, calib is not None)
    calib = None if calib is None else recovery.calibration_data(calib, loaded.input_shapes, calib_size,
                                                                 preprocess, seed)
    allocate = calib is not None if allocate is None else allocate
    if allocate and calib is None:
        raise UserInputError("--allocate needs calibration data: give --calib")
    criterion = resolve_criterion(criterion, calib is not None)
    stats = channel_stats(loaded, analysis, calib) if allocate or criterion in DATA_AWARE else None
    importance = None
    if criterion in CONSUMER_AWARE:
        importance = consumer_aware_importance(analysis, loaded.graph, criterion, seed)
    elif criterion in DATA_AWARE:
        importance = energy_importance(analysis, loaded.graph, stats.var)
    base = CONSUMER_AWARE.get(criterion, "whc" if criterion in DATA_AWARE else criterion)  # data-aware: scores
    # come from `importance` alone, and "whc" only names the filter criterion `select` checks
    clock["analyzed"] = time.perf_counter()
    allocation = None
    if target_macs is not None:
        target_macs = _check_number(target_macs, "--target-macs", "(0, 1]")
    if allocate:
        select_args = dict(criterion=base, round_to=round_to, exclude=tuple(exclude), seed=seed, importance=importance)
        plan, allocation = allocated_plan(loaded, analysis, calib, stats, ratio, target_macs, select_args,
                                          progress_bar(progress, "measuring group sensitivity"))
    elif target_macs is None:
        plan = select(analysis, ratio, base, round_to, tuple(exclude), seed, importance=importance,
                      progress=progress_bar(progress, "scoring groups"))
    else:
        fit = fit_ratio(loaded, analysis, target_macs, base, round_to, tuple(exclude), seed,
                        progress=progress_bar(progress, "fitting the MACs budget"), importance=importance)
        ratio, plan = fit.ratio, fit.plan
    clock["selected"] = time.perf_counter()
    original_model = export(loaded.graph.copy(), loaded) if method != "none" and plan.removed_channels else None
    shapes = dict(loaded.shapes)
    groups = group_reports(analysis, loaded.shapes, before.macs, loaded.graph, plan)
    apply_plan(loaded, analysis, plan)
    after = model_cost(loaded.graph, infer_static_shapes(loaded.graph, loaded.input_shapes))
    pruned = export(loaded.graph, loaded)
    release_weights(loaded.graph)  # the exported model holds them now: never both copies for long
    clock["pruned"] = time.perf_counter()
    recovered = None
    if original_model is not None:
        settings = recovery_settings or recovery.RecoverySettings()
        settings = recovery.RecoverySettings(**{**vars(settings), "method": method, "seed": seed})
        pruned, recovered = recovery.recover(
            original_model, pruned, lambda name: analysis.keep_mask(name, plan.removed_roots), loaded.input_shapes,
            calib, settings, shapes, progress_bar(progress, f"recovering ({method})"))
        del original_model
        clock["recovered"] = time.perf_counter()
    if target_macs is not None and after.macs > target_macs * before.macs:
        chosen = "the allocated ratios keep" if ratio is None else f"ratio {ratio:g} keeps"
        raise ValidationError(f"{chosen} {after.macs / before.macs:.2%} of the MACs, "
                              f"over --target-macs {target_macs:g} (the estimate from the plan was wrong)")
    report = PruneReport(ratio, criterion, round_to, cost_dict(before), cost_dict(after), groups)
    report.target_macs = target_macs
    report.recovery = recovered
    report.allocation = allocation.to_dict() if allocation else None
    if validate and plan.removed_channels:  # an unchanged model needs no checking
        original = model if isinstance(model, onnx.ModelProto) else os.fspath(model)
        report.validation = validation_dict(validate_models(original, pruned, loaded.input_shapes, provider=provider))
        clock["validated"] = time.perf_counter()
    marks = list(clock.items())
    report.seconds = {name: round(t - marks[i][1], 4) for i, (name, t) in enumerate(marks[1:])}
    report.seconds["total"] = round(marks[-1][1] - clock["start"], 4)
    return pruned, report


@contextmanager
def _staging(folder: str):
    staging = tempfile.mkdtemp(prefix=".onnx-whc-", dir=folder)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save(model: onnx.ModelProto, path: str) -> None:
    """Write atomically: a temporary file in the target folder, then a rename.

    Models over 2 GB keep their weights in `<name>.data` beside the model.
    """
    path = os.path.abspath(path)
    folder = check_writable("-o", path)
    large = _has_external(model) or not fits_protobuf(model)
    data_name = os.path.basename(path) + ".data"
    try:
        with _staging(folder) as staging:
            staged = os.path.join(staging, os.path.basename(path))
            if large:
                save_external(model, staged, data_name)  # leaves `model` as it was
                if os.path.exists(os.path.join(staging, data_name)):  # absent when every tensor is small
                    os.replace(os.path.join(staging, data_name), os.path.join(folder, data_name))
            else:
                onnx.save(model, staged)
            os.replace(staged, path)
    except OSError as err:
        raise UserInputError(f"-o {path}: cannot write ({err.strerror or err})") from None


def check_writable(option: str, path: str) -> str:
    """The folder `path` would be written into; fails now, before any work, when it cannot be."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        state = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise UserInputError(f"{option} {path}: {folder} {state}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserInputError(f"{option} {path}: cannot write in {folder} ({err.strerror or err})") from None
    return folder


def copy_unchanged(source: str, path: str) -> None:
    """Copy the input file byte for byte (with its external data files) to `path`, atomically."""
    folder = check_writable("-o", path)
    model = onnx.load(source, load_external_data=False)
    files = []
    source_folder = os.path.dirname(os.path.abspath(source))
    if not os.path.samefile(source_folder, folder):
        locations = {dict((e.key, e.value) for e in t.external_data).get("location")
                     for t in onnx.external_data_helper._get_all_tensors(model)
                     if onnx.external_data_helper.uses_external_data(t)}
        files += [(os.path.join(source_folder, name), os.path.join(folder, name)) for name in sorted(locations)]
    files.append((source, os.path.abspath(path)))  # last: the model never points at missing data
    try:
        with _staging(folder) as staging:
            for i, (src, dst) in enumerate(files):
                staged = os.path.join(staging, str(i))
                shutil.copyfile(src, staged)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(staged, dst)
    except OSError as err:
        raise UserInputError(f"-o {path}: cannot write ({err.strerror or err})") from None


def _has_external(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def external_data_files(path: str) -> list[str]:
    """The files a model file keeps its weights in besides itself (none when it cannot be read)."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # unreadable: loading reports it properly
        return []
    folder = os.path.dirname(os.path.abspath(path))
    locations = {dict((e.key, e.value) for e in t.external_data).get("location", "")
                 for t in onnx.external_data_helper._get_all_tensors(model)
                 if onnx.external_data_helper.uses_external_data(t)}
    return [os.path.join(folder, name) for name in sorted(locations)]


__all__ = ["analyze", "prune", "save", "read_model"]
