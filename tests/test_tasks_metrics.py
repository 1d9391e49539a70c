"""Metrics of `peft_tglora.tasks` against values computed by hand on small arrays."""

import json
import math

import numpy as np
import pytest
import torch

from peft_tglora.tasks import build_meter, delta_m, postprocess
from peft_tglora.tasks.metrics import core


# 3x3 semseg example, 255 = ignore. Valid pixels (label, prediction):
# (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (0,0) ; class 3 absent from both.
# class 0: TP 2, FP 1 (label 2 -> 0), FN 1 (label 0 -> 1): IoU 2/4
# class 1: TP 2, FP 1, FN 0: IoU 2/3 ; class 2: TP 1, FP 0, FN 1: IoU 1/2
SEG_TARGET = np.array([[0, 0, 1], [1, 2, 2], [0, 255, 255]])
SEG_PRED = np.array([[0, 1, 1], [1, 2, 0], [0, 3, 1]])
SEG_MIOU = 100 * (2 / 4 + 2 / 3 + 1 / 2) / 3

# saliency: probabilities / labels, one ignored pixel. Counts per threshold band (TP, PP), 2 positives:
# t <= 0.1: (2, 4) F = 1.3*.5*1/(.3*.5+1); 0.1 < t <= 0.2: (1, 3); 0.2 < t <= 0.6: (1, 2); 0.6 < t <= 0.9: (1, 1)
SAL_PROB = np.array([[0.9, 0.2], [0.6, 0.1], [0.95, 0.0]])
SAL_TARGET = np.array([[1, 0], [0, 1], [255, 0]])
SAL_MAXF = 100 * 1.3 * 1.0 * 0.5 / (0.3 * 1.0 + 0.5)  # precision 1, recall 0.5 at t in (0.6, 0.9]


def test_confusion_matrix_and_miou_with_ignore_index():
    matrix = core.confusion_matrix(SEG_PRED, SEG_TARGET, num_classes=4)
    expected = np.zeros((4, 4), dtype=np.int64)
    for t, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 0), (0, 0)]:
        expected[t, p] += 1
    np.testing.assert_array_equal(matrix, expected)
    miou, iou = core.iou_from_confusion(matrix)
    assert miou == pytest.approx(SEG_MIOU)
    assert math.isnan(iou[3])  # absent from both: excluded, not 0
    assert core.mean_iou(torch.tensor(SEG_PRED), torch.tensor(SEG_TARGET), 4) == pytest.approx(SEG_MIOU)


def test_miou_class_predicted_but_absent_from_label_counts_as_zero():
    # class 1 is predicted once but never labelled: IoU 0, so it lowers the mean
    assert core.mean_iou(np.array([[0, 1]]), np.array([[0, 0]]), 2) == pytest.approx(100 * (1 / 2 + 0) / 2)


def test_miou_rejects_out_of_range_class_ids():
    with pytest.raises(ValueError, match="Check num_classes"):
        core.mean_iou(np.array([[5]]), np.array([[0]]), 3)


def test_streaming_miou_equals_one_shot():
    meter = build_meter("semseg", num_classes=4)
    meter.update(SEG_PRED[:2], SEG_TARGET[:2])
    meter.update(SEG_PRED[2:], SEG_TARGET[2:])
    assert meter.compute()["mIoU"] == pytest.approx(SEG_MIOU)


def test_max_f_over_thresholds_with_ignore():
    assert core.max_f(SAL_PROB, SAL_TARGET) == pytest.approx(SAL_MAXF)
    # beta^2 = 1 (the edge proxy): best F1 is at t <= 0.1 (P .5, R 1, F .667) vs (1, .5) -> also .667
    assert core.max_f(SAL_PROB, SAL_TARGET, beta_squared=1.0) == pytest.approx(100 * 2 / 3)
    # without the ignore index the 0.95 pixel counts as a false positive at every threshold
    assert core.max_f(SAL_PROB, np.where(SAL_TARGET == 255, 0, SAL_TARGET)) < SAL_MAXF


def test_max_f_thresholds_are_mtinet_grid():
    np.testing.assert_allclose(core.SALIENCY_THRESHOLDS, np.arange(1, 20) * 0.05)


