"""Tests for bids_app.centerline on synthetic heatmaps built here (no external data)."""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest

from bids_app.centerline import (
    Centerline,
    centerline_error_mm,
    centerline_from_file,
    centerline_from_mask,
    centerline_to_grid,
    centerline_to_mask,
    centerline_to_tsv,
    fit_centerline,
)
from bids_app.errors import BadDataError, InputMissingError

SPACING = (1.5, 1.5, 2.0)
SHAPE = (40, 40, 120)
AFFINE = np.array([[1.5, 0, 0, -30.0], [0, 1.5, 0, -45.0], [0, 0, 2.0, -400.0], [0, 0, 0, 1]])


@dataclass
class Phantom:
    heatmap: np.ndarray
    mask: np.ndarray
    truth_grid: np.ndarray      # (M, 3) dense truth curve in grid mm (voxel * spacing), cord part only
    tip_grid: np.ndarray | None  # (3,) grid mm, None when the cord leaves the bottom of the view


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_phantom(seed: int, *, tip_z: float | None = 60.0, lordosis: float = 6.0, period: float = 200.0,
                 noise: float = 0.04, strands: bool = True, distractors: bool = True,
                 radius: float = 3.5) -> Phantom:
    """Tapered curved tube heatmap with a conus, cauda equina strands, noise and bright blobs.

    Grid mm coordinates are ``index * SPACING``. The cord occupies z >= tip_z (tip_z None: whole view).
    """
    rng = np.random.default_rng(seed)
    sx, sy, sz = SPACING
    gx = np.arange(SHAPE[0])[:, None, None] * sx
    gy = np.arange(SHAPE[1])[None, :, None] * sy
    gz = np.arange(SHAPE[2])[None, None, :] * sz

    def axis_xy(z):
        x = 30.0 + 2.0 * np.sin(2 * np.pi * z / 170.0)
        y = 30.0 + lordosis * np.sin(2 * np.pi * z / period)
        return x, y

    def cord_radius(z):
        z = np.asarray(z, float)
        r = radius * (1 + 0.3 * np.exp(-(((z - (tip_z or 0) - 35) / 15) ** 2)))
        if tip_z is not None:
            taper = np.sqrt(np.clip((z - tip_z) / 12.0, 0.0, 1.0))
            r = np.where(z >= tip_z, r * taper, 0.0)
        return r

    ax, ay = axis_xy(gz)
    d = np.sqrt((gx - ax) ** 2 + (gy - ay) ** 2)
    r = cord_radius(gz)
    cord = np.where(r > 0, _sigmoid((r - d) / 0.6), 0.0)
    heat = 0.95 * cord
    mask = ((d <= r) & (r > 0)).astype(np.uint8)
    if strands and tip_z is not None:
        below = gz < tip_z + 8
        # filum terminale in line with the cord, and roots crowding around the conus
        heat = np.maximum(heat, np.where(gz < tip_z, 0.3 * np.exp(-(d**2) / (2 * 0.8**2)), 0.0))
        for ang in np.linspace(0, 2 * np.pi, 8, endpoint=False):
            rr = 4.5 + 0.08 * np.clip(tip_z - gz, 0, None)
            rx, ry = ax + rr * np.cos(ang), ay + rr * np.sin(ang)
            dr = np.sqrt((gx - rx) ** 2 + (gy - ry) ** 2)
            heat = np.maximum(heat, np.where(below, 0.3 * np.exp(-(dr**2) / (2 * 0.8**2)), 0.0))
    if distractors:
        zc = 150.0
        xc, yc = axis_xy(zc)
        ball = np.sqrt((gx - xc - 21) ** 2 + (gy - yc) ** 2 + (gz - zc) ** 2) <= 6.5
        heat = np.where(ball, 0.97, heat)
        if tip_z is not None:
            zb = tip_z - 30
            xb, yb = axis_xy(zb)
            ball = np.sqrt((gx - xb) ** 2 + (gy - yb - 20) ** 2 + (gz - zb) ** 2) <= 6.0
            heat = np.where(ball, 0.97, heat)
    heat = np.clip(heat + rng.normal(0, noise, heat.shape), 0, 1).astype(np.float32)

    z0 = 0.0 if tip_z is None else tip_z
    zt = np.linspace(z0, (SHAPE[2] - 1) * sz, 2000)
    tx, ty = axis_xy(zt)
    truth = np.stack([tx, ty, zt], axis=1)
    return Phantom(heat, mask, truth, None if tip_z is None else truth[0])


