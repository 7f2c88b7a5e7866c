"""Variants of the allocation and recovery stages, measured and not kept (recovery.md, *Variants tried and not kept*).

Each is set by an environment variable and patches one stage before the prune runs:

    WHC_PROBES=0.15,0.3,0.5  the allocator's probe ratios (the largest is also the cap on any group's ratio)
    WHC_DAMAGE=kl            the allocator's damage for a classifier: mean KL divergence of the softmax
                             instead of 1 - the cosine of the logits
    WHC_RIDGE=0.1            the least-squares ridge (default 1e-3)
    WHC_MIRROR=1             recovery fits on the calibration images and their mirror images
    WHC_FORCE=13:0.25,...    prune exactly these groups at these ratios, nothing else (a diagnostic:
                             which part of the allocation costs what after recovery; run at budget 0.99)
    WHC_SIGMOID_LOW=-5       the YOLOv8n's class-score convs (read by the output's Sigmoid) fitted as if
                             read by Clip(L, inf): a logit below L costs nothing where the original's was too
"""

from __future__ import annotations

import os

import numpy as np

NAMES = ("WHC_PROBES", "WHC_DAMAGE", "WHC_RIDGE", "WHC_MIRROR", "WHC_FORCE", "WHC_SIGMOID_LOW")


def active() -> list[str]:
    """The variables set: a benchmark run under any of them prints its cells and stores none."""
    return [name for name in NAMES if os.environ.get(name)]


def apply() -> None:
    import onnx_whc.data.calibration as calibration
    import onnx_whc.measure.quality as quality
    import onnx_whc.plan.allocate as allocate
    import onnx_whc.recovery.recover as recover
    from onnx_whc.recovery.lsq import ridge_fit

    env = os.environ
    if env.get("WHC_PROBES"):
        allocate.PROBE_RATIOS = tuple(float(v) for v in env["WHC_PROBES"].split(","))
    if env.get("WHC_DAMAGE") == "kl":
        plain = quality.damage

        def kl_damage(reference, candidate, kinds):
            losses = []
            for a, b, kind in zip(reference, candidate, kinds):
                if kind.kind != "classifier":
                    losses.append(plain([a], [b], [kind]))
                    continue
                la, lb = (_log_softmax(np.moveaxis(v.astype(np.float64), kind.axis, -1)) for v in (a, b))
                losses.append(float((np.exp(la) * (la - lb)).sum(-1).mean()))
            return float(np.mean(losses)) if losses else 0.0

        allocate.damage = kl_damage
    if env.get("WHC_RIDGE"):
        value = float(env["WHC_RIDGE"])
        recover.ridge_fit_with = lambda ridge: (lambda moments, current: ridge_fit(moments, current, value))
    if env.get("WHC_MIRROR"):
        split = calibration.Calibration.of.__func__

        def mirrored(cls, samples, source, synthetic=False, seed=0):
            made = split(cls, samples, source, synthetic, seed)
            object.__setattr__(made, "fit", {k: np.concatenate([v, v[..., ::-1]]) for k, v in made.fit.items()})
            return made

        calibration.Calibration.of = classmethod(mirrored)
    if env.get("WHC_FORCE"):
        forced = {int(k): float(v) for k, v in (p.split(":") for p in env["WHC_FORCE"].split(","))}
        allocation = allocate.Allocator.allocation

        def forced_allocation(self, target):
            made = allocation(self, 0.99)
            made.ratios = dict(forced)
            return made

        allocate.Allocator.allocation = forced_allocation
    if env.get("WHC_SIGMOID_LOW"):
        low, layers_of = float(env["WHC_SIGMOID_LOW"]), recover.find_layers

        def bounded(model, keep):
            layers = layers_of(model, keep)
            for layer in layers:
                if "cv3" in layer.node and layer.node.endswith(".2/Conv"):  # YOLOv8's class-score convs
                    layer.bounds = (low, float("inf"))
            return layers

        recover.find_layers = bounded


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
