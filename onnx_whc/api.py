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

from .dependency import analyze_channels
from .equivalence import export
from .errors import UserInputError
from .load import infer_static_shapes, load, read_model
from .metrics import model_cost
from .report import AnalysisReport, PruneReport, cost_dict, group_reports, validation_dict
from .select import select
from .surgery import apply_plan
from .validate import validate as validate_models

_PROTO_LIMIT = 2_000_000_000


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


def _check_ratio(ratio) -> float:
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise UserInputError(f"--ratio must be a number in [0, 1), got '{ratio}'") from None
    if not 0.0 <= value < 1.0:
        raise UserInputError(f"--ratio must be in [0, 1), got {value:g}")
    return value


def prune(
    model,
    ratio: float = 0.4,
    criterion: str = "whc",
    exclude: tuple[str, ...] = (),
    round_to: int = 1,
    seed: int = 0,
    validate: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    provider: str | None = None,
    progress: bool = False,
) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove floor(ratio * N) channels from every prunable group; return the model and a report.

    `model` is a path or a ModelProto (never modified).
    """
    ratio = _check_ratio(ratio)
    clock = {"start": time.perf_counter()}
    loaded = load(model, input_shapes)
    analysis = analyze_channels(loaded)
    before = model_cost(loaded.graph, loaded.shapes)
    clock["analyzed"] = time.perf_counter()
    plan = select(analysis, ratio, criterion, round_to, tuple(exclude), seed,
                  progress=progress_bar(progress, "scoring groups"))
    clock["selected"] = time.perf_counter()
    groups = group_reports(analysis, loaded.shapes, before.macs, loaded.graph, plan)
    apply_plan(loaded, analysis, plan)
    pruned = export(loaded.graph, loaded)
    after = model_cost(loaded.graph, infer_static_shapes(loaded.graph, loaded.input_shapes))
    clock["pruned"] = time.perf_counter()
    report = PruneReport(ratio, criterion, round_to, cost_dict(before), cost_dict(after), groups)
    if validate:
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
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise UserInputError(f"-o {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserInputError(f"-o {path}: folder {folder} is not writable")
    large = model.ByteSize() >= _PROTO_LIMIT if not _has_external(model) else True
    data_name = os.path.basename(path) + ".data"
    with _staging(folder) as staging:
        staged = os.path.join(staging, os.path.basename(path))
        if large:
            onnx.save(model, staged, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
            os.replace(os.path.join(staging, data_name), os.path.join(folder, data_name))
        else:
            onnx.save(model, staged)
        os.replace(staged, path)


def _has_external(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


__all__ = ["analyze", "prune", "save", "read_model"]