def _max_dist_to_truth(cl: Centerline, ph: Phantom) -> float:
    """Largest in-plane distance (mm) of the centerline points to the truth at the same z."""
    g = cl.points_vox * np.array(SPACING)
    tx = np.interp(g[:, 2], ph.truth_grid[:, 2], ph.truth_grid[:, 0])
    ty = np.interp(g[:, 2], ph.truth_grid[:, 2], ph.truth_grid[:, 1])
    return float(np.hypot(g[:, 0] - tx, g[:, 1] - ty).max())


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(1)


@pytest.fixture(scope="module")
def fitted(phantom) -> Centerline:
    return fit_centerline(phantom.heatmap, AFFINE, SPACING)


def test_auto_finds_cord_and_conus_tip(phantom, fitted):
    cl = fitted
    assert cl.found and cl.source == "auto"
    assert not cl.inferior_end_at_edge and cl.superior_end_at_edge
    assert cl.conus_tip_vox is not None
    tip_grid = cl.conus_tip_vox * np.array(SPACING)
    assert np.linalg.norm(tip_grid - phantom.tip_grid) <= 3.0
    np.testing.assert_allclose(cl.conus_tip_mm, AFFINE[:3, :3] @ cl.conus_tip_vox + AFFINE[:3, 3])
    np.testing.assert_allclose(cl.points_vox[0], cl.conus_tip_vox)


def test_auto_stays_on_the_cord(phantom, fitted):
    assert _max_dist_to_truth(fitted, phantom) <= 1.0
    # reaches the top of the view, ordered inferior -> superior, ~1 mm apart
    assert fitted.points_vox[-1, 2] >= SHAPE[2] - 1.5
    assert np.all(np.diff(fitted.points_vox[:, 2]) > 0)
    steps = np.linalg.norm(np.diff(fitted.points_mm, axis=0), axis=1)
    assert 0.8 < steps.mean() < 1.2
    np.testing.assert_allclose(fitted.points_mm, fitted.points_vox @ AFFINE[:3, :3].T + AFFINE[:3, 3])
    assert fitted.confidence.shape == (len(fitted.points_vox),)
    assert fitted.mean_confidence > 0.7


def test_no_continuation_into_cauda_equina():
    """Stronger, wider roots and a filum: still no centerline below the conus."""
    ph = make_phantom(2, tip_z=80.0, noise=0.06)
    cl = fit_centerline(ph.heatmap, AFFINE, SPACING)
    lowest_z = cl.points_vox[:, 2].min() * SPACING[2]
    assert lowest_z >= 80.0 - 3.0
    assert abs(cl.conus_tip_vox[2] * SPACING[2] - 80.0) <= 3.0


def test_brighter_distractor_beside_the_cord_is_ignored():
    ph = make_phantom(3, distractors=False)
    sx, sy, sz = SPACING
    gx = np.arange(SHAPE[0])[:, None, None] * sx
    gy = np.arange(SHAPE[1])[None, :, None] * sy
    gz = np.arange(SHAPE[2])[None, None, :] * sz
    # a long bright bar 18 mm to the right (bigger than the cord) over 40 mm of z
    bar = (np.abs(gx - 49) <= 4) & (np.abs(gy - 30) <= 4) & (np.abs(gz - 140) <= 20)
    heat = np.where(bar, 1.0, ph.heatmap).astype(np.float32)
    cl = fit_centerline(heat, AFFINE, SPACING)
    assert cl.found
    assert _max_dist_to_truth(cl, ph) <= 1.0


