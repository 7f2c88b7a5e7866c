"""Per-group pruning ratios from calibration sensitivity, under a MACs budget (`--allocate`).

Every prunable group is pruned alone at a few ratios and the damage is measured on calibration
samples with `quality.damage`: 1 - the mean per-channel R² of dense outputs (a detector's class
scores count as much as its boxes), 1 - the cosine of a classifier's logits. Probes need no surgery: a masked
copy of the model multiplies every consumer's input by per-channel masks fed at run time (a pruned
model equals the original with the removed channels' readers zeroed; here they read the channel's
calibration mean instead, what recovery restores first). A group's probes run only the part of the
model downstream of its masks, fed from one cached run of the whole (`segments`). A greedy search
then raises, one step at a time, the ratio of the group that adds the least damage per MAC saved
(per measured millisecond saved, given the groups' timed widths), until the model keeps at most
the budget: sensitive groups (a ResNet's shared trunk) stay whole or lose little, robust ones lose more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..data.samples import subset
from ..errors import UserInputError
from ..graph.dependency import ChannelAnalysis, ChannelGroup
from ..graph.equivalence import export
from ..graph.load import LoadedModel
from ..graph.memory import most_samples, sample_bytes
from ..graph.ops import consumer_weight_axis
from ..graph.plan import PrunePlan
from ..graph.runtime import concatenated, samples_per_run, session
from ..graph.segments import Segment, cut_out, downstream, with_outputs
from ..measure.quality import damage, output_kinds
from .budget import MacsEstimator, _cached_importance
from .channel_stats import ChannelStats
from .select import excluded_by, select
from .widths import WidthSteps

PROBE_RATIOS = (0.25, 0.5, 0.75)  # measured damage; linear in between, 0 at ratio 0
STEP = 0.05  # granularity of the allocated ratios
PROBE_MACS = 2e12  # multiply-accumulates all probes may spend (about 15 s on 2 cores)
MIN_SAMPLES, MAX_SAMPLES = 32, 256  # calibration images per probe
# Large inputs carry many positions per image (a detector at 640: 8,400 anchors): where 32 images would
# cost the probes over four times their budget, 8 will do.
FEWEST_SAMPLES = 8
_MASK = "allocate_mask::"
_OFFSET = "allocate_offset::"


@dataclass
class Allocation:
    ratios: dict[int, float]  # group id -> ratio
    macs_kept: float  # estimated share of the original MACs
    damage: dict[int, list[float]] = field(default_factory=dict)  # group id -> damage at PROBE_RATIOS

    def to_dict(self) -> dict:
        return {"ratios": {str(k): v for k, v in self.ratios.items()}, "macs_kept": round(self.macs_kept, 4),
                "probe_ratios": list(PROBE_RATIOS),
                "damage": {str(k): [round(d, 5) for d in v] for k, v in self.damage.items()}}


class MaskedModel:
    """The original model with run-time channel masks in front of every consumer input.

    A removed channel is replaced by its calibration mean rather than zero: the cheapest
    recovery (every method here restores at least the mean), so a channel that is nearly
    constant, e.g. a filter of zero weights whose folded BatchNorm bias is large, costs
    nothing, as it will after recovery. `probes` are the removals `damage` will be asked about (at
    most): each gets the segment of the model its masks feed, and the tensors those segments read
    from upstream are cached from one run of the whole.
    """

    def __init__(self, loaded: LoadedModel, analysis: ChannelAnalysis, feeds: dict[str, np.ndarray],
                 means: dict[str, np.ndarray], probes: list[np.ndarray] = (), room: int | None = None):
        graph = loaded.graph.copy()
        self.analysis = analysis
        floats = [t.dtype for t in graph.inputs if t.dtype is not None and np.issubdtype(t.dtype, np.floating)]
        self.dtype = np.dtype(floats[0] if floats else np.float32)  # masks in the model's float type
        self.outputs = [t.name for t in graph.outputs]
        self.masked: dict[str, tuple[int, ...]] = {}
        masks: dict[str, gs.Variable] = {}
        for node in list(graph.nodes):
            x = node.inputs[0] if node.inputs else None
            if not consumer_weight_axis(node) or x is None or not analysis.reads_channels(node):
                continue
            if x.name not in masks:
                shape = [1] * len(loaded.shapes[x.name])
                shape[analysis.axis(x.name)] = len(analysis.maps[x.name])
                shape = tuple(shape)
                mask = gs.Variable(_MASK + x.name, dtype=self.dtype, shape=list(shape))
                offset = gs.Variable(_OFFSET + x.name, dtype=self.dtype, shape=list(shape))
                product = gs.Variable(f"{x.name}::masked", dtype=x.dtype)
                shifted = gs.Variable(f"{x.name}::shifted", dtype=x.dtype)
                graph.nodes.append(gs.Node("Mul", f"{x.name}::mask", inputs=[x, mask], outputs=[product]))
                graph.nodes.append(gs.Node("Add", f"{x.name}::offset", inputs=[product, offset], outputs=[shifted]))
                graph.inputs += [mask, offset]
                masks[x.name] = shifted
                self.masked[x.name] = shape
            node.inputs[0] = masks[x.name]
        graph.toposort()
        self.graph, self.loaded = graph, loaded
        self.means = {name: means[name].astype(self.dtype).reshape(shape) for name, shape in self.masked.items()}
        self.segments = [s for s in (self._segment(roots) for roots in probes) if s is not None]
        cut = sorted({name for s in self.segments for name in s.cut})
        count = len(next(iter(feeds.values())))
        if room is not None:  # the cut tensors and two sets of outputs are held for every sample
            per_sample = sample_bytes(loaded.shapes, cut) + 2 * sample_bytes(loaded.shapes, self.outputs)
            count = max(1, most_samples(lambda n: n * per_sample, room, count))
        self.feeds = subset(feeds, slice(None, count))  # already in the inputs' types (Calibration)
        model = export(with_outputs(graph, cut), loaded)
        self.session, self.chunk = session(model), samples_per_run(model, loaded.shapes)
        runs = list(self._chunks(self.session, self._masks(self._keeps(np.zeros(0, np.int64))), self.outputs + cut))
        self.reference = concatenated(run[:len(self.outputs)] for run in runs)
        self.cut = {name: [run[len(self.outputs) + j] for run in runs] for j, name in enumerate(cut)}
        self.dtypes = {name: parts[0].dtype for name, parts in self.cut.items()}
        self.kinds = list(output_kinds(model, dict(zip(self.outputs, self.reference))).values())
        self._open: tuple[Segment, object] | None = None  # the last segment's session: probes come group by group

    def _segment(self, removed_roots: np.ndarray) -> Segment | None:
        starts = self._starts(self._keeps(removed_roots))
        return downstream(self.graph, starts) if starts else None

    def _keeps(self, removed_roots: np.ndarray) -> dict[str, np.ndarray]:
        """Which channels of each masked tensor survive the removal."""
        return {name: self.analysis.keep_mask(name, removed_roots) for name in self.masked}

    @staticmethod
    def _starts(keeps: dict[str, np.ndarray]) -> set[str]:
        """The mask inputs in front of the tensors that lose a channel."""
        return {prefix + name for name, keep in keeps.items() if not keep.all() for prefix in (_MASK, _OFFSET)}

    def _masks(self, keeps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {}
        for name, shape in self.masked.items():
            keep = keeps[name].astype(self.dtype).reshape(shape)
            inputs[_MASK + name], inputs[_OFFSET + name] = keep, (1.0 - keep) * self.means[name]
        return inputs

    def _chunks(self, sess, masks: dict[str, np.ndarray], names: list[str], reads=None, cut=()):
        """`sess` run over the samples a chunk at a time, on the model inputs it `reads` (all by default),
        the masks and the cut tensors of that chunk."""
        count = len(next(iter(self.feeds.values())))
        for index, lo in enumerate(range(0, count, self.chunk)):
            feeds = {k: v[lo:lo + self.chunk] for k, v in self.feeds.items() if reads is None or k in reads}
            feeds.update({name: self.cut[name][index] for name in cut})
            yield sess.run(names, {**feeds, **masks})

    def damage(self, removed_roots: np.ndarray) -> float:
        """The damage with these channels replaced by their means; only what they feed is recomputed."""
        keeps = self._keeps(removed_roots)
        touched = self._starts(keeps)
        if not touched:
            return 0.0
        masks = self._masks(keeps)
        fits = [s for s in self.segments if touched <= s.starts]
        if not fits:  # a removal no prepared segment covers: the whole model
            return damage(self.reference, concatenated(self._chunks(self.session, masks, self.outputs)),
                          self.kinds)
        segment = min(fits, key=lambda s: s.nodes)
        if not segment.outputs:  # the channels feed no output
            return 0.0
        if self._open is None or self._open[0] is not segment:
            self._open = None  # one segment's session at a time
            self._open = segment, session(export(cut_out(self.graph, segment, self.dtypes), self.loaded))
        runs = self._chunks(self._open[1], {name: masks[name] for name in segment.inputs if name in masks},
                            list(segment.outputs), segment.inputs, segment.cut)
        recomputed = dict(zip(segment.outputs, concatenated(runs)))
        return damage(self.reference, [recomputed.get(name, ref) for name, ref in zip(self.outputs, self.reference)],
                      self.kinds)


def _removals(analysis: ChannelAnalysis, groups: list[ChannelGroup], ratios, select_args: dict) -> dict:
    """{(group id, ratio): removed roots} with each group pruned alone at each ratio.

    Groups are decided independently, so one `select` per ratio covers every group.
    """
    removed = {}
    ids = {g.id for g in groups}
    for ratio in ratios:
        plan = select(analysis, {gid: float(ratio) for gid in ids}, **select_args)
        for decision in plan.decisions:
            if decision.group.id in ids:
                removed[decision.group.id, float(ratio)] = decision.group.classes[decision.removed]
    return removed


class _MacsModel:
    """MACs of any combination of per-group steps, from per-tensor removed-channel counts."""

    def __init__(self, loaded, analysis, removed: dict[int, list[np.ndarray]]):
        estimator = MacsEstimator(loaded, analysis)
        self.total = estimator.total
        terms = estimator.terms
        tensors = sorted({t.reads for t in terms if t.reads} | {t.writes for t in terms})
        position = {name: i for i, name in enumerate(tensors)}
        self.width = np.array([len(analysis.maps[n]) if n in analysis.maps else 1 for n in tensors], np.float64)
        self.macs = np.array([t.macs for t in terms], np.float64)
        self.reads = np.array([position[t.reads] if t.reads else -1 for t in terms])
        self.writes = np.array([position[t.writes] for t in terms])
        # counts[g][k, tensor]: channels of the tensor gone when group g is at step k
        self.counts = {}
        for gid, steps in removed.items():
            counts = np.zeros((len(steps), len(tensors)))
            for k, roots in enumerate(steps):
                for name, i in position.items():
                    mask = analysis.keep_mask(name, roots) if len(roots) else None
                    counts[k, i] = 0 if mask is None else (~mask).sum()
            self.counts[gid] = counts

    def kept(self, state: dict[int, int]) -> float:
        gone = sum(self.counts[g][k] for g, k in state.items())
        share = 1.0 - np.asarray(gone) / self.width
        reads = np.where(self.reads >= 0, share[np.maximum(self.reads, 0)], 1.0)
        return float((self.macs * reads * share[self.writes]).sum() / self.total) if self.total else 1.0


class Allocator:
    """Damage curves measured once; then the greedy path of per-group steps, cut at any budget.

    Each step of the path raises, by one grid level, the ratio of the group adding the least
    damage per MAC saved. `allocation(target)` cuts the path where the model first keeps at most
    `target` of the MACs, so an accuracy search can try many budgets for the probing of one.
    """

    def __init__(self, loaded: LoadedModel, analysis: ChannelAnalysis, feeds: dict[str, np.ndarray],
                 select_args: dict, stats: ChannelStats, samples: int | None = None,
                 progress: Callable = lambda items: items, latency: WidthSteps | None = None,
                 room: int | None = None):
        self.select_args = {**select_args, "importance": _cached_importance(
            select_args.get("criterion", "whc"), select_args.get("seed", 0), select_args.get("importance"))}
        exclude = select_args.get("exclude", ())
        groups = [g for g in analysis.groups if g.prunable and not excluded_by(g, exclude)]
        if samples is None:  # as many as the probe budget pays for: more images, steadier damage figures
            per_image = MacsEstimator(loaded, analysis).total * len(groups) * len(PROBE_RATIOS)
            fewest = FEWEST_SAMPLES if MIN_SAMPLES * per_image > 4 * PROBE_MACS else MIN_SAMPLES
            samples = int(np.clip(PROBE_MACS // max(per_image, 1), fewest, MAX_SAMPLES))
        masked = MaskedModel(loaded, analysis, subset(feeds, slice(None, samples)), stats.mean,
                             probes=[g.classes for g in groups], room=room)
        self.samples = len(next(iter(masked.feeds.values())))
        grid = np.round(np.arange(0.0, PROBE_RATIOS[-1] + 1e-9, STEP), 4)
        removals = _removals(analysis, groups, sorted(set(grid[1:].tolist()) | set(PROBE_RATIOS)), self.select_args)
        self.damage = {group.id: [masked.damage(removals[group.id, r]) for r in PROBE_RATIOS]
                       for group in progress(groups)}
        self.levels, removed = {}, {}
        for g in groups:  # the grid ratios at which the group really loses one more channel or more
            self.levels[g.id], removed[g.id] = [0.0], [np.zeros(0, np.int64)]
            for r in grid[1:]:
                roots = removals[g.id, float(r)]
                if len(roots) > len(removed[g.id][-1]):
                    self.levels[g.id].append(float(r))
                    removed[g.id].append(roots)
        curves = {gid: np.maximum.accumulate(np.interp(self.levels[gid], (0.0,) + PROBE_RATIOS, [0.0] + d))
                  for gid, d in self.damage.items()}
        macs = _MacsModel(loaded, analysis, removed)
        saving = _latency_saving(latency, macs, removed, {g.id: g.channels for g in groups}) if latency else None
        self.path = self._greedy_path(macs, curves, saving)

    def _greedy_path(self, macs: _MacsModel, curves: dict, saving: Callable | None = None
                     ) -> list[tuple[int | None, float]]:
        """[(group stepped, MACs kept after the step)], from the unpruned model to the last possible step.

        `saving(group, level)` replaces the MACs a step saves by its measured milliseconds.
        """
        state = {gid: 0 for gid in self.levels}
        kept = macs.kept(state)
        path = [(None, kept)]
        while True:
            best, best_cost, best_kept = None, np.inf, kept
            for gid, k in state.items():
                if k + 1 >= len(self.levels[gid]):
                    continue
                trial = macs.kept({**state, gid: k + 1})
                saved = kept - trial if saving is None else saving(gid, k)
                if kept - trial <= 0 or saved <= 0:
                    continue
                cost = (curves[gid][k + 1] - curves[gid][k]) / saved
                if cost < best_cost:
                    best, best_cost, best_kept = gid, cost, trial
            if best is None:
                return path
            state[best] += 1
            kept = best_kept
            path.append((best, kept))

    @property
    def smallest(self) -> float:
        """The least share of the MACs the path reaches."""
        return self.path[-1][1]

    def allocation(self, target: float) -> Allocation:
        """Ratios per group keeping at most `target` of the MACs, the least measured damage first."""
        if not 0.0 < target <= 1.0:
            raise UserInputError(f"the MACs budget must be in (0, 1], got {target:g}")
        steps = next((i for i, (_, kept) in enumerate(self.path) if kept <= target), None)
        if steps is None:
            raise UserInputError(f"the MACs budget {target:g} is out of reach with ratios up to "
                                 f"{PROBE_RATIOS[-1]:g} per group (reached {self.smallest:.1%}); "
                                 "--no-allocate prunes every group at one ratio instead")
        state = {gid: 0 for gid in self.levels}
        for gid, _ in self.path[1:steps + 1]:
            state[gid] += 1
        ratios = {gid: self.levels[gid][k] for gid, k in state.items() if k}
        return Allocation(ratios, self.path[steps][1], self.damage)

    def plan(self, analysis: ChannelAnalysis, allocation: Allocation) -> PrunePlan:
        return select(analysis, allocation.ratios, **self.select_args)


def _latency_saving(latency: WidthSteps, macs: _MacsModel, removed: dict[int, list[np.ndarray]],
                    channels: dict[int, int]) -> Callable[[int, int], float]:
    """Milliseconds a group's step from level k to k + 1 saves, from its measured widths (`widths`).

    A group whose layers could not be timed is credited its MACs at the timed groups' rate of
    milliseconds per MAC, so it is neither free nor out of reach.
    """
    width = {gid: [channels[gid] - len(r) for r in levels] for gid, levels in removed.items()}
    timed = [gid for gid in removed if gid in latency.tables and len(removed[gid]) > 1]
    ms_saved = sum(latency.ms(g, width[g][0]) - latency.ms(g, width[g][-1]) for g in timed)
    macs_saved = sum(macs.kept({}) - macs.kept({g: len(removed[g]) - 1}) for g in timed)
    rate = ms_saved / macs_saved if macs_saved > 0 and ms_saved > 0 else 1.0

    def saving(gid: int, k: int) -> float:
        if gid in latency.tables:
            return latency.ms(gid, width[gid][k]) - latency.ms(gid, width[gid][k + 1])
        return rate * (macs.kept({gid: k}) - macs.kept({gid: k + 1}))

    return saving


def allocated_plan(loaded: LoadedModel, analysis: ChannelAnalysis, allocator: Allocator, ratio: float | None,
                   target_macs: float | None, select_args: dict) -> tuple[PrunePlan, Allocation]:
    """The plan for a budget: `target_macs`, or the MACs a uniform `ratio` would keep."""
    if target_macs is None:
        uniform = select(analysis, ratio, **select_args)
        target_macs = MacsEstimator(loaded, analysis).kept(uniform)
    allocation = allocator.allocation(target_macs)
    return allocator.plan(analysis, allocation), allocation
