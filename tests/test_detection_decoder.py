"""The benchmark's YOLOv8 decoder and detection agreement, on hand-made arrays (no model needed)."""

import numpy as np

from benchmarks.detection import agreement, decode


def yolo_output(anchors: list[tuple[float, float, float, float, int, float]], classes: int = 18) -> np.ndarray:
    """A 1×(4+classes)×A output from (cx, cy, w, h, class, score) anchors; other class scores are 0."""
    out = np.zeros((1, 4 + classes, len(anchors)), np.float32)
    for a, (cx, cy, w, h, cls, score) in enumerate(anchors):
        out[0, :4, a] = cx, cy, w, h
        out[0, 4 + cls, a] = score
    return out


def test_nms_drops_overlapping_box_of_same_class_only():
    out = yolo_output([
        (50, 50, 20, 20, 3, 0.9),
        (52, 50, 20, 20, 3, 0.8),  # IoU 0.82 with the first, same class: suppressed
        (52, 50, 20, 20, 5, 0.7),  # same place, another class: kept
        (200, 200, 20, 20, 3, 0.2),  # below the score threshold
    ])
    (detections,) = decode(out)
    np.testing.assert_allclose(detections, [[40, 40, 60, 60, 0.9, 3], [42, 40, 62, 60, 0.7, 5]], rtol=1e-6)


def test_identical_detections_agree_fully():
    dets = [np.array([[0, 0, 10, 10, 0.9, 1], [20, 20, 40, 40, 0.6, 2]], np.float32), np.zeros((0, 6), np.float32)]
    result = agreement(dets, dets)
    assert result["reference"] == result["matched"] == 2
    assert result["kept"] == 1.0
    assert result["extra"] == 0 and result["extra_share"] == 0.0


def test_shifted_box_is_missed_and_extra():
    reference = [np.array([[0, 0, 10, 10, 0.9, 1]], np.float32)]
    candidate = [np.array([[5, 0, 15, 10, 0.9, 1]], np.float32)]  # IoU 1/3
    result = agreement(reference, candidate)
    assert result["matched"] == 0 and result["kept"] == 0.0
    assert result["extra"] == 1 and result["extra_share"] == 1.0


def test_same_box_of_another_class_does_not_match():
    reference = [np.array([[0, 0, 10, 10, 0.9, 1]], np.float32)]
    candidate = [np.array([[0, 0, 10, 10, 0.9, 2]], np.float32)]
    assert agreement(reference, candidate)["kept"] == 0.0