def test_empty_and_noise_only_heatmaps_find_nothing():
    empty = fit_centerline(np.zeros(SHAPE, np.float32), AFFINE, SPACING)
    assert not empty.found and empty.points_vox.shape == (0, 3) and empty.conus_tip_vox is None
    noise = np.clip(np.random.default_rng(4).normal(0.05, 0.05, SHAPE), 0, 1).astype(np.float32)
    assert not fit_centerline(noise, AFFINE, SPACING).found
    # a cauda-equina-only view (below the conus) is not a cord either
    ph = make_phantom(5, tip_z=260.0, distractors=False)
    assert not fit_centerline(ph.heatmap, AFFINE, SPACING).found
    assert not centerline_to_mask(empty, SHAPE).any()
    # one big bright organ-like blob (40 mm across) is not a cord
    g = np.indices(SHAPE).astype(float) * np.array(SPACING)[:, None, None, None]
    centre = np.array([30.0, 30.0, 120.0])[:, None, None, None]
    blob = (np.sqrt(((g - centre) ** 2).sum(0)) <= 20).astype(np.float32)
    assert not fit_centerline(blob, AFFINE, SPACING).found


def test_cord_through_whole_view_has_no_tip():
    ph = make_phantom(6, tip_z=None)
    cl = fit_centerline(ph.heatmap, AFFINE, SPACING)
    assert cl.found and cl.inferior_end_at_edge and cl.superior_end_at_edge
    assert cl.conus_tip_vox is None and cl.conus_tip_mm is None
    assert cl.points_vox[0, 2] <= 0.5 and cl.points_vox[-1, 2] >= SHAPE[2] - 1.5
    assert _max_dist_to_truth(cl, ph) <= 1.0


def test_strong_sagittal_curvature():
    # in-plane slope up to 2*pi*12/100 = 0.75 mm per mm of z (about 37 degrees)
    ph = make_phantom(7, lordosis=12.0, period=100.0)
    cl = fit_centerline(ph.heatmap, AFFINE, SPACING)
    assert cl.found
    assert _max_dist_to_truth(cl, ph) <= 1.0
    assert np.linalg.norm(cl.conus_tip_vox * np.array(SPACING) - ph.tip_grid) <= 3.0


def test_short_gap_is_bridged():
    ph = make_phantom(8, distractors=False)
    heat = ph.heatmap.copy()
    heat[:, :, 70:74] = 0.0  # 8 mm of missing evidence mid-cord
    cl = fit_centerline(heat, AFFINE, SPACING)
    assert cl.found and not cl.inferior_end_at_edge
    assert abs(cl.conus_tip_vox[2] * SPACING[2] - 60.0) <= 3.0


def test_reference_mode_recovers_phantom(phantom):
    cl = centerline_from_mask(phantom.mask, AFFINE, SPACING)
    assert cl.found and cl.source == "reference" and not cl.inferior_end_at_edge
    assert _max_dist_to_truth(cl, phantom) <= 1.0
    assert np.linalg.norm(cl.conus_tip_vox * np.array(SPACING) - phantom.tip_grid) <= 3.0
    assert not centerline_from_mask(np.zeros(SHAPE), AFFINE).found
    auto = fit_centerline(phantom.heatmap, AFFINE, SPACING)
    err = centerline_error_mm(auto, cl)
    assert err.mean_mm < 0.6 and err.max_mm < 1.5 and err.overlap_mm > 150


def test_file_mode_points_table(tmp_path, phantom):
    ref = centerline_from_mask(phantom.mask, AFFINE, SPACING)
    tsv = tmp_path / "cl.tsv"
    tsv.write_text(centerline_to_tsv(ref))
    back = centerline_from_file(tsv, SHAPE, AFFINE)
    assert back.source == "file" and back.found
    assert centerline_error_mm(ref, back).max_mm < 0.2
    # CSV without header, sparse points every 10 mm
    pts = ref.points_mm[::10]
    csv = tmp_path / "cl.csv"
    csv.write_text("\n".join(",".join(f"{v:.2f}" for v in p) for p in pts))
    sparse = centerline_from_file(csv, SHAPE, AFFINE)
    assert centerline_error_mm(ref, sparse).max_mm < 1.0
    np.testing.assert_allclose(sparse.conus_tip_mm, pts[0], atol=0.05)


