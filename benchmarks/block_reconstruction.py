"""Block-wise reconstruction of EfficientNet-Lite0's inverted residuals: a recovery variant, measured, not kept.

After the default prune (`--calib`, least squares layer by layer), every block's kept expand, depthwise
and projection filters are trained together, by Adam in numpy, so that the block reproduces the
original model's output (its Add's output where it has a shortcut) from the pruned model's block input:
the "refit more than the reading layer" lever, BRECQ-style, with the nonlinearities in the objective.
Blocks go in order, each from the inputs the blocks before it now give. 440 calib images train, the
other 60 calib images measure each block's relative error (the best of its checkpoints is kept); top-1
is on the eval split. Writes benchmarks/results/block_reconstruction.md and .json.

    python -m benchmarks.block_reconstruction [--budget 0.75] [--steps 200] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnx_whc
from onnx_whc.graph.runtime import run_model

from .common import environment, environment_line, markdown_table, shared_model, write_results
from .datasets import accuracy, load_split

TRAIN = 440  # calib images the blocks train on; the rest measure them
CHECK_EVERY = 50
POSITIONS = 4096  # output positions per step


@dataclass
class Block:
    expand: onnx.NodeProto | None  # 1x1 conv, read by Clip(0, 6); None in the first block
    pad: onnx.NodeProto  # the exporter's static padding before the depthwise conv
    depthwise: onnx.NodeProto
    project: onnx.NodeProto
    input: str
    output: str  # the shortcut Add's output, else the projection's
    shortcut: bool


def blocks(model: onnx.ModelProto) -> list[Block]:
    """Lite0's blocks: [Conv -> Clip ->] Pad -> Conv(depthwise) -> Clip -> Conv [-> Add(block input)]."""
    by_output = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = []
    for project in (n for n in model.graph.node if n.op_type == "Conv" and "_project_conv" in n.name):
        depthwise = by_output[by_output[project.input[0]].input[0]]
        pad = by_output[depthwise.input[0]]
        clip = by_output.get(pad.input[0])
        expand = by_output[clip.input[0]] if clip is not None and clip.op_type == "Clip" else None
        if expand is not None and "_expand_conv" not in expand.name:
            expand = None
        block_input = expand.input[0] if expand is not None else pad.input[0]
        add = next((r for r in readers.get(project.output[0], []) if r.op_type == "Add" and block_input in r.input),
                   None)
        found.append(Block(expand, pad, depthwise, project, block_input,
                           add.output[0] if add else project.output[0], add is not None))
    return found


def tensors(model: onnx.ModelProto, names: list[str], images: np.ndarray) -> list[np.ndarray]:
    """Those tensors of the model over the images, NCHW."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    return run_model(probe, {model.graph.input[0].name: images}, 50)


def _attribute(node, name, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class Params:
    """The block's weights, NHWC-shaped: expand (Cin, E), depthwise (k, k, E), project (E, Cout), and biases."""

    def __init__(self, model: onnx.ModelProto, block: Block):
        self.init = {t.name: t for t in model.graph.initializer}
        self.block = block
        self.values = []
        if block.expand is not None:
            w, b = self._read(block.expand)
            self.values += [w[:, :, 0, 0].T.copy(), b]
        w, b = self._read(block.depthwise)
        self.values += [w[:, 0].transpose(1, 2, 0).copy(), b]
        w, b = self._read(block.project)
        self.values += [w[:, :, 0, 0].T.copy(), b]

    def _read(self, node):
        return tuple(numpy_helper.to_array(self.init[name]).astype(np.float32) for name in node.input[1:3])

    def write(self, values: list[np.ndarray]) -> None:
        shapes = [lambda w: w.T[:, :, None, None], lambda w: w.transpose(2, 0, 1)[:, None], lambda w: w.T[:, :, None, None]]
        nodes = [self.block.expand, self.block.depthwise, self.block.project]
        if self.block.expand is None:
            shapes, nodes = shapes[1:], nodes[1:]
        for number, (node, shape) in enumerate(zip(nodes, shapes)):
            for name, value in zip(node.input[1:3], (shape(values[2 * number]), values[2 * number + 1])):
                self.init[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))


