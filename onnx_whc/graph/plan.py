"""Which channels a prune removes: the plan that planning writes and surgery reads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dependency import ChannelGroup


@dataclass
class GroupDecision:
    group: ChannelGroup
    removed: np.ndarray  # class indices removed, ascending
    skipped: str = ""  # why the group was left whole

    @property
    def kept(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.group.channels), self.removed)


@dataclass
class PrunePlan:
    decisions: list[GroupDecision]

    @property
    def removed_roots(self) -> np.ndarray:
        parts = [d.group.classes[d.removed] for d in self.decisions if len(d.removed)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def removed_channels(self) -> int:
        return int(sum(len(d.removed) for d in self.decisions))
