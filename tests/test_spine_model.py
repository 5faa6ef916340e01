"""The coarse multi-output "spine" model: training targets, warm start, schedule, whole-view evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bids_app import levels as lv
from bids_app.synth import generate_sample
from bids_app.synth.labels import LABELS
from bids_app.synth.targets import FIRST_VISIBLE_DISC, LAST_DISC, target_channels
from bids_app.training.dataset import TASKS, PatchProducer, StreamConfig, TaskConfig, build_set
from bids_app.training.train import Recipe, configure_tensorflow, cosine_lr, run_training, warm_start

SPACING = (1.5, 1.5, 1.5)


@pytest.fixture(scope="module")
def whole_view():
    """A procedural phantom covering the whole spine (C2 to the sacrum), no data needed."""
    return generate_sample(11, source="phantom", region="whole", spacing=SPACING)


def test_disc_channel_is_one_blob_per_visible_disc(whole_view):
    s = whole_view
    n_visible = sum(FIRST_VISIBLE_DISC <= v <= LAST_DISC for v, _ in s.discs)
    assert n_visible >= 20
    # the training channel is the disc tissue: one blob per real disc (none at C1-C2 or above C1)
    tissue = target_channels(s)[..., 1]
    lab, n = ndimage.label(tissue)
    big = np.sum(ndimage.sum(tissue, lab, range(1, n + 1)) * np.prod(SPACING) >= 150)
    assert big == n_visible


def test_anchor_target_is_c2_and_sacrum(whole_view):
    s = whole_view
    y = target_channels(s)
    assert y.shape == (*s.cord.shape, 3) and y.dtype == np.uint8
    np.testing.assert_array_equal(y[..., 0], s.cord)
    anchors = y[..., 2].astype(bool)
    assert np.all(anchors[s.labels == LABELS["sacrum"]])
    c2 = anchors & (s.labels != LABELS["sacrum"])
    assert c2.any(), "the top of the spine is in view: C2 must be an anchor"
    z_c23 = (np.linalg.inv(s.affine) @ [*dict(s.discs)[3], 1.0])[2]
    assert np.argwhere(c2)[:, 2].min() >= z_c23 - 2   # C2 lies above the C2-C3 disc
    # a view without the C2-C3 disc has no C2 anchor
    low = generate_sample(12, source="phantom", region="lumbosacral", spacing=SPACING)
    assert 3 not in dict(low.discs)
    yl = target_channels(low)
    assert not (yl[..., 2].astype(bool) & (low.labels != LABELS["sacrum"])).any()


def _perfect_heatmaps(sample):
    """The truth as a perfect model would predict it: the cord mask itself, discs and anchors
    slightly blurred (peaks to find)."""
    y = target_channels(sample).astype(np.float32)
    return np.stack([y[..., 0]] + [ndimage.gaussian_filter(y[..., c], 1.0) for c in (1, 2)], axis=-1)


def test_discs_from_perfect_heatmaps_are_identified(whole_view):
    s = whole_view
    heat = _perfect_heatmaps(s)
    auto = lv.discs_from_heatmaps(heat[..., 1], heat[..., 2], s.affine, s.centerline_mm, s.conus_tip_mm)
    assert auto.top_in_view
    assert auto.identification.values is not None, auto.identification.reason
    truth = {v: p for v, p in s.discs if 3 <= v <= 25}
    assert sorted(auto.identification.values) == sorted(truth)
    for value, point in zip(auto.identification.values, auto.points_mm, strict=True):
        # on the cord the disc point is the closest centerline point; below the conus it is placed
        # behind the disc (a few mm less exact)
        limit = 1.5 if point[2] > s.conus_tip_mm[2] else 5.0
        assert np.linalg.norm(point - truth[value]) < limit, value
    labels = auto.labels(s.affine)
    assert sorted(d.value for d in labels) == sorted(auto.identification.values)


def test_outside_anchors_drops_detections_inside_or_beyond_an_end_anchor():
    z = np.array([0.0, 30.0, 60.0, 90.0, 120.0])
    points = np.stack([np.zeros(5), np.zeros(5), z], axis=1)
    column = lambda lo, hi: np.stack([np.zeros(20), np.zeros(20), np.linspace(lo, hi, 20)], axis=1)  # noqa: E731
    # a top anchor from 95 mm up: the detection at 120 is inside it, the one at 90 on its edge
    assert lv._outside_anchors(points, [column(95, 140)], 3.0).tolist() == [True, True, True, True, False]
    # a blob that does not reach past the chain's end leaves the detection beyond it alone
    # (conservative: a spurious anchor in the chain must not delete the discs above it)
    assert lv._outside_anchors(points, [column(93, 110)], 3.0).all()
    # a sacrum from 25 mm down: the detection at 0 lies inside it, the one at 30 on its edge
    assert lv._outside_anchors(points, [column(-70, 28)], 3.0).tolist() == [False, True, True, True, True]
    # no anchor, or anchor-like blobs inside the chain (a model error, even over a detection): all kept
    assert lv._outside_anchors(points, [], 3.0).all()
    assert lv._outside_anchors(points, [column(40, 50)], 3.0).all()
    assert lv._outside_anchors(points, [column(20, 100)], 3.0).all()


def test_a_false_disc_inside_the_sacrum_does_not_shift_the_count(whole_view):
    """A disc-like blob in the sacrum (what the coarse model sees there) is dropped by the anchor,
    so the sacrum still anchors the count and every identity stays right."""
    s = whole_view
    heat = _perfect_heatmaps(s)
    truth = {v: p for v, p in s.discs if 3 <= v <= 25}
    # the two lowest disc-tissue blobs (L5-S1, L4-L5), in voxels; the fake lies 25 mm below L5-S1
    lab, n = ndimage.label(heat[..., 1] > 0.5)
    l5s1, l4l5 = sorted(ndimage.center_of_mass(heat[..., 1] > 0.5, lab, range(1, n + 1)), key=lambda c: c[2])[:2]
    down = np.subtract(l5s1, l4l5) / np.linalg.norm(np.subtract(l5s1, l4l5))
    fake = np.asarray(l5s1) + 25.0 / SPACING[0] * down
    blob = np.zeros(heat.shape[:3], np.float32)
    blob[tuple(np.round(fake).astype(int))] = 1.0
    blob = ndimage.binary_dilation(blob, iterations=5).astype(np.float32)   # > 150 mm3, like a disc
    discs = np.maximum(heat[..., 1], ndimage.gaussian_filter(blob, 1.0))
    assert lv._anchor_blobs(heat[..., 2], s.affine, 0.5, 300.0), "the phantom's sacrum must be an anchor"
    auto = lv.discs_from_heatmaps(discs, heat[..., 2], s.affine, s.centerline_mm, s.conus_tip_mm)
    assert auto.sacrum_in_view and auto.identification.values is not None, auto.identification.reason
    assert sorted(auto.identification.values) == sorted(truth)
    # without the anchor output the fake blob is the lowest "disc"
    plain = lv.discs_from_heatmaps(discs, None, s.affine, s.centerline_mm, s.conus_tip_mm)
    assert len(plain.points_mm) == len(auto.points_mm) + 1


def test_discs_from_heatmaps_without_anchor_or_discs():
    heat = np.zeros((20, 20, 60), np.float32)
    auto = lv.discs_from_heatmaps(heat, heat, np.eye(4))
    assert auto.identification.values is None and "no discs" in auto.identification.reason
    assert auto.labels(np.eye(4)) == []


def test_cosine_schedule_ends_at_min_lr():
    r = Recipe(max_seconds=1000.0, min_lr=1e-6)
    start = {"seconds": 200.0, "lr": 5e-4}
    assert cosine_lr(start, 200.0, r) == pytest.approx(5e-4)
    assert cosine_lr(start, 600.0, r) == pytest.approx((5e-4 + 1e-6) / 2)
    assert cosine_lr(start, 1000.0, r) == pytest.approx(1e-6)
    assert cosine_lr(start, 5000.0, r) == pytest.approx(1e-6)
    assert cosine_lr(start, 100.0, Recipe(max_seconds=None)) == 5e-4


def test_warm_start_copies_layers_and_the_first_output_channels():
    from bids_app.training.networks import unet3d

    configure_tensorflow(1, 0)
    one = unet3d(base_filters=4, depth=2, norm="instance", outputs=1)
    three = unet3d(base_filters=4, depth=2, norm="instance", outputs=3)
    copied = warm_start(three, one)
    assert "output" in copied and "enc1_conv1" in copied
    k1, k3 = one.get_layer("output").get_weights()[0], three.get_layer("output").get_weights()[0]
    np.testing.assert_array_equal(k3[..., :1], k1)
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(three(x))[..., 0], np.asarray(one(x))[..., 0], atol=1e-6)


def _two_channel_source(seed):
    """Bright tube (channel 0) with two bright discs (channel 1) on noise."""
    rng = np.random.default_rng(seed)
    shape = (16, 16, 16)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    tube = ((x - 8) ** 2 + (y - 8) ** 2 <= 6).astype(np.uint8)
    discs = (((x - 8) ** 2 + (y - 12) ** 2 + (z - 4) ** 2 <= 5) | ((x - 8) ** 2 + (y - 12) ** 2 + (z - 12) ** 2 <= 5))
    image = 100 + 5 * rng.standard_normal(shape) + 50 * tube + 80 * discs
    return image.astype(np.float32), np.stack([tube, discs.astype(np.uint8)], -1), {"region": "toy"}


def test_multi_output_training_learns_both_channels(tmp_path):
    from bids_app.training.networks import unet3d

    configure_tensorflow(1, 0)
    task = TaskConfig(task="spine", spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), targets=("cord", "discs"))
    val = build_set(PatchProducer(_two_channel_source, workers=0), range(1_000_000, 1_000_002))
    assert val["mask"].shape == (2, 16, 16, 16, 2)
    stream = StreamConfig(batch_size=2, steps_per_epoch=8, reuse=2, chunk=4, seed=1)
    recipe = Recipe(lr=5e-3, epochs=4, threads=1, workers=0, stream=stream)
    model = unet3d(base_filters=4, depth=2, norm="instance", outputs=2)
    result = run_training(model, recipe, PatchProducer(_two_channel_source, workers=0), task, val, tmp_path / "run",
                          progress=False)
    last = result.history[-1]
    assert last["loss"] < result.history[0]["loss"]
    assert "dice_pooled_discs" in last and np.isfinite(last["dice_pooled_discs"])
    # both channels learn: each output is higher inside its own target than outside it
    from bids_app.training.train import predict_patches

    probs = predict_patches(result.model, val["image"], None)
    assert probs.shape == val["mask"].shape
    for c in range(2):
        inside, outside = probs[..., c][val["mask"][..., c] > 0], probs[..., c][val["mask"][..., c] == 0]
        assert inside.mean() > outside.mean() + 0.1, c
    assert TASKS["spine"].targets == ("cord", "discs", "anchors") and TASKS["spine"].multi_target


def test_whole_view_evaluation_of_a_perfect_model(whole_view, monkeypatch):
    """With heatmaps equal to the (blurred) truth, the metrics must say: centerline and discs exact."""
    from bids_app import segment
    from bids_app.training import view_eval

    heat = _perfect_heatmaps(whole_view)
    monkeypatch.setattr(segment, "sliding_window_predict", lambda *a, **k: heat)
    row = view_eval.evaluate_view(None, whole_view, ("cord", "discs", "anchors"), (64, 64, 64))
    assert row["cord_found"] and row["centerline_mean_mm"] < 1.5
    assert row["conus_tip_error_mm"] is not None and row["conus_tip_error_mm"] < 5.0
    assert row["identified"] and row["discs_matched"] >= row["discs_true"] - 1
    assert max(row["disc_errors_mm"]) < 3.0
    assert row["identities_correct"] >= row["discs_true"] - 1
    assert row["identities_correct"] + row["identities_wrong"] == row["discs_matched"]
    summary = view_eval.summarise([row])
    assert summary["identities_correct_rate"] >= (row["discs_true"] - 1) / row["discs_true"]
    assert summary["identities_wrong_rate"] == row["identities_wrong"] / row["discs_true"]
    assert summary["cord_found_rate"] == 1.0


def test_top_anchor_is_the_whole_bone_block_above_c2_c3():
    """No disc separates C1 from C2, so the top anchor is all the bone above the C2-C3 disc: a
    target cut at the C1-C2 point would end at a plane through uniform bone that no image shows."""
    from bids_app.synth.targets import anchor_target, c2_target

    labels = np.zeros((21, 21, 60), np.uint8)
    body, disc = LABELS["vertebral_body"], LABELS["disc_annulus"]
    labels[5:16, 5:16, 0:8] = LABELS["sacrum"]
    labels[5:16, 5:16, 8:10] = disc                 # L5-S1
    labels[5:16, 5:16, 10:19] = body                # C3 (whatever lies below)
    labels[5:16, 5:16, 19:22] = disc                # C2-C3
    labels[5:16, 5:16, 22:50] = body                # C2 and C1: one block
    centerline = np.stack([np.full(60, 10.0), np.full(60, 10.0), np.arange(60.0)], axis=1)
    discs = [(2, np.array([10.0, 10.0, 36.0])), (3, np.array([10.0, 10.0, 20.5]))]
    top = c2_target(labels, np.eye(4), discs, centerline).astype(bool)
    np.testing.assert_array_equal(top, (labels == body) & (np.arange(60) > 20.5))
    assert top[:, :, 40:50].any(), "the anchor reaches the top of the bone column, past the C1-C2 point"
    both = anchor_target(labels, np.eye(4), discs, centerline).astype(bool)
    np.testing.assert_array_equal(both, top | (labels == LABELS["sacrum"]))
    assert not c2_target(labels, np.eye(4), discs[:1], centerline).any()   # no C2-C3 disc: no top anchor


@pytest.mark.parametrize("region", ["craniocervical", "sacral"])
def test_anchor_crop_regions_always_hold_an_anchor(region):
    from bids_app.synth import generate_crop

    for seed in (0, 1):
        s = generate_crop(seed, patch_size=(64, 64, 64), spacing=SPACING, source="phantom", region=region)
        assert s.region == region
        y = target_channels(s)
        assert y[..., 2].sum() * np.prod(SPACING) > 2000, (region, seed)   # mm³
        values = dict(s.discs)
        assert (3 in values) if region == "craniocervical" else (25 in values and (s.labels == LABELS["sacrum"]).any())
    with pytest.raises(ValueError, match="sacral"):
        generate_crop(0, patch_size=(8, 8, 8), source="phantom", region="nowhere")


def test_spine_task_samples_and_monitors_the_anchors():
    from dataclasses import replace

    from bids_app.training.dataset import SyntheticSource

    spine = TASKS["spine"]
    assert {"craniocervical", "sacral"} <= set(spine.regions) and {"craniocervical", "sacral"} <= set(spine.val_regions)
    # a one-output task other than the cord gives (X, Y, Z) masks, like the model's squeezed output
    task = replace(spine, targets=("anchors",), fov_fraction=0.0, regions=("sacral",), patch_size=(32, 32, 32))
    image, mask, info = SyntheticSource(task, source="phantom")(3)
    assert info["region"] == "sacral" and mask.shape == image.shape == (32, 32, 32) and mask.any()
    _, mask3, _ = SyntheticSource(replace(task, targets=("cord", "discs", "anchors")), source="phantom")(3)
    assert mask3.shape == (32, 32, 32, 3)
    np.testing.assert_array_equal(mask3[..., 2], mask)