def forward(x, mask, values, k, stride, size, target=None):
    """The block on padded NHWC inputs; with a target, (squared error, gradients) instead of the output."""
    expand = len(values) == 6
    if expand:
        we, be, wd, bd, wp, bp = values
        z1 = x @ we + be
        a1 = np.clip(z1, 0, 6) * mask  # the padding is applied after the expansion's Clip
    else:
        wd, bd, wp, bp = values
        a1 = x
    taps = [(i, j, (slice(None), slice(i, i + stride * size, stride), slice(j, j + stride * size, stride)))
            for i in range(k) for j in range(k)]
    z2 = np.zeros((len(x), size, size, a1.shape[-1]), np.float32) + bd
    for i, j, window in taps:
        z2 += a1[window] * wd[i, j]
    a2 = np.clip(z2, 0, 6)
    y = a2 @ wp + bp
    if target is None:
        return y
    residual = y - target
    dy = 2 * residual / residual.size
    grads_project = [a2.reshape(-1, a2.shape[-1]).T @ dy.reshape(-1, dy.shape[-1]), dy.sum((0, 1, 2))]
    dz2 = (dy @ wp.T) * ((z2 > 0) & (z2 < 6))
    gwd = np.zeros_like(wd)
    da1 = np.zeros_like(a1) if expand else None
    for i, j, window in taps:
        gwd[i, j] = (a1[window] * dz2).sum((0, 1, 2))
        if expand:
            da1[window] += dz2 * wd[i, j]
    grads = [gwd, dz2.sum((0, 1, 2))] + grads_project
    if expand:
        dz1 = da1 * mask * ((z1 > 0) & (z1 < 6))
        grads = [x.reshape(-1, x.shape[-1]).T @ dz1.reshape(-1, dz1.shape[-1]), dz1.sum((0, 1, 2))] + grads
    return float(np.square(residual).sum()), grads


class Adam:
    """Adam with steps relative to each tensor's mean magnitude (the weights' scales differ by layer)."""

    def __init__(self, values, lr):
        self.values, self.lr, self.t = values, lr, 0
        self.m = [np.zeros_like(v) for v in values]
        self.v = [np.zeros_like(v) for v in values]

    def step(self, grads):
        self.t += 1
        for value, g, m, v in zip(self.values, grads, self.m, self.v):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            value -= (self.lr * np.abs(value).mean() * (m / (1 - 0.9 ** self.t))
                      / (np.sqrt(v / (1 - 0.999 ** self.t)) + 1e-12))