def test_streaming_max_f_equals_one_shot():
    meter = build_meter("saliency")
    meter.update(SAL_PROB[:1], SAL_TARGET[:1])
    meter.update(SAL_PROB[1:], SAL_TARGET[1:])
    assert meter.compute()["maxF"] == pytest.approx(SAL_MAXF)


def test_mean_angular_error():
    # pixels: 0 deg, 90 deg, 45 deg (prediction not unit length), invalid (zero label) excluded
    pred = np.array([[1, 0, 0], [1, 0, 0], [2, 2, 0], [0, 0, 1]], dtype=float).T.reshape(3, 2, 2)
    target = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=float).T.reshape(3, 2, 2)
    np.testing.assert_allclose(np.sort(core.angular_errors(pred, target)), [0.0, 45.0, 90.0], atol=1e-6)
    assert core.mean_angular_error(pred, target) == pytest.approx(45.0)
    meter = build_meter("normals")
    meter.update(pred[None], target[None])
    result = meter.compute()
    assert result["mean_angular_error"] == pytest.approx(45.0)
    assert result["within_11.25"] == pytest.approx(100 / 3)
    assert result["within_30.0"] == pytest.approx(100 / 3)


def test_rmse_over_valid_pixels():
    pred = np.array([[1.0, 1.0], [1.0, 1.0]])
    target = np.array([[1.0, 3.0], [0.0, 2.0]])  # errors 0, 2, (invalid), 1
    assert core.rmse(pred, target) == pytest.approx(math.sqrt(5 / 3))
    meter = build_meter("depth")
    meter.update(pred[None, None], target[None])  # [B, 1, H, W] prediction is squeezed
    meter.update(np.array([[2.0]]), np.array([[0.0]]))  # no valid pixel: changes nothing
    assert meter.compute()["rmse"] == pytest.approx(math.sqrt(5 / 3))


def test_edge_texture_rmse_counts_zero_targets_that_depth_skips():
    # edge_texture: 0 is a real value (flat regions), so every pixel counts; depth skips label 0 as invalid
    pred, target = np.array([[0.1, 0.2]]), np.array([[0.0, 0.5]])
    texture, depth = build_meter("edge_texture"), build_meter("depth")
    texture.update(pred[None, None], target[None])
    depth.update(pred[None, None], target[None])
    assert texture.compute()["rmse"] == pytest.approx(math.sqrt((0.1**2 + 0.3**2) / 2))
    assert depth.compute()["rmse"] == pytest.approx(0.3)


def test_postprocess_formats():
    torch.manual_seed(0)
    assert postprocess("semseg", torch.randn(2, 5, 4, 4)).shape == (2, 4, 4)
    probs = postprocess("saliency", torch.tensor([[[[0.0, 100.0]]]]))
    torch.testing.assert_close(probs, torch.tensor([[[0.5, 1.0]]]))
    normals = postprocess("normals", torch.randn(2, 3, 4, 4))
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2, 4, 4))
    assert postprocess("depth", torch.randn(2, 1, 4, 4)).shape == (2, 4, 4)


def test_delta_m_hand_computed(tmp_path):
    results = {"semseg": {"mIoU": 66.0}, "normals": {"mean_angular_error": 18.0}}
    baselines = {"_source": "made up", "semseg": {"mIoU": 60.0}, "normals": {"mean_angular_error": 20.0}}
    # semseg +10 %, normals (lower is better) +10 %
    assert delta_m(results, baselines) == pytest.approx(10.0)
    path = tmp_path / "single_task.json"
    path.write_text(json.dumps(baselines))
    assert delta_m(results, path) == pytest.approx(10.0)
    # bare numbers are the primary metric; worse normals count negative
    assert delta_m({"normals": 22.0}, {"normals": 20.0}) == pytest.approx(-10.0)
    assert delta_m(results, baselines, tasks=["semseg"]) == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("results", "baselines", "error", "match"),
    [
        ({"semseg": 1.0}, {"normals": 2.0}, KeyError, "baselines have no entry for task 'semseg'"),
        ({"semseg": {"accuracy": 1.0}}, {"semseg": 2.0}, KeyError, "has no 'mIoU'"),
        ({"semseg": 1.0}, {"semseg": 0.0}, ValueError, "baseline of 'semseg' is 0"),
        ({"semseg": float("nan")}, {"semseg": 1.0}, ValueError, "finite number"),
    ],
    ids=["missing-baseline", "missing-metric", "zero-baseline", "nan-result"],
)
def test_delta_m_errors(results, baselines, error, match):
    with pytest.raises(error, match=match):
        delta_m(results, baselines)


