"""Every option of a prune in one object, built once by the CLI or the API and read by each stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .data.calibration import Preprocess
from .plan.search import QualityFloor
from .plan.speed_target import SpeedTarget
from .recovery.distill import DistillSettings
from .recovery.recover import RecoverySettings


@dataclass(frozen=True)
class Settings:
    """The options of `prune` and `sweep`; `onnx_whc.prune(model, **fields)` sets any of them by name."""

    # The budget: one of a ratio (default 0.4), a MACs share, a quality floor or a speed target.
    ratio: float | None = None
    target_macs: float | None = None
    floor: QualityFloor | None = None
    speed: SpeedTarget | None = None
    # Which channels go.
    criterion: str = "auto"
    exclude: tuple[str, ...] = ()
    round_to: int | str | None = None
    seed: int = 0
    # The data the stages run on.
    input_shapes: dict[str, tuple[int, ...]] | None = None
    calib: object = None  # a folder of images, an .npy/.npz path, or arrays keyed by input name
    calib_size: int | None = None
    preprocess: Preprocess | None = None
    synthetic: bool = True
    eval_set: object = None  # a labelled image folder or CSV
    # Recovery.
    recover: str = "auto"
    allocate: bool | None = None
    recovery_settings: RecoverySettings | None = None
    distill: DistillSettings | None = None  # train the recovered model towards the original afterwards
    # Checking and measuring.
    memory: int | str | None = None  # bytes (or "4G") the prune may hold; None: a share of what is available
    validate: bool = True
    provider: str | None = None
    progress: bool = False

    def but(self, **changes) -> Settings:
        """A copy with `changes`; a name that is no option is a TypeError, as a wrong keyword is."""
        return dataclasses.replace(self, **changes)
