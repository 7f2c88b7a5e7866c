"""Channel-dependency analysis: which channels must be removed together, and which cannot.

Every channel of every activation tensor is an *atom*. A Conv's output channels are fresh
atoms; pass-through ops (activations, pools, BatchNorm, depthwise Conv...) give their output
the atoms of their input; Concat/Split/Slice/Pad/Flatten re-index them. Ops that force two
tensors to share channel indices (Add of a residual, Mul of an SE gate, grouped Conv positions)
*couple* atoms with a union-find. A coupled set of atoms is one removable channel (a *class*);
classes connected through tensors form a *group*, pruned at one rate. Atoms that cannot go
(graph inputs/outputs, blockers) are *fixed*, and fix their whole group, with the reason.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .load import LoadedModel
from .ops import POOLS, node_rule, normalize_axis, rule_for
from .reshape_target import reshape_target


@dataclass
class Space:
    """A run of fresh atoms: a Conv's filters ('conv'), zero padding ('pad') or untraceable channels ('fixed')."""

    kind: str
    node: str
    start: int
    size: int


@dataclass
class Producer:
    """A weight whose slices along `axis` create (or, depthwise, follow) channels: the filters that get scored."""

    node: gs.Node
    atoms: np.ndarray  # the atom each filter writes
    axis: int  # the weight's output-channel axis
    rows: np.ndarray | None = None  # the node's output channels this producer covers; None: all

    def channels(self) -> np.ndarray:
        return np.arange(len(self.atoms)) if self.rows is None else self.rows

    def filters(self) -> np.ndarray:
        weight = np.asarray(self.node.inputs[1].values)
        filters = np.moveaxis(weight, self.axis, 0).reshape(weight.shape[self.axis], -1)
        return filters if self.rows is None else filters[self.rows]


@dataclass
class ChannelGroup:
    id: int
    classes: np.ndarray  # root atom of each removable channel, in channel order
    producers: list[tuple[Producer, np.ndarray]]  # with the class index of each of its filters
    nodes: list[str]
    reasons: list[str]  # why the group cannot be pruned; empty when it can

    @property
    def channels(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> bool:
        return not self.reasons


@dataclass
class ChannelAnalysis:
    groups: list[ChannelGroup]
    maps: dict[str, np.ndarray]  # tensor name -> atom of each channel
    roots: np.ndarray  # atom -> root of its class
    spaces: list[Space] = field(default_factory=list)
    axes: dict[str, int] = field(default_factory=dict)  # tensor -> its channel axis, where not 1
    readers: set[str] = field(default_factory=set)  # nodes whose weights index their input's channels

    def axis(self, tensor_name: str) -> int:
        return self.axes.get(tensor_name, 1)

    def reads_channels(self, node) -> bool:
        """Whether a layer's weights index the traced channels of its input (a Conv's on axis 1, a
        MatMul's on the last axis).

        A Conv reading channels a Transpose moved elsewhere blocks them; its weights' input axis
        then runs along some other dimension, which masks and statistics must not mistake for them.
        """
        return node.name in self.readers

    def keep_mask(self, tensor_name: str, removed_roots: np.ndarray) -> np.ndarray | None:
        """Which channels of a tensor survive when the given classes are removed."""
        atoms = self.maps.get(tensor_name)
        if atoms is None:
            return None
        return ~np.isin(self.roots[atoms], removed_roots)


class _Tracer:
    """Walks the graph once, in topological order, building atoms, couplings and fixes."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.opset = loaded.opset
        self.parent: list[int] = []
        self.space_of: list[int] = []
        self.spaces: list[Space] = []
        self.fixed: dict[int, str] = {}
        self.maps: dict[str, np.ndarray] = {}
        self.axes: dict[str, int] = {}  # tensors whose channels run along an axis other than 1
        self.producers: list[Producer] = []
        self.node_spaces: dict[str, set[int]] = defaultdict(set)
        self.absorbed: set[str] = set()  # nodes a handler of an earlier node already traced
        self.readers: set[str] = set()  # nodes whose weights index the traced channels of their input
        self.weight_readers: dict[str, tuple] = {}  # weight name -> (first reader, its input and output atoms)

    # ---- atoms -------------------------------------------------------------------------------
    def new_space(self, kind: str, node: str, size: int, fixed_reason: str | None = None) -> np.ndarray:
        start = len(self.parent)
        atoms = np.arange(start, start + size, dtype=np.int64)
        self.parent.extend(atoms.tolist())
        self.space_of.extend([len(self.spaces)] * size)
        self.spaces.append(Space(kind, node, start, size))
        if fixed_reason:
            self.fix(atoms, fixed_reason)
        return atoms

    def find(self, atom: int) -> int:
        parent = self.parent
        while parent[atom] != atom:
            parent[atom] = parent[parent[atom]]
            atom = parent[atom]
        return atom

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def fix(self, atoms: np.ndarray, reason: str) -> None:
        for atom in atoms.tolist():
            self.fixed.setdefault(atom, reason)

    def share_weight(self, node: gs.Node, ins: np.ndarray | None, outs: np.ndarray | None) -> None:
        """Readers of one weight (siamese branches, a layer applied twice) lose the same channels, so
        one sliced weight serves them all: their input channels are coupled, and their output channels.
        Where one reader's channels cannot follow (untraced, or blocked), the others' stay too."""
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant):
            return
        first, first_ins, first_outs = self.weight_readers.setdefault(weight.name, (node.name, ins, outs))
        if first == node.name:
            return
        reason = f"shares its weights {weight.name} with node {first} (node {node.name})"
        for mine, theirs in ((ins, first_ins), (outs, first_outs)):
            if mine is not None and theirs is not None and len(mine) == len(theirs):
                self.couple(mine, theirs)
                self.touch(node, theirs)
            else:
                for atoms in (mine, theirs):
                    if atoms is not None:
                        self.fix(atoms, reason)

    # ---- tensors -----------------------------------------------------------------------------
    def shape(self, tensor) -> tuple | None:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.values.shape)
        return self.loaded.shapes.get(tensor.name)

    def rank(self, tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def map_of(self, tensor) -> np.ndarray | None:
        return self.maps.get(tensor.name) if tensor is not None else None

    def axis_of(self, tensor) -> int:
        """The axis a traced tensor's channels run along (1 unless a Transpose or Reshape moved them)."""
        return self.axes.get(tensor.name, 1)

    def assign(self, node: gs.Node, tensor, atoms: np.ndarray, axis: int = 1) -> None:
        self.maps[tensor.name] = atoms
        if axis != 1:
            self.axes[tensor.name] = axis
        self.touch(node, atoms)

    def reads_channels(self, node: gs.Node) -> bool:
        return node.name in self.readers

    def channels_first(self, node: gs.Node, tensor) -> bool:
        """Block the node (and say so) when it reads channels that a Transpose moved off axis 1."""
        if self.map_of(tensor) is None or self.axis_of(tensor) == 1:
            return True
        self.block(node, f"{node.op} reads channels moved to axis {self.axis_of(tensor)}")
        return False

    def touch(self, node: gs.Node, atoms: np.ndarray | None) -> None:
        if atoms is not None and len(atoms):
            self.node_spaces[node.name].update(np.unique(np.asarray(self.space_of)[atoms]).tolist())

    def opaque(self, node: gs.Node, tensor, reason: str, kind: str = "fixed", axis: int = 1) -> None:
        """Channels nobody can trace: fresh atoms, fixed, along `axis`."""
        shape = self.shape(tensor)
        if shape is not None and len(shape) > axis and isinstance(shape[axis], int) and shape[axis] > 0:
            self.assign(node, tensor, self.new_space(kind, node.name, shape[axis], reason), axis)

    def block(self, node: gs.Node, reason: str, kind: str = "fixed") -> None:
        """Fix every channel the node reads and make its outputs untraceable.

        kind="conv" keeps a blocked Conv's filters on the report as a group of their own, with the reason."""
        reason = f"{reason} (node {node.name})"
        for tensor in node.inputs:
            atoms = self.map_of(tensor)
            if atoms is not None:
                self.touch(node, atoms)
                self.fix(atoms, reason)
        first = node.inputs[0] if node.inputs and self.map_of(node.inputs[0]) is not None else None
        for tensor in node.outputs:
            # An output shaped like the input (a LayerNorm over channels-last features) keeps its channel axis.
            same = first is not None and self.shape(tensor) == self.shape(first)
            self.opaque(node, tensor, reason, kind, self.axis_of(first) if same else 1)

    def constant_values(self, node: gs.Node, index: int):
        if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant):
            return np.asarray(node.inputs[index].values)
        return None

    def has_input(self, node: gs.Node, index: int) -> bool:
        return index < len(node.inputs) and node.inputs[index].name != ""