# ---------------------------------------------------------------- the field's saliency mIoU, normals median / RMSE
# image A: label = top row; image B: label = top-left pixel. No probability sits on a threshold of linspace(.2, .9, 15)
SAL_IOU_PROB = np.array([[[0.95, 0.52], [0.1, 0.32]], [[0.62, 0.0], [0.0, 0.72]]])
SAL_IOU_TARGET = np.array([[[1, 1], [0, 0]], [[1, 0], [0, 0]]])


def test_saliency_miou_hand_computed():
    """
    Per image, mask p > t: A's IoU is 2/3 for t <= .30 (3 predicted pixels), 1 for .35 <= t <= .50, 1/2 above; B's
    is 1/2 for t <= .60 ({.62, .72} vs one positive), then 0. The image average peaks at (1 + 1/2) / 2 = 75 %.
    """
    assert core.saliency_miou(SAL_IOU_PROB, SAL_IOU_TARGET) == pytest.approx(75.0)
    # B's bottom-right pixel ignored (255): B's IoU is 1 up to t = .60, so the average reaches 100 % at .35 .. .50
    ignored = SAL_IOU_TARGET.copy()
    ignored[1, 1, 1] = 255
    assert core.saliency_miou(SAL_IOU_PROB, ignored) == pytest.approx(100.0)
    # both empty at every threshold: IoU 1 (ASTMT's jaccard), not 0 / 0
    assert core.saliency_miou(np.zeros((1, 2, 2)), np.zeros((1, 2, 2))) == pytest.approx(100.0)


def test_saliency_meter_reports_miou_streaming():
    meter = build_meter("saliency")
    meter.update(SAL_IOU_PROB[:1], SAL_IOU_TARGET[:1])
    meter.update(SAL_IOU_PROB[1:], SAL_IOU_TARGET[1:])
    result = meter.compute()
    assert result["mIoU"] == pytest.approx(75.0)
    # maxF (beta^2 = .3, p >= t, pooled over both images, 3 positives): best at t in .35 .. .50, where .95, .52,
    # .62, .72 are predicted, 3 of them right: P = 3/4, R = 1 (F = .661 below, 2/3 at .55 .. .60, .684 above .72)
    assert result["maxF"] == pytest.approx(100 * 1.3 * 0.75 / (0.3 * 0.75 + 1))


def test_normals_median_and_rmse_angle():
    """Errors 0, 45 and 90 degrees: median 45, RMSE sqrt((0 + 45^2 + 90^2) / 3) = sqrt(3375)."""
    pred = np.array([[1, 0, 0], [1, 0, 0], [2, 2, 0], [0, 0, 1]], dtype=float).T.reshape(3, 2, 2)
    target = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=float).T.reshape(3, 2, 2)
    meter = build_meter("normals")
    meter.update(pred[None], target[None])
    result = meter.compute()
    assert result["median_angular_error"] == pytest.approx(45.0, abs=core.ANGLE_BIN)
    assert result["rmse_angular_error"] == pytest.approx(math.sqrt(3375))


def test_delta_m_with_the_shipped_pascal_baselines():
    """+10 % semseg, = parts, +20 % saliency mIoU (not maxF: the baseline names mIoU), -10 % normals error -> +10."""
    results = {
        "semseg": {"mIoU": 67.21 * 1.1},
        "human_parts": {"mIoU": 61.93},
        "saliency": {"maxF": 1.0, "mIoU": 62.35 * 1.2},
        "normals": {"mean_angular_error": 17.97 * 0.9},
    }
    assert delta_m(results, "pascal_context") == pytest.approx(10.0)
