"""Hypothesis strategies for random CNN DAGs built from the patterns the pruner supports.

A model is a random sequence of blocks, each applied to a random live tensor: conv layers
(plain, depthwise, grouped, with BatchNorm and activations), residual adds (identity and
option-A strided-slice + channel-pad shortcuts), concats, channel splits, SE gates, pooling,
upsampling, NHWC round trips, channel shuffles, GroupNorms and split attention (ResNeSt). Every
tensor left unread at the end becomes a graph output, raw or through a head (global pool or plain
flatten, or a permute and flatten into hidden fully connected layers, then Gemm or MatMul). Opsets
13 to 18.
"""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np

from .builder import ACTIVATIONS, Net

CRITERIA = ("whc", "l1", "l2", "fpgm", "random")
MAX_CHANNELS = 16


class _Graph:
    """The net under construction plus the tensors blocks may read and which were read."""

    def __init__(self, net: Net, first: str):
        self.net = net
        self.live = [first]
        self.read: set[str] = set()

    def pick(self, draw, where=lambda shape: True) -> str | None:
        choices = [x for x in self.live if where(self.net.shape[x])]
        return draw(st.sampled_from(choices)) if choices else None

    def take(self, x: str) -> str:
        self.read.add(x)
        return x

    def put(self, x: str) -> str:
        self.live.append(x)
        return x


def _conv_layer(draw, g: _Graph, x: str, c_out: int, stride: int = 1) -> str:
    net = g.net
    y = net.conv(x, c_out, k=draw(st.sampled_from([1, 3])), stride=stride, bias=draw(st.booleans()))
    if draw(st.booleans()):
        y = net.bn(y)
    if draw(st.booleans()):
        y = net.act(y, draw(st.sampled_from(ACTIVATIONS)))
    return y


def _stride(draw, shape) -> int:
    return draw(st.sampled_from([1, 2])) if shape[1] >= 4 else 1


def conv(draw, g: _Graph) -> None:
    x = g.pick(draw)
    c_out = draw(st.integers(1, MAX_CHANNELS))
    g.put(_conv_layer(draw, g, g.take(x), c_out, _stride(draw, g.net.shape[x])))


def depthwise(draw, g: _Graph) -> None:
    x = g.pick(draw)
    c = g.net.shape[x][0]
    multiplier = draw(st.integers(1, 2))
    y = g.net.conv(g.take(x), c * multiplier, k=3, stride=_stride(draw, g.net.shape[x]), group=c)
    g.put(g.net.act(y, draw(st.sampled_from(ACTIVATIONS))))


