"""Tests for bids_app.geometry: exact reorientation and crop round trips, bounded resampling loss."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from fixtures import rotation
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from bids_app.geometry import (
    CropBox,
    apply_affine,
    box_around_points,
    crop,
    end_direction,
    extend_polyline,
    grid_for_spacing,
    reorientation_for,
    resample,
    resample_to_grid,
    uncrop,
    voxel_sizes,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def grids(draw, min_n: int = 2, max_n: int = 12):
    """A random native grid: axis permutation, flips, oblique rotation (up to 40 deg), zooms, origin."""
    perm = draw(st.permutations([0, 1, 2]))
    flips = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    angles = draw(st.lists(st.floats(-40, 40), min_size=3, max_size=3))
    zooms = draw(st.lists(st.floats(0.3, 4.0), min_size=3, max_size=3))
    origin = draw(st.lists(st.floats(-200, 200), min_size=3, max_size=3))
    shape = tuple(draw(st.lists(st.integers(min_n, max_n), min_size=3, max_size=3)))
    linear = rotation(*angles) @ np.eye(3)[:, list(perm)] @ np.diag(flips) @ np.diag(zooms)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return shape, affine


# ------------------------------------------------------------------------ reorientation


@SETTINGS
@given(grid=grids(), seed=st.integers(0, 2**31 - 1))
def test_reorientation_round_trip_is_exact(grid, seed):
    shape, affine = grid
    arr = np.random.default_rng(seed).random(shape).astype(np.float32)
    reo = reorientation_for(affine, shape)
    work = reo.to_working(arr)
    assert work.shape == reo.working_shape
    assert np.array_equal(reo.to_native(work), arr)
    # integer working indices map to integer native indices holding the same value, same mm
    w = np.array([[0, 0, 0], [s - 1 for s in work.shape], [0, work.shape[1] - 1, work.shape[2] // 2]])
    n = reo.points_to_native_vox(w)
    assert np.allclose(n, np.round(n), atol=1e-9)
    n = np.round(n).astype(int)
    for wi, ni in zip(w, n, strict=True):
        assert work[tuple(wi)] == arr[tuple(ni)]
    np.testing.assert_allclose(apply_affine(reo.working_affine, w), apply_affine(affine, n), atol=1e-6)


@SETTINGS
@given(grid=grids())
def test_working_axes_are_ras_and_spacing_is_permuted(grid):
    shape, affine = grid
    reo = reorientation_for(affine, shape)
    directions = reo.working_affine[:3, :3] / np.asarray(reo.working_spacing)
    # nibabel's closest axis assignment of the working grid is R, A, S with no flip
    assert np.array_equal(nib.orientations.io_orientation(reo.working_affine), [[0, 1], [1, 1], [2, 1]])
    assert np.all(np.diag(directions) > 0)
    assert sorted(reo.working_spacing) == pytest.approx(sorted(voxel_sizes(affine)))
    # an oblique image is not resliced: the working affine keeps the same direction cosines up to sign
    assert abs(np.linalg.det(reo.working_affine[:3, :3])) == pytest.approx(abs(np.linalg.det(affine[:3, :3])))


def test_known_orientations():
    psr = np.array([[0, 0, 0.9, 0], [-0.8, 0, 0, 0], [0, 3.5, 0, 0], [0, 0, 0, 1]], float)
    assert nib.aff2axcodes(psr) == ("P", "S", "R")
    reo = reorientation_for(psr, (6, 14, 12))
    assert reo.working_shape == (12, 6, 14)
    assert reo.working_spacing == pytest.approx((0.9, 0.8, 3.5))
    assert nib.aff2axcodes(reo.working_affine) == ("R", "A", "S")
    ras = reorientation_for(np.diag([0.5, 0.5, 7.5, 1]), (4, 5, 6))
    assert ras.is_identity and ras.working_shape == (4, 5, 6)


def test_shape_mismatch_raises():
    reo = reorientation_for(np.eye(4), (3, 4, 5))
    with pytest.raises(ValueError):
        reo.to_working(np.zeros((3, 4, 6)))
    with pytest.raises(ValueError):
        reo.to_native(np.zeros((3, 4, 6)))


# ------------------------------------------------------------------------ crop / uncrop


@st.composite
def boxes(draw):
    shape = tuple(draw(st.lists(st.integers(1, 10), min_size=3, max_size=3)))
    start = [draw(st.integers(-5, n + 2)) for n in shape]
    stop = [a + draw(st.integers(1, 12)) for a in start]
    return shape, CropBox(tuple(start), tuple(stop))


@SETTINGS
@given(case=boxes(), seed=st.integers(0, 2**31 - 1))
def test_crop_uncrop_round_trip_is_exact(case, seed):
    shape, box = case
    arr = np.random.default_rng(seed).integers(1, 100, size=shape)
    cropped = crop(arr, box, pad_value=-1)
    assert cropped.shape == box.shape
    inside = np.zeros(shape, bool)
    sl = tuple(
        slice(max(a, 0), max(min(b, n), 0)) for a, b, n in zip(box.start, box.stop, shape, strict=True)
    )
    inside[sl] = True
    back = uncrop(cropped, box, shape, fill=0)
    assert np.array_equal(back[inside], arr[inside])
    assert np.all(back[~inside] == 0)
    # padding is exactly the part of the box outside the array
    assert int((cropped == -1).sum()) == int(np.prod(box.shape)) - int(inside.sum())
    # crop(uncrop(c)) gives c back wherever the box lies inside the array
    again = crop(uncrop(cropped, box, shape, fill=-1), box, pad_value=-1)
    assert np.array_equal(again, cropped)


def test_crop_keeps_trailing_axes_and_rejects_empty_box():
    arr = np.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)
    box = CropBox((0, 1, 1), (2, 3, 3))
    assert np.array_equal(crop(arr, box), arr[0:2, 1:3, 1:3])
    with pytest.raises(ValueError):
        CropBox((0, 0, 0), (1, 0, 1))


# ------------------------------------------------------------------------ resampling


def test_grid_for_spacing_covers_same_field_of_view():
    affine = np.eye(4)
    affine[:3, :3] = rotation(10, 20, 5) @ np.diag([1.0, 0.8, 3.0])
    affine[:3, 3] = [10, -5, 40]
    shape = (20, 25, 12)
    new_shape, new_affine = grid_for_spacing(shape, affine, (0.5, 0.5, 1.0))
    assert new_shape == (40, 40, 36)
    assert voxel_sizes(new_affine) == pytest.approx((0.5, 0.5, 1.0))
    centre_old = apply_affine(affine, (np.asarray(shape) - 1) / 2)
    centre_new = apply_affine(new_affine, (np.asarray(new_shape) - 1) / 2)
    np.testing.assert_allclose(centre_new, centre_old, atol=1e-9)
    # same direction cosines: an oblique grid stays oblique
    np.testing.assert_allclose(
        new_affine[:3, :3] / [0.5, 0.5, 1.0], affine[:3, :3] / [1.0, 0.8, 3.0], atol=1e-12
    )


def test_resample_identity_and_integer_factor():
    rng = np.random.default_rng(3)
    data = rng.random((6, 7, 8)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    same, same_aff = resample(data, affine, (1.0, 1.0, 2.0), order=1)
    assert np.allclose(same, data, atol=1e-6) and np.allclose(same_aff, affine)
    mask = (data > 0.5).astype(np.uint8)
    fine, fine_aff = resample(mask, affine, (0.5, 0.5, 1.0), order=0)
    assert fine.dtype == np.uint8 and fine.shape == (12, 14, 16)
    assert np.array_equal(fine, np.kron(mask, np.ones((2, 2, 2), np.uint8)))
    back = resample_to_grid(fine, fine_aff, mask.shape, affine, order=0)
    assert np.array_equal(back, mask)


def test_resample_to_grid_outside_field_of_view_gets_cval():
    data = np.ones((4, 4, 4), np.float32)
    shifted = np.eye(4)
    shifted[0, 3] = 3.0  # destination voxel i sits at source i + 3
    out = resample_to_grid(data, np.eye(4), (4, 4, 4), shifted, order=1, cval=-7.0)
    assert np.all(out[0] == 1.0)  # source x = 3: inside
    assert np.all(out[1:] == -7.0)  # source x >= 4: outside (edge at 3.5)
    near = np.eye(4)
    near[0, 3] = 0.4  # centres shifted by 0.4 voxel: the last one (3.4) is still within the edge
    assert np.all(resample_to_grid(data, np.eye(4), (4, 4, 4), near, order=1) == 1.0)


def naive_resample(data, src_affine, dst_shape, dst_affine, order, cval):
    """Reference implementation: every destination voxel centre mapped one by one."""
    matrix = np.linalg.solve(src_affine, dst_affine)
    idx = np.indices(dst_shape).reshape(3, -1).T.astype(np.float64)
    src = apply_affine(matrix, idx)
    values = ndimage.map_coordinates(data.astype(np.float32), src.T, order=order, mode="nearest")
    inside = np.all((src >= -0.5 - 1e-6) & (src <= np.asarray(data.shape) - 0.5 + 1e-6), axis=1)
    return np.where(inside, values, cval).reshape(dst_shape)


@settings(max_examples=30, deadline=None)
@given(src=grids(min_n=3, max_n=10), dst=grids(min_n=3, max_n=10), seed=st.integers(0, 2**31 - 1))
def test_resample_to_grid_matches_naive_mapping(src, dst, seed):
    """Sub-box interpolation and field-of-view masking equal a voxel-by-voxel reference."""
    (src_shape, src_aff), (dst_shape, dst_aff) = src, dst
    dst_aff = dst_aff.copy()
    dst_aff[:3, 3] = src_aff[:3, 3] + np.random.default_rng(seed).uniform(-8, 8, 3)  # partial overlaps
    data = np.random.default_rng(seed).random(src_shape).astype(np.float32)
    fast = resample_to_grid(data, src_aff, dst_shape, dst_aff, order=1, cval=-1.0)
    np.testing.assert_allclose(fast, naive_resample(data, src_aff, dst_shape, dst_aff, 1, -1.0), atol=1e-5)


def test_small_crop_back_onto_a_large_grid_equals_uncrop():
    rng = np.random.default_rng(1)
    affine = np.eye(4)
    affine[:3, :3] = rotation(5, 10, 0) @ np.diag([0.5, 0.5, 1.0])
    box = CropBox((10, 20, 5), (30, 36, 25))
    shift = np.eye(4)
    shift[:3, 3] = box.start
    patch = rng.random(box.shape).astype(np.float32)
    back = resample_to_grid(patch, affine @ shift, (120, 140, 60), affine, order=1, cval=0.0)
    assert np.array_equal(back, uncrop(patch, box, (120, 140, 60)))
    far = np.eye(4)
    far[:3, 3] = [1000, 0, 0]
    assert np.all(resample_to_grid(patch, far, (5, 5, 5), np.eye(4), order=1, cval=3.0) == 3.0)


def ellipsoid_in_native(shape, zooms, semi_axes_mm) -> np.ndarray:
    """Binary ellipsoid centred in the native grid, axes along the native voxel axes."""
    idx = np.indices(shape, dtype=np.float64)
    r2 = sum(((idx[i] - (shape[i] - 1) / 2) * zooms[i] / semi_axes_mm[i]) ** 2 for i in range(3))
    return (r2 <= 1.0).astype(np.uint8)


def round_trip(mask: np.ndarray, affine: np.ndarray, model_spacing, order: int = 1) -> np.ndarray:
    """native -> RAS -> model spacing -> RAS -> native, as the pipeline does with probabilities."""
    reo = reorientation_for(affine, mask.shape)
    work = reo.to_working(mask.astype(np.float32))
    model, model_aff = resample(work, reo.working_affine, model_spacing, order=order)
    back = resample_to_grid(model, model_aff, reo.working_shape, reo.working_affine, order=order)
    return (reo.to_native(back) > 0.5).astype(np.uint8)


@settings(max_examples=30, deadline=None)
@given(
    grid=grids(min_n=8, max_n=20),
    model_spacing=st.lists(st.floats(0.3, 2.0), min_size=3, max_size=3),
    fill=st.floats(0.5, 0.9),
)
def test_resampling_round_trip_loss_is_bounded_by_spacing(grid, model_spacing, fill):
    """Every voxel that changes lies within one coarse voxel (max of native and model spacing over
    the axes) of the original boundary. Measured worst case over 300 random grids: 0.71 of it."""
    shape, affine = grid
    reo = reorientation_for(affine, shape)
    zooms = np.asarray(voxel_sizes(affine))
    t_native = np.asarray(model_spacing)[reo.ornt[:, 0].astype(int)]  # model spacing per native axis
    semi = fill * (0.5 * np.asarray(shape) * zooms - zooms - t_native)
    assume(np.all(semi > 1.5 * zooms))
    mask = ellipsoid_in_native(shape, zooms, semi)
    assume(mask.sum() > 0)
    back = round_trip(mask, affine, model_spacing)
    bound = float(np.max(np.maximum(zooms, t_native))) + 1e-6
    dist_to_outside = ndimage.distance_transform_edt(mask, sampling=zooms)
    dist_to_inside = ndimage.distance_transform_edt(1 - mask, sampling=zooms)
    lost = (mask == 1) & (back == 0)
    gained = (mask == 0) & (back == 1)
    assert np.all(dist_to_outside[lost] <= bound)
    assert np.all(dist_to_inside[gained] <= bound)


def test_round_trip_dice_on_cord_like_phantom():
    """A 10x7 mm elliptic cord, 1 mm native -> 0.5x0.5x1 -> native: almost lossless."""
    shape, zooms = (30, 30, 20), (1.0, 1.0, 1.0)
    idx = np.indices(shape, dtype=np.float64)
    x, y = (idx[0] - 14.3) * zooms[0], (idx[1] - 15.1) * zooms[1]
    mask = ((x / 5.0) ** 2 + (y / 3.5) ** 2 <= 1).astype(np.uint8)
    affine = np.eye(4)
    affine[:3, :3] = rotation(15, 0, 8)
    back = round_trip(mask, affine, (0.5, 0.5, 1.0))
    dice = 2 * np.sum(mask & back) / (mask.sum() + back.sum())
    assert dice >= 0.98


# ------------------------------------------------------------------------ crop around a centerline


def test_extend_polyline_follows_end_directions():
    spacing = np.array([0.5, 0.5, 1.0])
    z = np.arange(10, 41, dtype=float)  # 30 mm of cord, tilted 20 degrees in y
    pts_mm = np.stack([np.full_like(z, 20.0), 20.0 + np.tan(np.deg2rad(20)) * (z - 10), z], axis=1)
    pts_vox = pts_mm / spacing
    down = end_direction(pts_vox, spacing, at_start=True)
    up = end_direction(pts_vox, spacing, at_start=False)
    expected = np.array([0.0, np.sin(np.deg2rad(20)), np.cos(np.deg2rad(20))])
    np.testing.assert_allclose(up, expected, atol=1e-9)
    np.testing.assert_allclose(down, -expected, atol=1e-9)
    ext = extend_polyline(pts_vox, spacing, extend_mm=30.0)
    ext_mm = ext * spacing
    np.testing.assert_allclose(np.linalg.norm(ext_mm[0] - pts_mm[0]), 30.0, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(ext_mm[-1] - pts_mm[-1]), 30.0, atol=1e-9)
    np.testing.assert_allclose((ext_mm[-1] - pts_mm[-1]) / 30.0, expected, atol=1e-9)
    assert np.all(np.diff(ext_mm[:, 2]) > 0)  # still ordered inferior -> superior


def test_box_around_points_extends_beyond_both_ends_and_clips():
    spacing = (0.5, 0.5, 1.0)
    shape = (100, 100, 150)
    pts = np.stack([np.full(41, 50.0), np.full(41, 50.0), np.arange(50, 91, dtype=float)], axis=1)
    box = box_around_points(pts, (16, 12), 30.0, shape, spacing=spacing)
    # x: 50 +/- 16, y: 50 +/- 12, z: from 50 - 30 to 90 + 30 (1 mm voxels), one voxel of margin
    assert box == CropBox((34, 38, 19), (67, 63, 122))
    # near the array ends the box is clipped (no pure padding) ...
    low = pts - [0, 0, 45]
    clipped = box_around_points(low, (16, 12), 30.0, shape, spacing=spacing)
    assert clipped.start[2] == 0
    # ... and min_size grows it symmetrically, beyond the array if needed
    small = box_around_points(pts[:3], (4, 4), 0.0, shape, spacing=spacing, min_size=(64, 64, 48))
    assert small.shape == (64, 64, 48)
    far = box_around_points(
        np.array([[1.0, 1.0, 1.0]]), (4, 4), 0.0, shape, spacing=spacing, min_size=(32, 32, 8)
    )
    assert far.shape == (32, 32, 8) and far.start[0] < 0
