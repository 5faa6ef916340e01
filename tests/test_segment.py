"""Sliding-window inference: exact reconstruction, edge coverage, blending, flip TTA (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from bids_app.errors import UsageError
from bids_app.segment import (
    flip_tta,
    gaussian_weight,
    normalise_batch,
    normalise_intensity,
    overlap_voxels,
    sliding_window_predict,
    window_starts,
)


def identity(batch: np.ndarray) -> np.ndarray:
    return batch.copy()


@pytest.mark.parametrize("length,patch,overlap", [(10, 4, 0), (10, 4, 2), (64, 64, 0), (65, 64, 3), (100, 48, 24),
                                                  (7, 16, 8), (33, 8, 7)])
def test_window_starts_cover_edges_with_requested_overlap(length, patch, overlap):
    starts = window_starts(length, patch, overlap)
    assert starts[0] == 0
    if length > patch:
        assert starts[-1] + patch == length
        gaps = np.diff(starts)
        assert (gaps > 0).all() and (gaps <= patch - overlap).all()
    else:
        assert starts == [0]
    covered = np.zeros(max(length, patch), bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered[:length].all()


def test_overlap_voxels_and_errors():
    assert overlap_voxels(3, (64, 64, 48)) == (3, 3, 3)
    assert overlap_voxels(0.5, (64, 64, 48)) == (32, 32, 24)
    with pytest.raises(UsageError):
        overlap_voxels(1.0, (8, 8, 8))
    with pytest.raises(UsageError):
        overlap_voxels(True, (8, 8, 8))
    with pytest.raises(UsageError):
        window_starts(10, 4, 4)


@pytest.mark.parametrize("shape", [(20, 17, 13), (8, 8, 8), (5, 30, 3), (9, 8, 31)])
@pytest.mark.parametrize("overlap", [0, 3, 0.5])
@pytest.mark.parametrize("blend", ["gaussian", "mean"])
def test_identity_predictor_reproduces_the_volume(shape, overlap, blend):
    rng = np.random.default_rng(0)
    vol = rng.random(shape).astype(np.float32)
    out = sliding_window_predict(vol, identity, (8, 8, 8), overlap, blend=blend, batch_size=3)
    assert out.shape == vol.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, vol, atol=1e-6)


def test_known_function_and_every_voxel_covered():
    rng = np.random.default_rng(1)
    vol = rng.random((23, 11, 19)).astype(np.float32)
    out = sliding_window_predict(vol, lambda b: b**2, (6, 6, 6), 2)
    np.testing.assert_allclose(out, vol**2, atol=1e-6)
    calls = []

    def ones(batch):
        calls.append(batch.shape[0])
        return np.ones_like(batch)

    out = sliding_window_predict(vol, ones, (6, 6, 6), 0, batch_size=4)
    assert (out == 1).all()
    assert max(calls) <= 4
    n_windows = len(window_starts(23, 6, 0)) * len(window_starts(11, 6, 0)) * len(window_starts(19, 6, 0))
    assert sum(calls) == n_windows


def test_padding_uses_background_and_is_cropped_back():
    vol = np.full((4, 5, 6), 0.7, np.float32)
    seen = []

    def record(batch):
        seen.append(batch.copy())
        return batch

    out = sliding_window_predict(vol, record, (8, 8, 8), 0)
    np.testing.assert_allclose(out, vol, atol=1e-6)
    assert seen[0].shape == (1, 8, 8, 8, 1)
    assert np.isclose(seen[0].min(), 0.7)  # default pad value: the volume minimum


def test_blending_weights_centre_windows():
    w = gaussian_weight((9, 9, 9))
    assert w.max() == pytest.approx(1.0) and w.min() > 0
    assert w[4, 4, 4] == w.max()
    assert w[0, 0, 0] < w[4, 4, 4] * 1e-3

    # two overlapping windows that disagree: the Gaussian trusts each window's centre
    def by_position(batch):
        # every window predicts its own (constant) value: 0 for the left window, 1 for the right
        return np.stack([np.full(b.shape, float(b[0, 0, 0, 0] > 0.5), np.float32) for b in batch])

    vol = np.zeros((12, 8, 8), np.float32)
    vol[4:] = 1.0  # the second window starts at x=4 and sees 1 at its corner
    out = sliding_window_predict(vol, by_position, (8, 8, 8), 4, blend="gaussian")
    assert out[3, 4, 4] < 0.5 < out[8, 4, 4]


def test_flip_tta_flips_back():
    rng = np.random.default_rng(2)
    vol = rng.random((10, 12, 9)).astype(np.float32)
    # identity under TTA: if a flip were not undone the average would differ from the volume
    out = sliding_window_predict(vol, identity, (8, 8, 8), 3, tta=True)
    np.testing.assert_allclose(out, vol, atol=1e-6)
    # a position-dependent predictor: TTA averages it with its mirrored versions
    ramp = np.broadcast_to(np.linspace(0, 1, 8, dtype=np.float32)[:, None, None, None], (8, 8, 8, 1))

    def position(batch):
        return np.broadcast_to(ramp, batch.shape).copy()

    averaged = flip_tta(position, flips=((), (0,)))(np.zeros((1, 8, 8, 8, 1), np.float32))
    np.testing.assert_allclose(averaged, 0.5, atol=1e-6)
    kept = flip_tta(position, flips=((), (1,), (2,)))(np.zeros((1, 8, 8, 8, 1), np.float32))
    np.testing.assert_allclose(kept[0], ramp, atol=1e-6)


def three_channels(batch: np.ndarray) -> np.ndarray:
    """A pointwise 3-channel predictor: the intensity, its square and its complement."""
    return np.concatenate([batch, batch**2, 1.0 - batch], axis=-1)


@pytest.mark.parametrize("tta", [False, True])
def test_multichannel_predictor_gives_channels_last(tta):
    rng = np.random.default_rng(4)
    vol = rng.random((13, 9, 20)).astype(np.float32)
    out = sliding_window_predict(vol, three_channels, (8, 8, 8), 3, tta=tta, batch_size=2)
    assert out.shape == (13, 9, 20, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], vol, atol=1e-6)
    np.testing.assert_allclose(out[..., 1], vol**2, atol=1e-6)
    np.testing.assert_allclose(out[..., 2], 1.0 - vol, atol=1e-6)
    # one channel keeps the volume's shape (every existing caller)
    single = sliding_window_predict(vol, lambda b: three_channels(b)[..., 1:2], (8, 8, 8), 3, tta=tta)
    assert single.shape == vol.shape and single.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(single, vol**2, atol=1e-6)


def test_flip_tta_flips_back_every_channel():
    # channel 0 rises along x, channel 1 along y; flips must be undone per channel, never
    # across channels
    ramp = np.linspace(0, 1, 8, dtype=np.float32)
    by_x = np.broadcast_to(ramp[:, None, None], (8, 8, 8))
    by_y = np.broadcast_to(ramp[None, :, None], (8, 8, 8))

    def position(batch):
        return np.broadcast_to(np.stack([by_x, by_y], axis=-1), batch.shape[:4] + (2,)).copy()

    batch = np.zeros((2, 8, 8, 8, 1), np.float32)
    kept = flip_tta(position, flips=((), (2,)))(batch)
    assert kept.shape == (2, 8, 8, 8, 2)
    np.testing.assert_allclose(kept[0, ..., 0], by_x, atol=1e-6)
    np.testing.assert_allclose(kept[0, ..., 1], by_y, atol=1e-6)
    averaged = flip_tta(position, flips=((), (0,)))(batch)
    np.testing.assert_allclose(averaged[..., 0], 0.5, atol=1e-6)   # x flipped: averaged out
    np.testing.assert_allclose(averaged[1, ..., 1], by_y, atol=1e-6)   # y untouched


def test_sliding_window_rejects_bad_input():
    with pytest.raises(UsageError):
        sliding_window_predict(np.zeros((4, 4)), identity, (2, 2, 2))
    with pytest.raises(UsageError):
        sliding_window_predict(np.zeros((4, 4, 4)), lambda b: b[:, :1], (2, 2, 2))
    with pytest.raises(UsageError):   # no channel axis
        sliding_window_predict(np.zeros((4, 4, 4)), lambda b: b[..., 0], (2, 2, 2))
    calls = []

    def changing(batch):   # the number of channels must not change between batches
        calls.append(1)
        return np.repeat(batch, len(calls), axis=-1)

    with pytest.raises(UsageError):
        sliding_window_predict(np.zeros((4, 4, 4)), changing, (2, 2, 2), 0, batch_size=1)


def test_normalisation():
    rng = np.random.default_rng(3)
    vol = rng.normal(100, 20, (16, 16, 16)).astype(np.float32)
    vol[0, 0, 0] = 1e6  # an outlier is clipped by the percentiles
    z = normalise_intensity(vol)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-3
    assert z.max() < 4
    assert (normalise_intensity(np.full((4, 4, 4), 5.0)) == 0).all()
    batch = np.stack([vol, 3 * vol + 7])[..., None]
    nb = normalise_batch(batch)
    np.testing.assert_allclose(nb[0], nb[1], atol=1e-4)  # affine intensity changes vanish
    with pytest.raises(UsageError):
        normalise_intensity(vol, {"method": "minmax"})


def test_roi_skips_windows_without_roi_voxels():
    calls = []

    def predict(batch):
        calls.append(len(batch))
        return np.full(batch.shape, 0.7, dtype=np.float32)

    vol = np.zeros((40, 40, 40), np.float32)
    full = sliding_window_predict(vol, predict, (16, 16, 16), overlap=8)
    n_full = sum(calls)
    calls.clear()
    roi = np.zeros(vol.shape, bool)
    roi[2:6, 2:6, 2:6] = True
    part = sliding_window_predict(vol, predict, (16, 16, 16), overlap=8, roi=roi)
    assert 0 < sum(calls) < n_full
    np.testing.assert_allclose(part[roi], full[roi])
    assert np.all(part[30:, 30:, 30:] == 0)          # no window reached there
    calls.clear()
    same = sliding_window_predict(vol, predict, (16, 16, 16), overlap=8, roi=np.ones(vol.shape, bool))
    assert sum(calls) == n_full and np.array_equal(same, full)
    assert not sliding_window_predict(vol, predict, (16, 16, 16), roi=np.zeros(vol.shape, bool)).any()
    with pytest.raises(UsageError):
        sliding_window_predict(vol, predict, (16, 16, 16), roi=np.ones((3, 3, 3), bool))
