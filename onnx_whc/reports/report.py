"""What a prune or an analysis did, as data, as JSON and as a short terminal summary."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from ..graph.dependency import ChannelAnalysis
from ..graph.memory import format_size
from ..graph.plan import PrunePlan
from ..measure.metrics import Cost, node_macs
from ..measure.quality import OutputQuality
from ..measure.validate import Validation


@dataclass
class GroupReport:
    id: int
    channels: int
    producers: list[str]
    nodes: list[str]
    macs_share: float
    prunable: bool
    reasons: list[str]
    removed: list[int] = field(default_factory=list)  # class indices, in the group's channel order
    kept_by_layer: dict[str, list[int]] = field(default_factory=dict)  # original output-channel indices kept
    removed_by_layer: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class AnalysisReport:
    groups: list[GroupReport]
    macs: int
    params: int
    probe_sizes: dict[str, str] = field(default_factory=dict)  # dynamic image inputs: the size measured
    # The MACs of the layers that read or write channels of a prunable group, over the model's: what
    # pruning can cut into (each group's macs_share counts the layers writing its channels).
    prunable_macs_share: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{len(self.groups)} channel groups, {sum(g.prunable for g in self.groups)} prunable; "
                 f"{self.macs / 1e6:.1f} M MACs, {self.params / 1e6:.3f} M params; "
                 f"{100 * self.prunable_macs_share:.1f}% of the MACs in layers with prunable channels"]
        lines += [f"size: {note}" for note in self.probe_sizes.values()]
        for g in self.groups:
            state = "prunable" if g.prunable else "fixed: " + "; ".join(g.reasons[:2])
            members = ", ".join(g.producers[:3]) + (f" (+{len(g.producers) - 3})" if len(g.producers) > 3 else "")
            lines.append(f"  group {g.id:3d}  {g.channels:5d} ch  {100 * g.macs_share:5.1f}% MACs  "
                         f"{members or '-'}  [{state}]")
        return "\n".join(lines)


@dataclass
class PruneReport:
    ratio: float | None
    criterion: str
    round_to: int | str  # a multiple, or "measured" (then `widths` says what was measured)
    before: dict
    after: dict
    groups: list[GroupReport]
    validation: dict | None = None
    recovery: dict | None = None
    seconds: dict = field(default_factory=dict)
    target_macs: float | None = None  # the MACs budget the ratio was chosen for, if any
    allocation: dict | None = None  # per-group ratios chosen from calibration sensitivity (--allocate)
    calibration: str | None = None  # what data drove allocation and recovery, or why there was none
    quality: dict | None = None  # output name -> {"kind", "metric", "value", "cosine", ...} (onnx_whc.measure.quality)
    quality_on: str | None = None  # the inputs quality was measured on
    quality_samples: str | None = None  # the same, without repeating the calibration data's description
    warning: str | None = None  # one line for stderr when the quality falls below its threshold
    caveat: str | None = None  # one line for stderr when quality was measured on synthetic images
    search: dict | None = None  # --min-agreement / --min-r2: every probe of the budget search
    top1: dict | None = None  # --eval: {"before", "after", "on"} on the user's labelled images
    probe_sizes: dict[str, str] = field(default_factory=dict)  # dynamic image inputs: the size measured
    speed: dict | None = None  # --target-speedup / --target-latency: every timed probe, and the final check
    widths: dict | None = None  # --round-to measured: each group's latency steps, and what the timing cost
    distill: dict | None = None  # --distill: steps, views, seconds, provider, the held-out measure and its curve
    distill_summary: str | None = None
    memory: dict | None = None  # the budget, the process's peak, the chunks of calibration data read

    @property
    def removed_channels(self) -> int:
        return sum(len(g.removed) for g in self.groups)

    @property
    def macs_kept(self) -> float:
        return self.after["macs"] / self.before["macs"] if self.before["macs"] else 1.0

    @property
    def params_kept(self) -> float:
        return self.after["params"] / self.before["params"] if self.before["params"] else 1.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("quality_samples")  # quality_on says it in full
        data.pop("distill_summary")  # distill holds its numbers
        data["macs_kept"], data["params_kept"] = self.macs_kept, self.params_kept
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        pruned = [g for g in self.groups if g.removed]
        lines = [
            f"pruned {sum(len(g.removed) for g in pruned)} channels in {len(pruned)} of {len(self.groups)} groups "
            f"({self.criterion}, ratio {self.ratio})",
            f"MACs   {self.before['macs'] / 1e6:10.2f} M -> {self.after['macs'] / 1e6:10.2f} M  "
            f"({100 * (1 - self.macs_kept):.1f}% fewer)",
            f"params {self.before['params'] / 1e6:10.3f} M -> {self.after['params'] / 1e6:10.3f} M  "
            f"({100 * (1 - self.params_kept):.1f}% fewer)",
        ]
        if self.target_macs is not None:
            chose = "allocated per group" if self.ratio is None else f"chose ratio {self.ratio:g}"
            lines.append(f"target MACs {self.target_macs:.1%}: {chose}, keeps {self.macs_kept:.2%}")
        lines += [f"size: {note}" for note in self.probe_sizes.values()]
        if self.widths:
            w = self.widths
            failed = (f", {len(w['groups_failed'])} could not be timed (their counts are not rounded)"
                      if w["groups_failed"] else "")
            lines.append(f"widths: measured steps on {w['runtime'].split('|')[0]} for "
                         f"{w['groups_measured'] + w['groups_cached']} groups ({w['groups_measured']} timed in "
                         f"{w['seconds']:.1f} s, {w['groups_cached']} from the cache){failed}")
        fixed = [g for g in self.groups if not g.prunable]
        if fixed:
            lines.append(f"{len(fixed)} groups left whole, e.g. group {fixed[0].id}: {fixed[0].reasons[0]}")
        if self.allocation:
            ratios = self.allocation["ratios"]
            lines.append(f"allocated by calibration sensitivity: {len(ratios)} groups pruned, ratios "
                         f"{min(ratios.values(), default=0):g}..{max(ratios.values(), default=0):g}")
        if self.search:
            probes = ", ".join(f"{p['macs_kept']:.1%} {'ok' if p['passed'] else 'below'}" for p in self.search["probes"])
            lines.append(f"quality floor {self.search['floor_text']}: {len(self.search['probes'])} probes "
                         f"(MACs kept: {probes}); chose {self.search['chosen_macs_kept']:.1%}")
        if self.speed:
            s = self.speed
            probes = ", ".join(f"{p['macs_kept']:.1%} {p['speedup']:.2f}x" for p in s["probes"])
            lines.append(f"speed target {s['target']} on {s['provider']}: {len(s['probes'])} probes (MACs kept, "
                         f"measured speedup: {probes}); chose {s['chosen_macs_kept']:.1%}, "
                         f"recovered model measured {s['final_speedup']:.2f}x ({s['final_ms']:.2f} ms)")
        lines.append(f"calibration: {self.calibration}")
        if self.recovery:
            lines.append(f"recovery {self.recovery.get('method')}: {self.recovery.get('summary', '')}")
        elif self.calibration and self.calibration.startswith("none (") and self.removed_channels:
            lines.append("recovery skipped: no calibration data (give --calib DIR)")
        if self.distill_summary:
            lines.append(f"distill: {self.distill_summary}")
        if self.quality:
            lines.append(f"quality vs the original, on {self.quality_samples or self.quality_on}:")
            for name, q in self.quality.items():
                cos = "n/a" if q["cosine"] is None else f"{q['cosine']:.4f}"
                lines.append(f"  {name}  {q['kind']:10s}  {describe(q)}  (cosine {cos})")
        if self.top1:
            lines.append(f"top-1 on {self.top1['on']}: {self.top1['before']:.2%} -> {self.top1['after']:.2%}")
        if self.validation:
            v = self.validation
            lines.append(f"latency  {v['latency_ms_before']:.2f} ms -> {v['latency_ms_after']:.2f} ms "
                         f"({v['speedup']:.2f}x, {v['provider']}, batch 1, median)")
        if self.memory:
            m = self.memory
            lines.append(f"memory: peak {format_size(m['peak_bytes'])}, budget {format_size(m['budget_bytes'])} "
                         f"({m['budget']}); calibration data read in {m['calibration_chunks']} chunks")
        return "\n".join(lines)


def describe(q: dict) -> str:
    """One output's quality from its JSON form, as `OutputQuality.describe` words it."""
    details = {k: v for k, v in q.items() if k not in ("kind", "metric", "value", "cosine")}
    return OutputQuality(q["kind"], q["metric"], q["value"], q["cosine"], details).describe()