# ---- one handler per rule kind ---------------------------------------------------------------

def _elementwise(t: _Tracer, node: gs.Node) -> None:
    atoms = t.map_of(node.inputs[0])
    if atoms is None:
        return
    if node.op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].outputs:
        return t.block(node, "MaxPool indices encode channel positions")
    axis = t.axis_of(node.inputs[0])
    if (rule_for(node.op).params or node.op in POOLS) and not t.channels_first(node, node.inputs[0]):
        return  # pools and per-channel parameters work on axis 1
    for index in rule_for(node.op).params:
        if t.has_input(node, index) and t.constant_values(node, index) is None:
            return t.block(node, f"{node.op} parameters are not constant")
    rank = t.rank(node.inputs[0])
    for out in node.outputs:
        if out is node.outputs[0] or t.rank(out) == rank:
            t.assign(node, out, atoms, axis)


def _broadcast(t: _Tracer, node: gs.Node) -> None:
    out = node.outputs[0]
    rank = t.rank(out)
    tracked = [(x, t.map_of(x)) for x in node.inputs if t.map_of(x) is not None]
    if rank is None or rank < 2:
        if tracked:
            t.block(node, f"{node.op} with an output of unknown or low rank")
        return
    axes = {t.axis_of(x) for x in node.inputs if t.map_of(x) is not None and len(t.map_of(x)) > 1}
    if len(axes) > 1:
        return t.block(node, f"{node.op} of tensors whose channels run along different axes")
    channel_axis = axes.pop() if axes else 1
    channels = t.shape(out)[channel_axis]
    atoms_list = []
    for x in node.inputs:
        shape = t.shape(x)
        if isinstance(x, gs.Constant):
            continue  # per-channel constants are sliced by surgery
        atoms = t.map_of(x)
        if atoms is None:
            axis = None if shape is None else channel_axis - (rank - len(shape))
            if shape is None or (axis is not None and 0 <= axis < len(shape) and shape[axis] != 1):
                return t.block(node, f"{node.op} with an operand whose channels cannot be traced")
            continue
        if len(shape) != rank:
            return t.block(node, f"{node.op} broadcasts tensors of different rank")
        if len(atoms) == 1 and channels != 1:
            continue  # one channel broadcast over all: couples nothing
        atoms_list.append(atoms)
    if not atoms_list:
        return t.opaque(node, out, f"{node.op} of untraced tensors")
    first = atoms_list[0]
    for atoms in atoms_list[1:]:
        if len(atoms) != len(first):
            return t.block(node, f"{node.op} operands have different channel counts")
        t.couple(first, atoms)
    for atoms in atoms_list[1:]:
        t.touch(node, atoms)
    t.assign(node, out, first, channel_axis)


