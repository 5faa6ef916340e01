"""Tests for bids_app.qc."""

from __future__ import annotations

import numpy as np

from bids_app.qc import centerline_x_y_by_slice, curved_sagittal, write_qc_png


def curved_cord_phantom(shape=(40, 50, 60)):
    """A cord whose x drifts with z (so a flat sagittal plane would lose it), with its centerline."""
    ks = np.arange(shape[2])
    cx = 12 + 16 * ks / (shape[2] - 1)
    cy = np.full(shape[2], 25.0)
    xx, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    mask = np.zeros(shape, np.uint8)
    for k in range(8, shape[2] - 5):
        mask[:, :, k] = ((xx - cx[k]) / 4.0) ** 2 + ((yy - cy[k]) / 3.0) ** 2 <= 1
    rng = np.random.default_rng(0)
    image = (100 + 20 * rng.standard_normal(shape) + 300.0 * mask).astype(np.float32)
    centerline = np.column_stack([cx, cy, ks])[8 : shape[2] - 5]
    return image, mask, centerline


def test_curved_sagittal_follows_the_centerline():
    image, mask, centerline = curved_cord_phantom()
    xs, _, present = centerline_x_y_by_slice(centerline, mask, mask.shape)
    sag = curved_sagittal(mask.astype(np.float32), xs, order=0)
    # every slice holding the cord shows it at the centerline's y in the curved view
    for k in np.nonzero(mask.any(axis=(0, 1)))[0]:
        assert sag[25, k] == 1
    assert present.sum() == len(centerline)
    flat = mask[20]  # a fixed sagittal plane misses the cord where it has drifted away
    assert flat.any(axis=0).sum() < sag.any(axis=0).sum()


def test_write_qc_png(tmp_path):
    image, mask, centerline = curved_cord_phantom()
    out = write_qc_png(
        tmp_path / "qc" / "sub-01_desc-qc.png", image, mask, (0.5, 0.5, 1.0), centerline, "sub-01"
    )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (13 * 90, 7 * 90)
    assert [p.name for p in out.parent.iterdir()] == ["sub-01_desc-qc.png"]  # no temp file left


def test_write_qc_png_without_centerline_or_mask(tmp_path):
    image, mask, _ = curved_cord_phantom()
    assert write_qc_png(tmp_path / "a.png", image, mask, (1, 1, 1)).read_bytes()[:4] == b"\x89PNG"
    empty = np.zeros_like(mask)
    assert write_qc_png(tmp_path / "b.png", image, empty, (1, 1, 1)).read_bytes()[:4] == b"\x89PNG"
