"""A Reshape's target shape, read as one value per output axis, and rewritten after pruning.

Exporters write targets three ways: a constant; PyTorch's `x.view(x.size(0), -1)` and
paddle2onnx's flatten as a Concat of the batch read from `Shape` and constants
(`Concat(Shape(x)[0:1], Cast(200))`); or other run-time computations. The first two have one
known value per axis except the batch, so the channel rules can read them and surgery can
rewrite the constant that holds a channel count; the third is left to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class ReshapeTarget:
    values: list[int | None]  # per output axis; None: computed at run time (the batch)
    pieces: list[tuple[int, int]]  # per output axis: (Concat input index, offset in it); constant target: (-1, axis)

    def known(self, axis: int) -> bool:
        return self.values[axis] is not None


def _batch_read(tensor) -> bool:
    """Whether a run-time piece is the batch size read from a Shape (Gather/Slice of index 0, cast/unsqueezed)."""
    while isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        if node.op in ("Unsqueeze", "Cast", "Squeeze", "Identity"):
            tensor = node.inputs[0]
            continue
        if node.op in ("Gather", "Slice") and isinstance(node.inputs[0], gs.Variable) and node.inputs[0].inputs \
                and node.inputs[0].inputs[0].op == "Shape":
            index = node.inputs[1]
            start = int(np.asarray(index.values).ravel()[0]) if isinstance(index, gs.Constant) else None
            shape_node = node.inputs[0].inputs[0]
            begin = int(shape_node.attrs.get("start", 0))
            if node.op == "Slice" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                end = int(np.asarray(node.inputs[2].values).ravel()[0])
                return start == 0 and begin == 0 and end == 1
            return start == 0 and begin == 0 and node.op == "Gather"
        return False
    return False


def reshape_target(node: gs.Node) -> ReshapeTarget | None:
    """The target of a Reshape as per-axis values, or None when it is computed some other way."""
    target = node.inputs[1]
    if isinstance(target, gs.Constant):
        values = [int(v) for v in np.asarray(target.values).ravel()]
        return ReshapeTarget(values, [(-1, i) for i in range(len(values))])
    if len(target.inputs) != 1 or target.inputs[0].op != "Concat" or int(target.inputs[0].attrs.get("axis", 0)) != 0 \
            or len(target.outputs) != 1:
        return None  # other computations; or a Concat other Reshapes share, which one rewrite would change
    values, pieces = [], []
    for index, piece in enumerate(target.inputs[0].inputs):
        if isinstance(piece, gs.Constant):
            flat = np.asarray(piece.values).ravel()
            values += [int(v) for v in flat]
            pieces += [(index, k) for k in range(len(flat))]
        elif not values and _batch_read(piece):
            values.append(None)
            pieces.append((index, 0))
        else:
            return None
    return ReshapeTarget(values, pieces)


def rewrite_target(node: gs.Node, target: ReshapeTarget, changes: dict[int, int], name_for) -> None:
    """Set target values (axis -> value) in the constant that holds them; `name_for(old)` names the copy."""
    if not changes:
        return
    if target.pieces[0][0] == -1:
        values = np.asarray(node.inputs[1].values).copy().ravel()
        for axis, value in changes.items():
            values[axis] = value
        node.inputs[1] = gs.Constant(name_for(node.inputs[1].name), values.astype(np.int64))
        return
    concat = node.inputs[1].inputs[0]
    for axis, value in changes.items():
        index, offset = target.pieces[axis]
        old = concat.inputs[index]
        values = np.asarray(old.values).copy()
        flat = values.reshape(-1)
        flat[offset] = value
        concat.inputs[index] = gs.Constant(name_for(old.name), values)