def _channel_groups(analysis: ChannelAnalysis, group_of_root: dict[int, int], tensor) -> np.ndarray:
    """The group of each channel of a tensor (-1 where its channels belong to no reported group)."""
    atoms = analysis.maps.get(tensor.name) if tensor is not None else None
    if atoms is None:
        return np.zeros(0, np.int64)
    return np.array([group_of_root.get(int(r), -1) for r in analysis.roots[atoms].tolist()], np.int64)


def _layer_macs(analysis: ChannelAnalysis, shapes: dict, graph):
    """(MACs, the group of each output channel, the groups of the input channels it reads) of every
    Conv, ConvTranspose, Gemm and MatMul."""
    group_of_root = {int(r): g.id for g in analysis.groups for r in g.classes.tolist()}
    for node in graph.nodes:
        macs = node_macs(node, shapes)
        if macs:
            reads = _channel_groups(analysis, group_of_root, node.inputs[0]) if analysis.reads_channels(node) \
                else np.zeros(0, np.int64)
            yield macs, _channel_groups(analysis, group_of_root, node.outputs[0]), reads


def macs_by_group(analysis: ChannelAnalysis, shapes: dict, graph) -> dict[int, float]:
    """Each layer's MACs counted once, in the group of its output channels (its filters; a depthwise
    Conv's follow its input), split by channel count when they belong to several groups. Layers whose
    outputs belong to no group (a MatMul of two activations) count in none: the groups' shares of
    the model's MACs add up to at most 1."""
    macs = defaultdict(float)
    for layer, writes, _ in _layer_macs(analysis, shapes, graph):
        for g, count in zip(*np.unique(writes[writes >= 0], return_counts=True)):
            macs[int(g)] += layer * int(count) / len(writes)
    return dict(macs)


