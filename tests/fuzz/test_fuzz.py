"""Random CNN DAGs, pruned at random settings, must stay exact.

Each pruned model must pass the ONNX checker, run in ONNX Runtime, keep its output shapes and
equal the original with every reader of a removed channel zeroed (tests/oracle.py). The number
of examples comes from the Hypothesis profile: 'ci' by default, 'long' for a deep run
(`python -m pytest tests/fuzz --hypothesis-profile long`).
"""

from hypothesis import event, given, note

from ..oracle import prune_and_compare
from .strategies import cnn_models, prune_settings


@given(case=cnn_models(), settings=prune_settings)
def test_random_cnn_prunes_exactly(case, settings):
    model, blocks = case
    note(f"blocks: {blocks}, settings: {settings}")
    _, plan = prune_and_compare(model, **settings)
    for name in set(blocks):
        event(f"block {name}")
    event("channels removed" if plan.removed_channels else "nothing removed")