def _conv(t: _Tracer, node: gs.Node) -> None:
    _traced_conv(t, node)
    t.share_weight(node, t.map_of(node.inputs[0]) if t.reads_channels(node) else None, t.map_of(node.outputs[0]))


def _traced_conv(t: _Tracer, node: gs.Node) -> None:
    x, weight, out = node.inputs[0], node.inputs[1], node.outputs[0]
    if not isinstance(weight, gs.Constant):
        return t.block(node, "Conv weights are not constant", kind="conv")
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        return t.block(node, "Conv bias is not constant", kind="conv")
    if not t.channels_first(node, x):
        return
    atoms_in = t.map_of(x)
    group = int(node.attrs.get("group", 1))
    c_out, per_group_in = weight.values.shape[0], weight.values.shape[1]
    if atoms_in is None:
        return t.opaque(node, out, "Conv input of unknown shape")
    if group > 1 and (c_out % group or len(atoms_in) != group * per_group_in):
        return t.block(node, "grouped Conv with inconsistent channel counts", kind="conv")
    t.touch(node, atoms_in)
    t.readers.add(node.name)
    if group == 1:
        atoms = t.new_space("conv", node.name, c_out)
        t.producers.append(Producer(node, atoms, 0))
        return t.assign(node, out, atoms)
    if per_group_in == 1:
        # Depthwise: each output channel follows one input channel; whole groups can go.
        atoms = np.repeat(atoms_in, c_out // group)
        t.producers.append(Producer(node, atoms, 0))
        return t.assign(node, out, atoms)
    # Grouped: keep every group the same size by removing the same positions in each.
    blocks_in = atoms_in.reshape(group, per_group_in)
    for k in range(1, group):
        t.couple(blocks_in[0], blocks_in[k])
    atoms = t.new_space("conv", node.name, c_out)
    blocks_out = atoms.reshape(group, c_out // group)
    for k in range(1, group):
        t.couple(blocks_out[0], blocks_out[k])
    t.producers.append(Producer(node, atoms, 0))
    t.assign(node, out, atoms)


def _conv_transpose(t: _Tracer, node: gs.Node) -> None:
    _traced_conv_transpose(t, node)
    t.share_weight(node, t.map_of(node.inputs[0]) if t.reads_channels(node) else None, t.map_of(node.outputs[0]))


def _traced_conv_transpose(t: _Tracer, node: gs.Node) -> None:
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant) or int(node.attrs.get("group", 1)) != 1:
        return t.block(node, "ConvTranspose with non-constant weights or groups", kind="conv")
    if not t.channels_first(node, node.inputs[0]):
        return
    t.touch(node, t.map_of(node.inputs[0]))
    if t.map_of(node.inputs[0]) is not None:
        t.readers.add(node.name)
    atoms = t.new_space("conv", node.name, weight.values.shape[1])
    t.producers.append(Producer(node, atoms, 1))
    t.assign(node, node.outputs[0], atoms)


def _pad(t: _Tracer, node: gs.Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    atoms = t.map_of(x)
    if atoms is None:
        return
    axis = t.axis_of(x)
    begin, end, ok = pad_amounts(node, t.rank(x), axis, t.opset)
    if not ok:
        return t.block(node, "Pad amounts are computed at run time")
    batch_begin, batch_end, _ = pad_amounts(node, t.rank(x), 0, t.opset)
    if batch_begin or batch_end:
        return t.block(node, "Pad on the batch axis")
    if begin == 0 and end == 0:
        return t.assign(node, out, atoms, axis)
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant" or begin < 0 or end < 0:
        return t.block(node, f"Pad in mode {mode} on the channel axis")
    padding = t.new_space("pad", node.name, begin + end)
    t.touch(node, atoms)
    t.assign(node, out, np.concatenate([padding[:begin], atoms, padding[begin:]]), axis)


def pad_amounts(node: gs.Node, rank: int, axis: int, opset: int) -> tuple[int, int, bool]:
    """(begin, end, known) padding of one axis, for every opset's way of writing pads."""
    if "pads" in node.attrs:
        pads = list(node.attrs["pads"])
        axes = list(range(rank))
    else:
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            return 0, 0, False
        pads = np.asarray(node.inputs[1].values).tolist()
        axes = list(range(rank))
        if len(node.inputs) > 3 and node.inputs[3].name:
            if not isinstance(node.inputs[3], gs.Constant):
                return 0, 0, False
            axes = [normalize_axis(int(a), rank) for a in np.asarray(node.inputs[3].values).ravel()]
    if axis not in axes:
        return 0, 0, True
    i, n = axes.index(axis), len(axes)
    return int(pads[i]), int(pads[i + n]), True


def _concat(t: _Tracer, node: gs.Node) -> None:
    out = node.outputs[0]
    rank = t.rank(out)
    axes = {t.axis_of(x) for x in node.inputs if t.map_of(x) is not None}
    if len(axes) > 1:
        return t.block(node, "Concat of tensors whose channels run along different axes")
    channel_axis = axes.pop() if axes else 1
    parts = []
    for x in node.inputs:
        atoms = t.map_of(x)
        if atoms is None:
            shape = t.shape(x)
            if shape is None or rank is None or rank < 2:
                if any(t.map_of(y) is not None for y in node.inputs):
                    return t.block(node, "Concat of tensors of unknown shape")
                return
            atoms = t.new_space("fixed", node.name, shape[channel_axis],
                                f"constant channels joined by Concat (node {node.name})")
        parts.append(atoms)
    axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
    if axis == channel_axis:
        return t.assign(node, out, np.concatenate(parts), channel_axis)
    if axis == 0 or any(len(p) != len(parts[0]) for p in parts):
        return t.block(node, f"Concat on axis {axis}")
    for p in parts[1:]:
        t.couple(parts[0], p)
        t.touch(node, p)
    t.assign(node, out, parts[0], channel_axis)


def split_sizes(node: gs.Node, channels: int) -> list[int] | None:
    """The sizes a Split produces along its axis, however the opset writes them."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        if not isinstance(node.inputs[1], gs.Constant):
            return None
        return [int(s) for s in np.asarray(node.inputs[1].values).ravel()]
    if "split" in node.attrs:
        return [int(s) for s in node.attrs["split"]]
    n = len(node.outputs)
    if "num_outputs" in node.attrs:
        n = int(node.attrs["num_outputs"])
        size = -(-channels // n)
        return [size] * (n - 1) + [channels - size * (n - 1)]
    return [channels // n] * n


def _split(t: _Tracer, node: gs.Node) -> None:
    atoms = t.map_of(node.inputs[0])
    if atoms is None:
        return
    axis = normalize_axis(int(node.attrs.get("axis", 0)), t.rank(node.inputs[0]))
    channel_axis = t.axis_of(node.inputs[0])
    if axis != channel_axis:
        if axis == 0:
            return t.block(node, "Split on the batch axis")
        for out in node.outputs:
            t.assign(node, out, atoms, channel_axis)
        return
    sizes = split_sizes(node, len(atoms))
    if sizes is None or sum(sizes) != len(atoms):
        return t.block(node, "Split sizes are computed at run time")
    offsets = np.cumsum([0] + sizes)
    for out, lo, hi in zip(node.outputs, offsets[:-1], offsets[1:]):
        t.assign(node, out, atoms[lo:hi], channel_axis)


def slice_params(node: gs.Node, rank: int) -> dict[int, tuple[int, int, int]] | None:
    """{axis: (start, end, step)} of a Slice with constant parameters, else None."""
    if "starts" in node.attrs:  # opset < 10
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes = node.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        values = []
        for index in range(1, 5):
            if index < len(node.inputs) and node.inputs[index].name:
                if not isinstance(node.inputs[index], gs.Constant):
                    return None
                values.append(np.asarray(node.inputs[index].values).ravel().tolist())
            else:
                values.append(None)
        starts, ends, axes, steps = values
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
    return {normalize_axis(int(a), rank): (int(s), int(e), int(st)) for a, s, e, st in zip(axes, starts, ends, steps)}


def _slice(t: _Tracer, node: gs.Node) -> None:
    atoms = t.map_of(node.inputs[0])
    if atoms is None:
        return
    params = slice_params(node, t.rank(node.inputs[0]))
    if params is None:
        return t.block(node, "Slice bounds are computed at run time")
    axis = t.axis_of(node.inputs[0])
    if axis not in params:
        return t.assign(node, node.outputs[0], atoms, axis)
    start, end, step = params[axis]
    if step != 1:
        return t.block(node, f"Slice with step {step} on the channel axis")
    lo, hi, _ = slice(start, end, step).indices(len(atoms))
    t.touch(node, atoms)
    t.assign(node, node.outputs[0], atoms[lo:max(lo, hi)], axis)


def _flatten(t: _Tracer, node: gs.Node) -> None:
    atoms = t.map_of(node.inputs[0])
    if atoms is None:
        return
    shape = t.shape(node.inputs[0])
    axis = normalize_axis(int(node.attrs.get("axis", 1)), len(shape))
    if axis != 1 or any(not isinstance(d, int) for d in shape[1:]):
        return t.block(node, f"Flatten on axis {axis} mixes channels with other axes")
    t.assign(node, node.outputs[0], _flattened(atoms, shape, t.axis_of(node.inputs[0])))


def _flattened(atoms: np.ndarray, shape: tuple, axis: int) -> np.ndarray:
    """The channel of every feature of (N, d1, ..., dk) flattened row-major to (N, d1 * ... * dk).

    Channels on axis 1: c * H * W + hw, each channel repeated; channels last (after a permute):
    hw * C + c, the channels tiled. Any axis: the atoms broadcast along it.
    """
    dims = [int(d) for d in shape[1:]]
    view = [1] * len(dims)
    view[axis - 1] = len(atoms)
    return np.broadcast_to(atoms.reshape(view), dims).ravel()


def _reshape(t: _Tracer, node: gs.Node) -> None:
    atoms = t.map_of(node.inputs[0])
    if atoms is None:
        return
    src, dst = t.shape(node.inputs[0]), t.shape(node.outputs[0])
    if src is None or dst is None or any(not isinstance(d, int) for d in src + dst):
        return t.block(node, "Reshape with unknown shapes")
    target = reshape_target(node)
    if target is None and _shape_source_mentions(node.inputs[1], dst[1]):
        return t.block(node, "Reshape target shape is computed at run time from the channel count")
    axis = t.axis_of(node.inputs[0])
    if axis == 1 and len(src) == 4 and len(dst) == 5 and dst[1] * dst[2] == src[1] and tuple(dst[3:]) == tuple(src[2:]) \
            and _channel_shuffle(t, node, atoms, dst[1]):
        return
    if axis == 1 and _group_norm(t, node, atoms, src, dst):
        return
    if len(dst) == 2 and dst[0] == src[0] and len(src) >= 2:
        return t.assign(node, node.outputs[0], _flattened(atoms, src, axis))
    if axis == 1 and len(dst) >= 2 and dst[:2] == src[:2] and np.prod(dst[2:]) == np.prod(src[2:]):
        return t.assign(node, node.outputs[0], atoms)
    moved = _moved_channel_axis(src, dst, axis)
    if moved is not None:  # an SE gate's 1 x C x 1 x 1 <-> 1 x 1 x 1 x C: only the axis moves
        return t.assign(node, node.outputs[0], atoms, moved)
    position = _split_position(src, dst) if axis == 1 else None
    if position is not None:
        return _split_channels(t, node, atoms, src, dst, position, target)
    merged = _merged_slices(atoms, src, dst, axis, target)
    if merged is not None:
        return t.assign(node, node.outputs[0], merged)
    t.block(node, f"Reshape {_dims(src)} -> {_dims(dst)} mixes channels")


def _dims(shape: tuple) -> str:
    return "x".join(map(str, shape))


def _same_rest(a: tuple, b: tuple) -> bool:
    """Axes a Reshape leaves alone: equal, or all of size one on both sides (1x1 maps to none)."""
    return tuple(a) == tuple(b) or all(d == 1 for d in tuple(a) + tuple(b))


def _split_position(src: tuple, dst: tuple) -> int | None:
    """The output axis of the position within each slice when a Reshape splits the channel axis
    (N, K, ...) into (N, d1, ..., dk, ...), d1 * ... * dk = K, k >= 2, the other axes left alone:
    split attention's (N, r*C, H, W) -> (N, r, C, H, W), its radix softmax's (N, r*C, 1, 1) -> (N, 1, r, C)."""
    if len(src) < 2 or len(dst) < 3 or dst[0] != src[0] or src[1] < 2:
        return None
    product = 1
    for k in range(1, len(dst)):
        product *= dst[k]
        if product == src[1] and k >= 2 and _same_rest(src[2:], dst[k + 1:]):
            return k if dst[k] > 1 else None
        if product > src[1] or product == 0:
            return None
    return None


def _split_channels(t: _Tracer, node: gs.Node, atoms: np.ndarray, src: tuple, dst: tuple, position: int,
                    target) -> None:
    """A Reshape that splits the channels into slices of dst[position]: channel i * size + p becomes
    position p of slice i (split attention's radix splits, ResNeSt's r x C).

    Position p of every slice is coupled, as a channel shuffle's groups are: the slices lose the same
    positions, so the target stays a valid split with the position axis rewritten. The output's channel
    axis is the position axis, one atom per position; the slice axes carry no channels, so whatever
    reads them (a sum or a softmax over the radix) sees whole slices, each pruned alike.
    """
    what = f"Reshape {_dims(src)} -> {_dims(dst)} splits the channels"
    if target is None:
        return t.block(node, f"{what}, and its target is computed at run time")
    if not target.known(position) or target.values[position] == 0 or 0 in target.values[1:position]:
        return t.block(node, f"{what}, and its target copies a dimension of the input")
    blocks = atoms.reshape(-1, dst[position])
    for row in blocks[1:]:
        t.couple(blocks[0], row)
    t.touch(node, atoms)
    t.assign(node, node.outputs[0], blocks[0].copy(), position)


def _merged_slices(atoms: np.ndarray, src: tuple, dst: tuple, axis: int, target) -> np.ndarray | None:
    """The channels of a Reshape that merges the slices of split channels back: (N, s1, ..., C, ...)
    with the channels on axis a >= 2 -> (N, s1 * ... * C, ...): each slice's positions in turn.
    None when this is not such a merge."""
    if axis < 2 or len(dst) < 2 or dst[0] != src[0] or dst[1] != int(np.prod(src[1:axis + 1])) \
            or not _same_rest(src[axis + 1:], dst[2:]) or target is not None and target.values[1] == 0:
        return None
    return np.tile(atoms, int(np.prod(src[1:axis])))


def _moved_channel_axis(src: tuple, dst: tuple, axis: int) -> int | None:
    """The new channel axis when a Reshape keeps the batch and every other axis is of size one."""
    channels = src[axis]
    rest_src = [d for i, d in enumerate(src[1:], 1) if i != axis]
    sized = [i for i, d in enumerate(dst[1:], 1) if d == channels]
    if dst[0] != src[0] or any(d != 1 for d in rest_src) or len(sized) != 1 or channels == 1:
        return None
    return sized[0] if all(d == 1 for i, d in enumerate(dst[1:], 1) if i != sized[0]) else None


def _only_reader(tensor, op: str) -> gs.Node | None:
    readers = list(tensor.outputs)
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def _channel_shuffle(t: _Tracer, node: gs.Node, atoms: np.ndarray, groups: int) -> bool:
    """ShuffleNet's Reshape (N, g, C/g, H, W) -> Transpose(0, 2, 1, 3, 4) -> Reshape (N, C, H, W).

    A fixed permutation: channel i * C/g + j moves to j * g + i. Every shuffle group must lose the
    same positions j for the reshapes to stay valid, so those are coupled (as in a grouped Conv).
    False when no shuffle follows (a split of the channels, traced as such).
    """
    transpose = _only_reader(node.outputs[0], "Transpose")
    merge = transpose and _only_reader(transpose.outputs[0], "Reshape")
    src = t.shape(node.inputs[0])
    if not merge or list(transpose.attrs.get("perm", [])) != [0, 2, 1, 3, 4] \
            or tuple(t.shape(merge.outputs[0]) or ()) != tuple(src):
        return False
    blocks = atoms.reshape(groups, -1)
    for k in range(1, groups):
        t.couple(blocks[0], blocks[k])
    t.touch(node, atoms)
    t.touch(transpose, atoms)
    t.absorbed.update((transpose.name, merge.name))
    t.assign(merge, merge.outputs[0], blocks.T.ravel())
    return True


def couple_groups(t: _Tracer, atoms: np.ndarray, groups: int) -> np.ndarray:
    """Couple the channels of each of `groups` consecutive groups (a GroupNorm's statistics mix them):
    a group goes whole or not at all. Returns one atom per group."""
    blocks = atoms.reshape(groups, -1)
    for k in range(1, blocks.shape[1]):
        t.couple(blocks[:, 0], blocks[:, k])
    return blocks[:, 0].copy()


def _group_norm(t: _Tracer, node: gs.Node, atoms: np.ndarray, src: tuple, dst: tuple) -> bool:
    """GroupNorm as exporters write it: Reshape (N, C, ...) -> (N, G, -1), InstanceNormalization over
    each group, Reshape back to (N, C, ...), then the per-channel scale and shift (Mul, Add).

    Each group's C/G channels are coupled: whole groups go, and the groups left are normalised as
    before. The reshaped tensors carry one atom per group (InstanceNormalization's parameters are
    per group); the Reshape back gives the channels their atoms again. False when this is not the
    pattern (one group normalises all channels together: the Reshape then mixes them).
    """
    groups = dst[1] if len(dst) == 3 else 0
    channels = src[1]
    if len(src) < 3 or dst[0] != src[0] or groups < 2 or groups > channels or channels % groups \
            or dst[2] != channels // groups * int(np.prod(src[2:])):
        return False
    norm = _only_reader(node.outputs[0], "InstanceNormalization")
    back = norm and _only_reader(norm.outputs[0], "Reshape")
    if not back or tuple(t.shape(back.outputs[0]) or ()) != tuple(src):
        return False
    per_group = couple_groups(t, atoms, groups)
    t.touch(node, atoms)
    t.assign(node, node.outputs[0], per_group)
    t.absorbed.add(back.name)
    t.assign(back, back.outputs[0], atoms)
    t.touch(back, per_group)
    return True


def _group_normalization(t: _Tracer, node: gs.Node) -> None:
    """The GroupNormalization op (opset 18: scale and bias per group; 21: per channel)."""
    atoms = t.map_of(node.inputs[0])
    if atoms is None or not t.channels_first(node, node.inputs[0]):
        return
    for index in (1, 2):
        if t.has_input(node, index) and t.constant_values(node, index) is None:
            return t.block(node, "GroupNormalization parameters are not constant")
    groups = int(node.attrs.get("num_groups", 1))
    if groups < 2 or len(atoms) % groups:
        return t.block(node, f"GroupNormalization with {groups} group{'s' if groups != 1 else ''} "
                             "normalises all its channels together")
    couple_groups(t, atoms, groups)
    t.assign(node, node.outputs[0], atoms)


def _shape_source_mentions(tensor, value: int) -> bool:
    """Whether a run-time shape computation uses the literal channel/feature count."""
    if value in (0, 1):
        return False
    stack, seen = [tensor], set()
    while stack:
        current = stack.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        if isinstance(current, gs.Constant):
            if np.any(np.asarray(current.values) == value):
                return True
            continue
        for producer in current.inputs:
            stack.extend(producer.inputs)
    return False


def gemm_output_axis(node: gs.Node) -> int:
    """The weight's axis along a Gemm's or MatMul's output features."""
    return 0 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 1


def gemm_bias_prunable(node: gs.Node, features: int) -> bool:
    """A Gemm bias that is absent, constant, and one value or one per output feature."""
    if node.op != "Gemm" or len(node.inputs) < 3 or not node.inputs[2].name:
        return True
    bias = node.inputs[2]
    if not isinstance(bias, gs.Constant):
        return False
    shape = bias.values.shape
    return all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, features))


def _gemm(t: _Tracer, node: gs.Node) -> None:
    """A fully connected layer: a Gemm on 2-D features, or a MatMul over the last axis of its input
    (a Linear on rows, or per position on a channels-last map: Keras Dense, ConvNeXt's MLP)."""
    _traced_gemm(t, node)
    t.share_weight(node, t.map_of(node.inputs[0]) if t.reads_channels(node) else None, t.map_of(node.outputs[0]))


def _traced_gemm(t: _Tracer, node: gs.Node) -> None:
    x, weight = node.inputs[0], node.inputs[1]
    atoms = t.map_of(x)
    if atoms is None:
        return t.opaque(node, node.outputs[0], f"{node.op} of an input whose features cannot be traced")
    transposed = node.op == "Gemm" and int(node.attrs.get("transA", 0))
    if transposed or not isinstance(weight, gs.Constant) or weight.values.ndim != 2:
        return t.block(node, f"{node.op} with a transposed input or weights that are not a constant matrix")
    rank = t.rank(x)
    if rank is None:
        return t.block(node, f"{node.op} over an input of unknown rank")
    if rank != 2 and (node.op == "Gemm" or t.axis_of(x) != rank - 1):
        return t.block(node, f"{node.op} over an axis of its {rank}-D input that does not carry its channels")
    t.touch(node, atoms)
    t.readers.add(node.name)
    # A fully connected layer's output features are filters like a Conv's: rows of its weight.
    axis = gemm_output_axis(node)
    features = weight.values.shape[axis]
    if not gemm_bias_prunable(node, features):
        return t.opaque(node, node.outputs[0], "Gemm bias is computed at run time or not per feature")
    out = t.new_space("conv", node.name, features)
    t.producers.append(Producer(node, out, axis))
    t.assign(node, node.outputs[0], out, rank - 1)


def _transpose(t: _Tracer, node: gs.Node) -> None:
    atoms = t.map_of(node.inputs[0])
    if atoms is None:
        return
    rank = t.rank(node.inputs[0])
    perm = [normalize_axis(int(p), rank) for p in node.attrs.get("perm", list(range(rank))[::-1])]
    if perm[0] != 0:
        return t.block(node, "Transpose moves the batch axis")
    # Channels follow their axis (NHWC round trips, a permute before a flatten).
    t.assign(node, node.outputs[0], atoms, perm.index(t.axis_of(node.inputs[0])))


def _axes(t: _Tracer, node: gs.Node, rank: int) -> list[int] | None:
    if "axes" in node.attrs:
        return [normalize_axis(int(a), rank) for a in node.attrs["axes"]]
    values = t.constant_values(node, 1)
    if values is None:
        return None if t.has_input(node, 1) else []
    return [normalize_axis(int(a), rank) for a in values.ravel()]


def _squeeze(t: _Tracer, node: gs.Node) -> None:
    atoms = t.map_of(node.inputs[0])
    if atoms is None:
        return
    out_rank = t.rank(node.outputs[0])
    rank = t.rank(node.inputs[0]) if node.op == "Squeeze" else out_rank
    axes = _axes(t, node, rank)
    axis = t.axis_of(node.inputs[0])
    if axes is None or not axes and node.op == "Squeeze" or 0 in axes or node.op == "Squeeze" and axis in axes:
        return t.block(node, f"{node.op} moves the channel axis")
    if node.op == "Squeeze":
        axis -= sum(a < axis for a in axes)
    else:
        for a in sorted(axes):  # Unsqueeze's axes index the output
            axis += a <= axis
    t.assign(node, node.outputs[0], atoms, axis)


def _reduce(t: _Tracer, node: gs.Node) -> None:
    atoms = t.map_of(node.inputs[0])
    if atoms is None:
        return
    axes = _axes(t, node, t.rank(node.inputs[0]))
    axis = t.axis_of(node.inputs[0])
    if not axes or {0, axis} & set(axes):
        return t.block(node, f"{node.op} reduces over the channel or batch axis")
    if not int(node.attrs.get("keepdims", 1)):
        axis -= sum(a < axis for a in axes)
    t.assign(node, node.outputs[0], atoms, axis)


def _resize(t: _Tracer, node: gs.Node) -> None:
    atoms = t.map_of(node.inputs[0])
    if atoms is None:
        return
    if not t.channels_first(node, node.inputs[0]):
        return
    scale_index = 1 if node.op == "Upsample" or t.opset < 11 else 2
    scales = t.constant_values(node, scale_index)
    if scales is None and "scales" in node.attrs:  # Upsample-7
        scales = np.asarray(node.attrs["scales"])
    sizes = t.constant_values(node, 3) if node.op == "Resize" and t.opset >= 11 else None
    if scales is None and t.has_input(node, scale_index):
        if not (t.has_input(node, 3) and sizes is not None):
            return t.block(node, f"{node.op} scales are computed at run time")
    if t.has_input(node, 3) and node.op == "Resize" and sizes is None:
        return t.block(node, "Resize sizes are computed at run time")
    position = resize_channel_position(node, t.rank(node.inputs[0]))
    if position is not None:
        if scales is not None and scales.size > position and scales.ravel()[position] != 1:
            return t.block(node, f"{node.op} scales the channel axis")
        if sizes is not None and sizes.size > position and sizes.ravel()[position] != len(atoms):
            return t.block(node, "Resize sizes change the channel count")
    t.assign(node, node.outputs[0], atoms)


def resize_channel_position(node: gs.Node, rank: int) -> int | None:
    """Index of the channel axis in a Resize's scales/sizes; None when its `axes` (opset 18) leave it out."""
    if "axes" not in node.attrs:
        return 1
    axes = [normalize_axis(int(a), rank) for a in node.attrs["axes"]]
    return axes.index(1) if 1 in axes else None


def _softmax(t: _Tracer, node: gs.Node) -> None:
    atoms = t.map_of(node.inputs[0])
    if atoms is None:
        return
    rank = t.rank(node.inputs[0])
    axis = normalize_axis(int(node.attrs.get("axis", -1 if t.opset >= 13 else 1)), rank)
    channel_axis = t.axis_of(node.inputs[0])
    if axis in (0, channel_axis) or t.opset < 13 and axis <= channel_axis:  # before 13: over axis and all after
        return t.block(node, f"{node.op} over the channel axis")
    t.assign(node, node.outputs[0], atoms, channel_axis)


def _layernorm(t: _Tracer, node: gs.Node) -> None:
    atoms = t.map_of(node.inputs[0])
    if atoms is None:
        return
    axis = normalize_axis(int(node.attrs.get("axis", -1)), t.rank(node.inputs[0]))
    channel_axis = t.axis_of(node.inputs[0])
    if axis <= channel_axis:  # normalises over axis and every one after it
        return t.block(node, "LayerNormalization over the channel axis")
    for out in node.outputs[:1]:
        t.assign(node, out, atoms, channel_axis)


def _shape_only(t: _Tracer, node: gs.Node) -> None:
    """Shape/Size read no channel values; what they compute adapts to the pruned model."""


def _blocker(t: _Tracer, node: gs.Node) -> None:
    t.block(node, node_rule(node).reason)


HANDLERS = {
    "elementwise": _elementwise, "broadcast": _broadcast, "conv": _conv, "conv_transpose": _conv_transpose,
    "pad": _pad, "concat": _concat, "split": _split, "slice": _slice, "flatten": _flatten,
    "reshape": _reshape, "gemm": _gemm, "matmul": _gemm, "transpose": _transpose, "squeeze": _squeeze,
    "reduce": _reduce, "resize": _resize, "softmax": _softmax, "layernorm": _layernorm,
    "groupnorm": _group_normalization,
    "shape_only": _shape_only, "blocker": _blocker,
}


def _captured_names(graph: gs.Graph) -> set[str]:
    """Outer tensors read inside a subgraph (If/Loop/Scan bodies)."""
    names = set()
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                inner = {t.name for n in value.nodes for t in n.outputs} | {t.name for t in value.inputs}
                names |= {t.name for n in value.nodes for t in n.inputs if t.name not in inner}
                names |= _captured_names(value)
    return names


def analyze_channels(loaded: LoadedModel) -> ChannelAnalysis:
    """Trace every channel through the graph and group the removable ones."""
    graph = loaded.graph
    tracer = _Tracer(loaded)
    for tensor in graph.inputs:
        shape = loaded.shapes.get(tensor.name)
        if shape is not None and len(shape) >= 2:
            tracer.maps[tensor.name] = tracer.new_space("fixed", tensor.name, shape[1],
                                                        f"comes from graph input '{tensor.name}'")
    for node in graph.nodes:
        if node.name in tracer.absorbed:
            continue
        HANDLERS[node_rule(node).kind](tracer, node)
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            captured = _captured_names(gs.Graph(nodes=[node]))
            for name in captured:
                if name in tracer.maps:
                    tracer.fix(tracer.maps[name], f"captured by a subgraph of {node.op} node {node.name}")
    for tensor in graph.outputs:
        if tensor.name in tracer.maps:
            tracer.fix(tracer.maps[tensor.name], f"feeds graph output '{tensor.name}'")
    return _build_groups(tracer)


def _pieces_by_group(producer: Producer, groups: np.ndarray) -> list[tuple[int, Producer]]:
    """Split a producer whose filters write channels of several groups (a depthwise Conv after a
    Concat of independently prunable tensors): each group scores its own filters."""
    unique = np.unique(groups)
    if len(unique) == 1:
        return [(int(unique[0]), producer)]
    return [(int(g), Producer(producer.node, producer.atoms[groups == g], producer.axis, np.flatnonzero(groups == g)))
            for g in unique.tolist()]


def _build_groups(t: _Tracer) -> ChannelAnalysis:
    roots = np.array([t.find(a) for a in range(len(t.parent))], dtype=np.int64)
    space_of = np.asarray(t.space_of, dtype=np.int64)
    # Spaces joined by any coupling form one group.
    space_parent = list(range(len(t.spaces)))

    def find_space(s):
        while space_parent[s] != s:
            space_parent[s] = space_parent[space_parent[s]]
            s = space_parent[s]
        return s

    for atom, root in zip(range(len(roots)), roots.tolist()):
        a, b = find_space(space_of[atom]), find_space(space_of[root])
        if a != b:
            space_parent[max(a, b)] = min(a, b)
    group_of_space = np.array([find_space(s) for s in range(len(t.spaces))], dtype=np.int64)

    reasons_by_root: dict[int, list[str]] = defaultdict(list)
    for atom, reason in t.fixed.items():
        reasons_by_root[int(roots[atom])].append(reason)
    producers_by_group = defaultdict(list)
    for producer in t.producers:
        for g, piece in _pieces_by_group(producer, group_of_space[space_of[producer.atoms]]):
            producers_by_group[g].append(piece)
    nodes_by_group = defaultdict(set)
    for node, spaces in t.node_spaces.items():
        for g in set(group_of_space[list(spaces)].tolist()):
            nodes_by_group[g].add(node)
    node_order = {}
    for producer in t.producers:
        node_order.setdefault(producer.node.name, len(node_order))

    groups = []
    for g in sorted(set(group_of_space.tolist())):
        atoms = np.concatenate([np.arange(s.start, s.start + s.size) for i, s in enumerate(t.spaces)
                                if group_of_space[i] == g])
        if not len(atoms):
            continue
        group_roots = roots[atoms]
        _, first = np.unique(group_roots, return_index=True)
        classes = group_roots[np.sort(first)]
        class_index = {int(r): i for i, r in enumerate(classes.tolist())}
        producers = [(p, np.array([class_index[int(r)] for r in roots[p.atoms]], dtype=np.int64))
                     for p in producers_by_group.get(g, [])]
        reasons = []
        for root in classes.tolist():
            for reason in reasons_by_root.get(root, ()):
                if reason not in reasons:
                    reasons.append(reason)
        if not producers:
            if all(t.spaces[i].kind != "conv" for i in np.flatnonzero(group_of_space == g)):
                continue  # graph inputs, constants, padding alone: nothing was ever removable
            reasons.append("no filters to score")
        nodes = sorted(nodes_by_group.get(g, ()), key=lambda n: (node_order.get(n, len(node_order)), n))
        groups.append(ChannelGroup(len(groups), classes, producers, nodes, reasons))
    return ChannelAnalysis(groups, t.maps, roots, t.spaces, t.axes, t.readers)