def grouped(draw, g: _Graph) -> None:
    x = g.pick(draw, lambda s: s[0] >= 4 and any(s[0] % k == 0 for k in (2, 3)))
    if x is None:
        return conv(draw, g)
    c = g.net.shape[x][0]
    groups = draw(st.sampled_from([k for k in (2, 3, 4) if c % k == 0 and k < c]))
    c_out = groups * draw(st.integers(1, MAX_CHANNELS // groups))
    g.put(g.net.conv(g.take(x), c_out, k=3, group=groups))


def residual(draw, g: _Graph) -> None:
    """x + f(x): an identity shortcut, or option A (strided slice, zero channels) when downsampling."""
    x = g.pick(draw)
    net = g.net
    c, h, _ = net.shape[x]
    mid = _conv_layer(draw, g, g.take(x), draw(st.integers(1, MAX_CHANNELS)))
    if h >= 4 and draw(st.booleans()):
        before, after = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        main = net.conv(mid, c + before + after, k=3, stride=2)
        shortcut = net.pad_channels(net.subsample(x), before, after, with_axes=draw(st.booleans()))
    else:
        main, shortcut = net.conv(mid, c, k=3), x
    g.put(net.act(net.add(main, shortcut), "Relu"))


def add_two(draw, g: _Graph) -> None:
    """Add two live tensors of the same shape (a DAG join), else a residual block."""
    x = g.pick(draw)
    partners = [y for y in g.live if y != x and g.net.shape[y] == g.net.shape[x]]
    if not partners:
        return residual(draw, g)
    y = draw(st.sampled_from(partners))
    g.put(g.net.add(g.take(x), g.take(y)))


def concat(draw, g: _Graph) -> None:
    x = g.pick(draw)
    partners = [y for y in g.live if g.net.shape[y][1:] == g.net.shape[x][1:]]
    y = draw(st.sampled_from(partners))
    if y == x:
        y = _conv_layer(draw, g, x, draw(st.integers(1, MAX_CHANNELS)))
    g.put(g.net.concat([g.take(x), g.take(y)]))


def split(draw, g: _Graph) -> None:
    x = g.pick(draw, lambda s: s[0] >= 2)
    if x is None:
        return conv(draw, g)
    c = g.net.shape[x][0]
    parts = draw(st.integers(2, min(3, c)))
    equal = c % parts == 0 and draw(st.booleans())
    if equal:
        sizes = [c // parts] * parts
    else:
        cuts = sorted(draw(st.permutations(range(1, c)))[:parts - 1])
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [c])]
    outs = g.net.split(g.take(x), sizes, by_count=equal)
    for out in outs:
        if draw(st.booleans()):
            out = _conv_layer(draw, g, out, draw(st.integers(1, MAX_CHANNELS)))
        g.put(out)


def se_gate(draw, g: _Graph) -> None:
    x = g.pick(draw)
    g.put(g.net.se(g.take(x), draw(st.integers(1, 4)), reduce=draw(st.booleans())))


def pool(draw, g: _Graph) -> None:
    x = g.pick(draw, lambda s: s[1] >= 2 and s[2] >= 2)
    if x is None:
        return conv(draw, g)
    g.put(g.net.pool(g.take(x), draw(st.sampled_from(["MaxPool", "AveragePool"]))))


def upsample(draw, g: _Graph) -> None:
    x = g.pick(draw, lambda s: s[1] <= 8)
    if x is None:
        return pool(draw, g)
    g.put(g.net.upsample(g.take(x)))


def nhwc_round_trip(draw, g: _Graph) -> None:
    """tf2onnx's layout round trip: to NHWC, an activation and per-channel scale there, back to NCHW."""
    x = g.pick(draw)
    net = g.net
    c, h, w = net.shape[x]
    y = net.node("Transpose", [g.take(x)], (h, w, c), perm=[0, 2, 3, 1])
    y = net.node(draw(st.sampled_from(["Relu", "Sigmoid", "Tanh"])), [y], (h, w, c))
    if draw(st.booleans()):
        y = net.node("Mul", [y, net.const(net.rng.uniform(0.5, 1.5, c).astype(np.float32), "nhwc_scale")], (h, w, c))
    g.put(net.node("Transpose", [y], (c, h, w), perm=[0, 3, 1, 2]))


def nhwc_mlp(draw, g: _Graph) -> None:
    """A Linear per position on a channels-last map (Keras Dense, ConvNeXt's MLP): to NHWC, MatMul over the
    channels (+ bias), an activation, MatMul back to C or another width (+ bias), to NCHW; perhaps residual."""
    x = g.pick(draw)
    net = g.net
    c, h, w = net.shape[x]
    source = g.take(x)
    y = net.node("Transpose", [source], (h, w, c), perm=[0, 2, 3, 1])
    widths = [draw(st.integers(1, MAX_CHANNELS)), draw(st.sampled_from([c, draw(st.integers(1, MAX_CHANNELS))]))]
    for index, width in enumerate(widths):
        features = net.shape[y][-1]
        y = net.node("MatMul", [y, net.const(net.weight((features, width), features), "lin")], (h, w, width))
        if draw(st.booleans()):
            y = net.node("Add", [y, net.const(net.rng.normal(0, 0.1, width).astype(np.float32), "linb")], (h, w, width))
        if index == 0:
            y = net.act(y, draw(st.sampled_from(ACTIVATIONS)))
    y = net.node("Transpose", [y], (widths[1], h, w), perm=[0, 3, 1, 2])
    g.put(net.add(source, y) if widths[1] == c and draw(st.booleans()) else y)


def shuffle(draw, g: _Graph) -> None:
    """ShuffleNet's channel shuffle: Reshape (g, C/g), Transpose(0, 2, 1, 3, 4), Reshape back."""
    x = g.pick(draw, lambda s: any(s[0] % k == 0 and k < s[0] for k in (2, 3, 4)))
    if x is None:
        return conv(draw, g)
    net = g.net
    c, h, w = net.shape[x]
    groups = draw(st.sampled_from([k for k in (2, 3, 4) if c % k == 0 and k < c]))
    y = net.node("Reshape", [g.take(x), net.ints([0, groups, c // groups, h, w])], (groups, c // groups, h, w))
    y = net.node("Transpose", [y], (c // groups, groups, h, w), perm=[0, 2, 1, 3, 4])
    g.put(net.node("Reshape", [y, net.ints([0, c, h, w])], (c, h, w)))


def group_norm(draw, g: _Graph) -> None:
    """GroupNorm as exporters write it (Reshape (N, G, -1), InstanceNormalization, Reshape back,
    per-channel Mul and Add), G dividing the channels; one group blocks them."""
    x = g.pick(draw, lambda s: len(s) == 3)
    if x is None:
        return conv(draw, g)
    net = g.net
    c = net.shape[x][0]
    groups = draw(st.sampled_from([k for k in range(1, c + 1) if c % k == 0]))
    y = net.group_norm(g.take(x), groups)
    g.put(net.act(y, draw(st.sampled_from(ACTIVATIONS))) if draw(st.booleans()) else y)


def split_attention(draw, g: _Graph) -> None:
    """Split attention (ResNeSt): radix slices of a grouped conv, weighed by a softmax over the radix and
    summed, as timm exports it (5-D Reshape, ReduceSum) or as ResNeSt's own code does (Split, Add)."""
    radix = draw(st.sampled_from([2, 3, 4]))
    cardinality = draw(st.sampled_from([1, 1, 2]))
    x = g.pick(draw, lambda s: len(s) == 3 and s[0] % (radix * cardinality) == 0)
    if x is None:
        return conv(draw, g)
    channels = cardinality * draw(st.integers(1, MAX_CHANNELS // (radix * cardinality)))
    attn = cardinality * draw(st.integers(1, 4))
    y = g.net.split_attention(g.take(x), channels, radix, cardinality, attn, cut=draw(st.booleans()))
    g.put(g.net.act(y, "Relu") if draw(st.booleans()) else y)


BLOCKS = {
    "conv": conv, "depthwise": depthwise, "grouped": grouped, "residual": residual, "add": add_two,
    "concat": concat, "split": split, "se": se_gate, "pool": pool, "upsample": upsample,
    "nhwc": nhwc_round_trip, "shuffle": shuffle, "nhwc_mlp": nhwc_mlp, "group_norm": group_norm,
    "split_attention": split_attention,
}


def _finish(draw, g: _Graph, x: str) -> None:
    """Make an unread tensor a graph output: raw (its channels stay) or through a classifier head."""
    net = g.net
    kind = draw(st.sampled_from(["raw", "pool_gemm", "reduce_matmul", "flatten_gemm", "permute_flatten_gemms"]))
    if kind == "raw":
        net.output(x)
    elif kind == "flatten_gemm":
        net.output(net.gemm(net.flatten(x), draw(st.integers(1, 6))))
    elif kind == "permute_flatten_gemms":  # Keras Permute/torch permute, Flatten, hidden Dense layers
        perm = draw(st.sampled_from([[0, 2, 3, 1], [0, 3, 2, 1]]))
        c, h, w = net.shape[x]
        y = net.node("Transpose", [x], tuple((c, h, w)[p - 1] for p in perm[1:]), perm=perm)
        y = net.flatten(y)
        for _ in range(draw(st.integers(1, 2))):
            y = net.act(net.gemm(y, draw(st.integers(1, MAX_CHANNELS)), matmul=draw(st.booleans())), "Relu")
        net.output(net.gemm(y, draw(st.integers(1, 6))))
    else:
        net.output(net.head(x, draw(st.integers(1, 6)), reduce=kind == "reduce_matmul",
                            matmul=kind == "reduce_matmul"))


@st.composite
def cnn_models(draw, max_blocks: int = 8):
    """A random CNN as (ModelProto, block names)."""
    opset = draw(st.integers(13, 18))
    net = Net(opset, seed=draw(st.integers(0, 2**16)), batch=draw(st.sampled_from(["N", 1])))
    size = draw(st.sampled_from([4, 6, 8, 12]))
    g = _Graph(net, net.input(draw(st.integers(1, 4)), size, size))
    names = draw(st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=max_blocks))
    conv(draw, g)  # the input's own channels are fixed: start with something to prune
    for name in names:
        BLOCKS[name](draw, g)
    for x in g.live:
        if x not in g.read:
            _finish(draw, g, x)
    return net.model(), ["conv", *names]


prune_settings = st.fixed_dictionaries({
    "ratio": st.one_of(st.sampled_from([0.3, 0.5, 0.75]), st.floats(0.0, 0.9, allow_nan=False)),
    "criterion": st.sampled_from(CRITERIA),
    "round_to": st.sampled_from([1, 1, 1, 2, 3, 4, 8]),
    "seed": st.integers(0, 1000),
})