def test_file_mode_mask_on_another_grid(tmp_path, phantom):
    """A user's centerline mask stored LPS at 0.75 mm in-plane maps back onto the working grid."""
    ref = centerline_from_mask(phantom.mask, AFFINE, SPACING)
    # native grid: x and y flipped (LPS), in-plane 0.75 mm, same z
    nat_aff = np.array([[-0.75, 0, 0, 29.0], [0, -0.75, 0, 14.0], [0, 0, 2.0, -400.0], [0, 0, 0, 1]])
    nat = np.zeros((80, 80, SHAPE[2]), np.uint8)
    ijk = np.rint((np.linalg.inv(nat_aff) @ np.c_[ref.points_mm, np.ones(len(ref.points_mm))].T)[:3].T)
    ijk = ijk.astype(int)
    nat[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = 1
    path = tmp_path / "cl.nii.gz"
    nib.save(nib.Nifti1Image(nat, nat_aff), path)
    cl = centerline_from_file(path, SHAPE, AFFINE)
    assert cl.found and cl.source == "file"
    err = centerline_error_mm(ref, cl)
    assert err.max_mm < 1.0 and err.overlap_mm > 150


def test_file_mode_errors(tmp_path):
    with pytest.raises(InputMissingError):
        centerline_from_file(tmp_path / "nope.tsv", SHAPE, AFFINE)
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(BadDataError):
        centerline_from_file(bad, SHAPE, AFFINE)
    four = tmp_path / "four.csv"
    four.write_text("1,2,3,4\n5,6,7,8\n")
    with pytest.raises(BadDataError):
        centerline_from_file(four, SHAPE, AFFINE)
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), empty)
    with pytest.raises(BadDataError):
        centerline_from_file(empty, SHAPE, AFFINE)
    notnii = tmp_path / "x.nii.gz"
    notnii.write_bytes(b"not a nifti")
    with pytest.raises(BadDataError):
        centerline_from_file(notnii, SHAPE, AFFINE)


def test_centerline_to_mask_one_voxel_per_slice(fitted):
    m = centerline_to_mask(fitted, SHAPE)
    assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    per_slice = m.sum(axis=(0, 1))
    k0 = int(np.ceil(fitted.points_vox[0, 2] - 0.5))
    assert np.all(per_slice[k0:] == 1) and np.all(per_slice[:k0] == 0)
    # each voxel is the rounded centerline position of its slice
    for k in (k0, 60, SHAPE[2] - 1):
        x, y = np.argwhere(m[:, :, k])[0]
        i = np.argmin(np.abs(fitted.points_vox[:, 2] - k))
        assert abs(x - fitted.points_vox[i, 0]) <= 1 and abs(y - fitted.points_vox[i, 1]) <= 1


def test_centerline_error_known_offset():
    z = np.arange(0, 50.0)
    vox_a = np.stack([np.full_like(z, 10.0), np.full_like(z, 10.0), z], 1)
    vox_b = vox_a + np.array([2.0 / 1.5, 0, 0])  # 2 mm to the right, over a shorter range
    a = Centerline(vox_a, vox_a @ AFFINE[:3, :3].T + AFFINE[:3, 3], AFFINE, SPACING, True)
    b = Centerline(vox_b[10:30], vox_b[10:30] @ AFFINE[:3, :3].T + AFFINE[:3, 3], AFFINE, SPACING, True)
    err = centerline_error_mm(a, b)
    assert err.mean_mm == pytest.approx(2.0) and err.max_mm == pytest.approx(2.0)
    assert err.overlap_mm == pytest.approx(19 * 2.0)
    assert np.isnan(centerline_error_mm(a, Centerline.empty(AFFINE)).mean_mm)


def test_centerline_is_immutable(fitted):
    with pytest.raises(ValueError):
        fitted.points_vox[0, 0] = 1.0


def test_centerline_to_grid_keeps_mm(fitted):
    fine = np.array([[0.5, 0, 0, -30.0], [0, 0.5, 0, -45.0], [0, 0, 0.5, -400.0], [0, 0, 0, 1]])
    cl = centerline_to_grid(fitted, fine)
    assert cl.spacing == (0.5, 0.5, 0.5)
    np.testing.assert_allclose(cl.points_mm, fitted.points_mm)
    np.testing.assert_allclose(cl.points_vox, fitted.points_vox * np.array(SPACING) / 0.5, atol=1e-9)
    np.testing.assert_allclose(cl.conus_tip_vox, fitted.conus_tip_vox * np.array(SPACING) / 0.5, atol=1e-9)
    per_slice = centerline_to_mask(cl, (120, 120, 480)).sum(axis=(0, 1))
    top = int(np.floor(cl.points_vox[-1, 2] + 0.5))
    assert per_slice[top] == 1 and not per_slice[top + 1:].any()