def reconstruct(original, pruned, block: Block, images, steps: int, lr: float, rng) -> dict:
    start = time.perf_counter()
    pads = tensors(original, [block.pad.input[1]], images[:1])[0].astype(int)  # N, C, H, W begins, then ends
    target, = tensors(original, [block.output], images)
    x, = tensors(pruned, [block.input], images)
    if block.shortcut:
        target = target - x  # the block's branch must make up the shortcut's drift too
    x, target = x.transpose(0, 2, 3, 1), target.transpose(0, 2, 3, 1)
    height, width = x.shape[1:3]
    k, stride = _attribute(block.depthwise, "kernel_shape", None)[0], _attribute(block.depthwise, "strides", [1])[0]
    spatial = ((0, 0), (pads[2], pads[6]), (pads[3], pads[7]), (0, 0))
    x = np.pad(x, spatial)
    mask = np.pad(np.ones((1, height, width, 1), np.float32), spatial)
    size = target.shape[1]
    params = Params(pruned, block)
    values = params.values

    def held_out_error(values):
        rest = target[TRAIN:]
        error = sum(float(np.square(forward(x[i:i + 10], mask, values, k, stride, size) - rest[i - TRAIN:i - TRAIN + 10])
                          .sum()) for i in range(TRAIN, len(x), 10))
        return error / float(np.square(rest - rest.mean((0, 1, 2))).sum())

    tile = min(size, 14)
    batch = max(4, POSITIONS // (tile * tile))
    span = (tile - 1) * stride + k
    before = held_out_error(values)
    best = (before, [v.copy() for v in values])
    optimiser = Adam(values, lr)
    for step in range(steps):
        chosen = rng.integers(0, TRAIN, batch)
        oy, ox = rng.integers(0, size - tile + 1, 2)
        iy, ix = oy * stride, ox * stride
        _, grads = forward(x[chosen, iy:iy + span, ix:ix + span], mask[:, iy:iy + span, ix:ix + span], values, k,
                           stride, tile, target[chosen, oy:oy + tile, ox:ox + tile])
        optimiser.step(grads)
        if (step + 1) % CHECK_EVERY == 0:
            error = held_out_error(values)
            if error < best[0]:
                best = (error, [v.copy() for v in values])
    params.write(best[1])
    return {"block": block.project.name.split("/")[1], "kernel": k, "stride": stride, "size": size,
            "expanded": int(values[-2].shape[0]),
            "error_before": round(before, 4), "error_after": round(best[0], 4),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.75, help="fraction of the MACs kept")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps per block")
    parser.add_argument("--lr", type=float, default=1e-3, help="step, relative to each tensor's mean magnitude")
    args = parser.parse_args()
    env = environment()
    calib = np.array(load_split("imagenet", "calib")[0])
    inputs, labels = load_split("imagenet", "eval")
    start = time.perf_counter()
    pruned, report = onnx_whc.prune(shared_model("efficientnet_lite0"), target_macs=args.budget, allocate=True, recover="lsq", calib=calib,
                                    validate=False)
    prune_seconds = time.perf_counter() - start
    original = onnx.load(str(shared_model("efficientnet_lite0")))
    top1_before = accuracy(pruned.SerializeToString(), inputs, labels)
    print(f"default prune: {report.macs_kept:.3f} of the MACs, top-1 {top1_before:.1%}", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for block in blocks(pruned):
        rows.append(reconstruct(original, pruned, block, calib, args.steps, args.lr, rng))
        print(rows[-1], flush=True)
    top1_after = accuracy(pruned.SerializeToString(), inputs, labels)
    data = {"env": env, "budget": args.budget, "steps": args.steps, "lr": args.lr, "macs_kept": round(report.macs_kept, 4),
            "top1_default": top1_before, "top1_blocks": top1_after, "prune_seconds": round(prune_seconds, 1),
            "blocks_seconds": round(sum(r["seconds"] for r in rows), 1), "blocks": rows}
    table = markdown_table(["block", "kernel", "stride", "map", "expanded kept", "error after least squares",
                            "after block training", "s"],
                           [[r["block"], r["kernel"], r["stride"], r["size"], r["expanded"], r["error_before"],
                             r["error_after"], r["seconds"]] for r in rows])
    text = "\n".join([
        "# Block-wise reconstruction of EfficientNet-Lite0 (a recovery variant, not kept)", "",
        f"`python -m benchmarks.block_reconstruction --budget {args.budget} --steps {args.steps} --lr {args.lr}`; "
        + environment_line(env) + ".", "",
        __doc__.split("\n\n")[1].replace("\n", " "), "",
        f"At {report.macs_kept:.3f} of the MACs: top-1 **{top1_before:.1%}** after the default prune "
        f"({prune_seconds:.0f} s), **{top1_after:.1%}** after block training ({data['blocks_seconds']:.0f} s more), "
        f"on the {len(labels)} eval images (about ±1.5 points of noise).", "",
        "Error: squared error of the block's output over the target's variance, on the 60 held-out calib images.", "",
        table, ""])
    write_results("block_reconstruction", text, data)
    print(text)


if __name__ == "__main__":
    main()
