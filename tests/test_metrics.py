"""Tests for bids_app.metrics against hand-computed arrays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bids_app.metrics import (
    compute_metrics,
    dice,
    dice_in_region,
    extent_errors_mm,
    hd95,
    json_safe,
    per_slice_metrics,
    point_distance_mm,
    precision,
    recall,
    relative_volume_difference,
    surface,
    volume_mm3,
)


def masks_4_6_overlap_3():
    pred = np.zeros((5, 5, 5), np.uint8)
    ref = np.zeros((5, 5, 5), np.uint8)
    pred[0, 0, 0:4] = 1  # 4 voxels
    ref[0, 0, 1:5] = 1  # 4 voxels, 3 shared with pred
    ref[1, 1, 0:2] = 1  # + 2 voxels -> 6
    return pred, ref


def test_overlap_metrics_hand_computed():
    pred, ref = masks_4_6_overlap_3()
    assert dice(pred, ref) == pytest.approx(2 * 3 / (4 + 6))
    assert precision(pred, ref) == pytest.approx(3 / 4)
    assert recall(pred, ref) == pytest.approx(3 / 6)
    assert dice(ref, ref) == 1.0


def test_volumes_use_the_affine_determinant():
    pred, ref = masks_4_6_overlap_3()
    affine = np.diag([0.5, 0.5, 2.0, 1.0])  # 0.5 mm^3 voxels
    assert volume_mm3(pred, affine) == pytest.approx(2.0)
    assert volume_mm3(ref, (0.5, 0.5, 2.0)) == pytest.approx(3.0)
    assert relative_volume_difference(2.0, 3.0) == pytest.approx(-1 / 3)
    sheared = np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]], float)
    assert volume_mm3(pred, sheared) == pytest.approx(4 * 3.0)


def test_empty_mask_conventions():
    empty = np.zeros((4, 4, 4), np.uint8)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = 1
    affine = np.eye(4)
    both = compute_metrics(empty, empty, affine)
    assert both["dice"] == 1.0 and both["precision"] == 1.0 and both["recall"] == 1.0
    assert both["rel_volume_diff"] == 0.0 and both["hd95_mm"] == 0.0
    assert math.isnan(both["superior_extent_error_mm"]) and math.isnan(both["inferior_extent_error_mm"])
    no_pred = compute_metrics(empty, full, affine)
    assert no_pred["dice"] == 0.0 and math.isnan(no_pred["precision"]) and no_pred["recall"] == 0.0
    assert no_pred["rel_volume_diff"] == -1.0 and math.isnan(no_pred["hd95_mm"])
    no_ref = compute_metrics(full, empty, affine)
    assert no_ref["dice"] == 0.0 and no_ref["precision"] == 0.0 and math.isnan(no_ref["recall"])
    assert math.isnan(no_ref["rel_volume_diff"]) and math.isnan(no_ref["hd95_mm"])


def test_surface_of_a_cube():
    cube = np.zeros((5, 5, 5), np.uint8)
    cube[1:4, 1:4, 1:4] = 1
    surf = surface(cube)
    assert surf.sum() == 27 - 1 and not surf[2, 2, 2]


def test_hd95_parallel_lines_with_anisotropic_spacing():
    ref = np.zeros((10, 5, 3), np.uint8)
    pred = np.zeros_like(ref)
    ref[:, 0, 1] = 1
    pred[:, 2, 1] = 1  # 2 voxels away along y, 0.5 mm each -> 1.0 mm everywhere
    assert hd95(pred, ref, (1.0, 0.5, 1.0)) == pytest.approx(1.0)


def test_hd95_ignores_a_rare_outlier_but_not_a_frequent_one():
    ref = np.zeros((10, 10, 12), np.uint8)
    ref[:, :, 0] = 1  # a 10x10 plane: 100 surface voxels
    pred = ref.copy()
    pred[0, 0, 10] = 1  # one outlier 10 mm away: 1 of 101 distances
    assert hd95(pred, ref, (1, 1, 1)) == pytest.approx(0.0)
    ref_small = np.zeros((10, 10, 12), np.uint8)
    ref_small[:, 0, 0] = 1  # 10 surface voxels
    pred_small = ref_small.copy()
    pred_small[0, 0, 10] = 1  # 1 of 11 distances: 95th percentile interpolates 0 and 10 at 9.5/10
    assert hd95(pred_small, ref_small, (1, 1, 1)) == pytest.approx(5.0)


def test_extent_errors_follow_the_scanner_s_axis():
    pred = np.zeros((3, 3, 12), np.uint8)
    ref = np.zeros_like(pred)
    pred[1, 1, 2:9] = 1  # k = 2..8
    ref[1, 1, 1:10] = 1  # k = 1..9
    affine = np.diag([1.0, 1.0, -2.0, 1.0])
    affine[2, 3] = 100.0  # S = 100 - 2k: k = 0 is the most superior slice
    sup, inf = extent_errors_mm(pred, ref, affine)
    assert sup == pytest.approx((100 - 2 * 2) - (100 - 2 * 1))  # -2: pred stops 2 mm below the top
    assert inf == pytest.approx((100 - 2 * 8) - (100 - 2 * 9))  # +2: pred stops 2 mm above the bottom


def test_conus_tip_error_and_region_dice():
    assert point_distance_mm((0, 0, 0), (3, 4, 0)) == pytest.approx(5.0)
    assert math.isnan(point_distance_mm(None, (1, 2, 3)))
    pred, ref = masks_4_6_overlap_3()
    region = np.zeros_like(pred)
    region[0, 0, :] = 1  # only the shared line: pred 4, ref 4, overlap 3
    assert dice_in_region(pred, ref, region) == pytest.approx(6 / 8)
    metrics = compute_metrics(
        pred,
        ref,
        np.eye(4),
        conus_tip_pred_mm=[1, 1, 1],
        conus_tip_ref_mm=[1, 1, 3],
        region_masks={"lumbosacral": region},
    )
    assert metrics["dice_lumbosacral"] == pytest.approx(0.75)
    assert metrics["conus_tip_error_mm"] == pytest.approx(2.0)
    assert metrics["n_voxels_pred"] == 4 and metrics["n_voxels_ref"] == 6


def test_per_slice_metrics_hand_computed():
    pred = np.zeros((4, 4, 5), np.uint8)
    ref = np.zeros_like(pred)
    pred[0:2, 0:2, 1] = 1  # slice 1: pred 4, ref 2, overlap 2
    ref[0:2, 0, 1] = 1
    ref[3, 3, 3] = 1  # slice 3: ref only
    rows = per_slice_metrics(pred, ref, (0.5, 0.5, 2.0))
    assert [r["slice"] for r in rows] == [1, 3]
    first, second = rows
    assert first["dice"] == pytest.approx(4 / 6)
    assert first["precision"] == pytest.approx(0.5) and first["recall"] == 1.0
    assert first["area_pred_mm2"] == pytest.approx(1.0) and first["z_mm"] == pytest.approx(2.0)
    assert second["dice"] == 0.0 and math.isnan(second["precision"]) and second["recall"] == 0.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_json_safe():
    text = json.dumps(json_safe({"a": math.nan, "b": [np.float32(1.5), math.inf], "c": np.int64(3)}))
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": 3}
