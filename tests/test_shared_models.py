"""The exactness oracle on every real model in ../shared at the issue's ratios."""

import pytest

from .conftest import SHARED_MODELS, shared_model
from .oracle import prune_and_compare


@pytest.mark.parametrize("name", SHARED_MODELS)
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_pruned_equals_zeroed_original(name, ratio):
    _, plan = prune_and_compare(shared_model(name), ratio)
    assert plan.removed_channels > 0


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "random"])
def test_other_criteria_are_exact_too(criterion):
    _, plan = prune_and_compare(shared_model("resnet20_cifar10.onnx"), 0.4, criterion=criterion)
    assert plan.removed_channels > 0