def prunable_macs_share(analysis: ChannelAnalysis, shapes: dict, total_macs: int, graph) -> float:
    """The share of the model's MACs in layers that read or write channels of at least one prunable
    group: the layers pruning can make cheaper."""
    prunable = {g.id for g in analysis.groups if g.prunable}
    macs = sum(layer for layer, writes, reads in _layer_macs(analysis, shapes, graph)
               if prunable.intersection(writes.tolist()) or prunable.intersection(reads.tolist()))
    return macs / total_macs if total_macs else 0.0


def group_reports(analysis: ChannelAnalysis, shapes: dict, total_macs: int, graph,
                  plan: PrunePlan | None = None) -> list[GroupReport]:
    """Every group: its members, its share of the MACs (`macs_by_group`), why it is fixed, what went."""
    by_group = macs_by_group(analysis, shapes, graph)
    decisions = {d.group.id: d for d in plan.decisions} if plan else {}
    reports = []
    for group in analysis.groups:
        macs = by_group.get(group.id, 0.0)
        decision = decisions.get(group.id)
        reasons = list(group.reasons) or ([decision.skipped] if decision and decision.skipped else [])
        report = GroupReport(
            id=group.id,
            channels=group.channels,
            producers=[p.node.name for p, _ in group.producers],
            nodes=list(group.nodes),
            macs_share=macs / total_macs if total_macs else 0.0,
            prunable=not reasons,
            reasons=reasons,
        )
        if decision is not None and len(decision.removed):
            report.removed = decision.removed.tolist()
            gone = set(report.removed)
            for producer, class_index in group.producers:  # a node split over groups appears once per group
                name, channels = producer.node.name, producer.channels().tolist()
                kept = report.kept_by_layer.setdefault(name, [])
                kept += [ch for ch, c in zip(channels, class_index.tolist()) if c not in gone]
                dropped = report.removed_by_layer.setdefault(name, [])
                dropped += [ch for ch, c in zip(channels, class_index.tolist()) if c in gone]
        reports.append(report)
    return reports


def cost_dict(cost: Cost) -> dict:
    return {"macs": cost.macs, "params": cost.params}


def validation_dict(v: Validation) -> dict:
    data = asdict(v)
    data["speedup"] = v.speedup
    return data


@dataclass
class SweepRow:
    budget: float  # MACs budget asked for
    macs_kept: float  # what the pruned model keeps
    latency_ms_before: float
    latency_ms_after: float
    quality: dict  # as PruneReport.quality
    top1: float | None  # on the labelled set, when given
    seconds: float


@dataclass
class SweepReport:
    rows: list[SweepRow]
    quality_on: str
    calibration: str
    provider: str
    top1_original: float | None = None
    top1_on: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        outputs = list(self.rows[0].quality) if self.rows else []
        header = ["budget", "MACs kept", "latency ms", "speedup", *[f"{o} ({self.rows[0].quality[o]['metric']})"
                                                                      for o in outputs], "cosine", "seconds"]
        if self.top1_on:
            header.insert(4, "top-1")
        lines = ["# Sweep: quality and speed by MACs budget", "",
                 f"Quality vs the original on {self.quality_on}; calibration: {self.calibration}; latency: "
                 f"{self.provider}, batch 1, median (original {self.rows[0].latency_ms_before:.2f} ms)."
                 if self.rows else "", ""]
        if self.top1_on:
            lines += [f"Top-1 on {self.top1_on}: original {self.top1_original:.2%}.", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in self.rows:
            cells = [f"{r.budget:g}", f"{r.macs_kept:.3f}", f"{r.latency_ms_after:.2f}",
                     f"{r.latency_ms_before / r.latency_ms_after:.2f}x",
                     *[describe(r.quality[o]) for o in outputs],
                     ", ".join("n/a" if q["cosine"] is None else f"{q['cosine']:.4f}" for q in r.quality.values()),
                     f"{r.seconds:.1f}"]
            if self.top1_on:
                cells.insert(4, f"{r.top1:.2%}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> None:
        """Quality (and top-1) against MACs kept and against latency: pick the operating point from it."""
        from .plot import line_charts

        series = {f"{output} {q['metric']}": [(row, row.quality[output]["value"]) for row in self.rows]
                  for output, q in (self.rows[0].quality if self.rows else {}).items()}
        if self.top1_on:
            series["top-1"] = [(row, row.top1) for row in self.rows]
        by_macs = {k: [(row.macs_kept, v) for row, v in pts] for k, pts in series.items()}
        by_latency = {k: [(row.latency_ms_after, v) for row, v in pts] for k, pts in series.items()}
        line_charts([{"x": "share of MACs kept", "y": "quality vs original", "series": by_macs},
                     {"x": f"latency ms ({self.provider}, batch 1)", "y": "quality vs original", "series": by_latency}],
                    path, f"quality on {self.quality_on}")
