"""Tests for bids_app.levels: disc conventions, levels along the cord, region split, auto discs."""

from __future__ import annotations

import math
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial import cKDTree

from bids_app import levels as lv
from bids_app.errors import BadDataError, InputMissingError, UsageError

# ----------------------------------------------------------------------------- helpers


def _rotation_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def _straight_spine(scale: float = 1.0, values=range(1, 26), disc_offset_y: float = 8.0):
    """Vertical cord along +z (superior) with discs at template spacing, 8 mm anterior."""
    z = {v: -scale * lv._TEMPLATE_POS[v - 1] for v in values}
    discs = [(v, np.array([0.0, disc_offset_y, z[v]])) for v in values]
    return z, discs


def _vertical_centerline(z_low: float, z_high: float, step: float = 1.0) -> np.ndarray:
    zs = np.arange(z_low, z_high + step / 2, step)
    return np.stack([np.zeros_like(zs), np.zeros_like(zs), zs], axis=1)


def _grid_around(points_mm: np.ndarray, linear: np.ndarray, margin_mm: float):
    """(shape, affine) of a grid with direction/zoom matrix ``linear`` covering the points."""
    inv = np.linalg.inv(linear)
    lo = points_mm.min(axis=0) - margin_mm
    hi = points_mm.max(axis=0) + margin_mm
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    vox = corners @ inv.T
    vmin, vmax = np.floor(vox.min(axis=0)), np.ceil(vox.max(axis=0))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = linear @ vmin
    return tuple(int(n) for n in vmax - vmin + 1), affine


def _tube_mask(centerline: np.ndarray, shape, affine, radius_mm: float):
    """Voxels within radius of a densely sampled centerline, and each voxel's nearest point index."""
    vox = np.indices(shape).reshape(3, -1).T
    mm = vox @ affine[:3, :3].T + affine[:3, 3]
    dist, nearest = cKDTree(centerline).query(mm, distance_upper_bound=radius_mm + 1.0)
    mask = (dist <= radius_mm).reshape(shape)
    nearest = np.minimum(nearest, len(centerline) - 1)  # only meaningful inside the mask
    return mask.astype(np.uint8), nearest.reshape(shape)


# ----------------------------------------------------------------------------- conventions


@pytest.mark.parametrize(
    ("value", "name"),
    [(1, "C0-C1"), (2, "C1-C2"), (3, "C2-C3"), (8, "C7-T1"), (17, "T9-T10"), (18, "T10-T11"),
     (20, "T12-L1"), (21, "L1-L2"), (25, "L5-S1"), (60, "conus")],
)
def test_disc_names_follow_sct_convention(value, name):
    assert lv.disc_name(value) == name
    assert lv.disc_value(name) == value


def test_disc_value_accepts_variants_and_numbers():
    assert lv.disc_value("t10/t11") == 18
    assert lv.disc_value("T12L1") == 20
    assert lv.disc_value(" L5 - S1 ") == 25
    assert lv.disc_value("17") == 17
    assert lv.disc_value(17) == 17
    assert lv.disc_value(np.int64(3)) == 3
    for value in lv.DISC_VALUES:
        assert lv.disc_value(lv.disc_name(value)) == value


@pytest.mark.parametrize("bad", ["T9-T11", "L5-L4", "X1-X2", "T13-L1", "26", 0, "", "L1"])
def test_disc_value_rejects_non_discs(bad):
    with pytest.raises(UsageError):
        lv.disc_value(bad)


def test_vertebra_names():
    assert [lv.vertebra_name(n) for n in (1, 7, 8, 19, 20, 24, 25)] == ["C1", "C7", "T1", "T12", "L1", "L5", "S1"]
    with pytest.raises(UsageError):
        lv.vertebra_name(26)
    with pytest.raises(UsageError):
        lv.disc_name(42)


# ----------------------------------------------------------------------------- reading / writing labels


def test_read_disc_labels_from_array_with_blob_and_unknown_value():
    affine = np.array([[-0.5, 0, 0, 10], [0, 0.5, 0, -20], [0, 0, 2.0, 30], [0, 0, 0, 1]])
    data = np.zeros((20, 20, 20))
    data[5, 6, 7] = 3
    data[5, 6, 9] = 5
    data[8:10, 6:8, 12] = 17  # a 2x2 blob: centroid at (8.5, 6.5, 12)
    data[1, 1, 1] = 42  # unknown value
    data[0, 0, 0] = np.nan  # non-finite voxels are ignored (with a warning)
    data[5, 6, 15] = 60  # conus marker is kept
    with pytest.warns(lv.DiscLabelWarning) as record:
        labels = lv.read_disc_labels(data, affine)
    messages = " | ".join(str(w.message) for w in record)
    assert "unknown disc label values ignored: [42]" in messages and "non-finite" in messages
    assert [d.value for d in labels] == [3, 5, 17, 60]
    blob = labels[2]
    assert blob.voxel == (8.5, 6.5, 12.0)
    np.testing.assert_allclose(blob.mm, [10 - 0.5 * 8.5, -20 + 0.5 * 6.5, 30 + 24.0])
    assert blob.name == "T9-T10"


def test_read_disc_labels_warns_on_spread_blob_and_handles_empty():
    data = np.zeros((10, 10, 40))
    data[2, 2, 0] = 21
    data[2, 2, 30] = 21  # the same value twice, 30 mm apart
    with pytest.warns(lv.DiscLabelWarning, match="spread"):
        labels = lv.read_disc_labels(data, np.eye(4))
    assert labels[0].voxel == (2.0, 2.0, 15.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lv.read_disc_labels(np.zeros((4, 4, 4)), np.eye(4)) == []


def test_read_disc_labels_from_file_uses_sform(tmp_path):
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    affine[:3, 3] = [-5, 7, -100]
    data = np.zeros((12, 12, 10), dtype=np.float32)
    data[3, 4, 5] = 3
    data[3, 5, 2] = 5
    img = nib.Nifti1Image(data, affine)
    img.set_qform(np.eye(4), code=1)  # a different qform must be ignored: sform code > 0 wins
    img.set_sform(affine, code=2)
    path = tmp_path / "sub-01_T2w_label-discs_dlabel.nii.gz"
    nib.save(img, str(path))
    labels = lv.read_disc_labels(path)
    assert [(d.value, d.voxel) for d in labels] == [(3, (3.0, 4.0, 5.0)), (5, (3.0, 5.0, 2.0))]
    np.testing.assert_allclose(labels[0].mm, [-5 + 2.4, 7 + 3.2, -100 + 15.0])


def test_read_disc_labels_errors(tmp_path):
    with pytest.raises(InputMissingError):
        lv.read_disc_labels(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(BadDataError):
        lv.read_disc_labels(bad)
    with pytest.raises(BadDataError):
        lv.read_disc_labels(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(UsageError):
        lv.read_disc_labels(np.zeros((4, 4, 4)))


def test_label_image_round_trip_and_tsv_rows():
    linear = _rotation_x(15) @ np.diag([0.9, 0.9, 1.2])
    z, discs = _straight_spine(values=[3, 4, 5])
    shape, affine = _grid_around(np.array([d[1] for d in discs]), linear, 6.0)
    image = lv.discs_to_label_image(discs, shape, affine)
    assert image.dtype == np.uint8 and image.shape == shape
    assert sorted(np.unique(image)) == [0, 3, 4, 5]
    assert np.count_nonzero(image) == 3
    labels = lv.read_disc_labels(image, affine)
    for label, (value, mm) in zip(labels, discs, strict=True):
        assert label.value == value
        assert np.linalg.norm(np.array(label.mm) - mm) <= 0.5 * np.sqrt(0.9**2 * 2 + 1.2**2) + 1e-6
    with pytest.warns(lv.DiscLabelWarning, match="outside the image grid"):
        out = lv.discs_to_label_image([(7, np.array([0.0, 0.0, 1000.0]))], shape, affine)
    assert not out.any()

    centerline = _vertical_centerline(-80, 0)
    rows = lv.discs_tsv_rows(list(reversed(discs)), centerline)
    assert [r["name"] for r in rows] == ["C2-C3", "C3-C4", "C4-C5"]
    assert rows[0]["value"] == 3
    assert rows[0]["cord_position_mm"] == pytest.approx(z[3] + 80, abs=1e-6)
    assert lv.dseg_tsv_rows() == [{"index": 1, "name": "cervicothoracic"}, {"index": 2, "name": "lumbosacral"}]


# ----------------------------------------------------------------------------- projection / levels


def test_project_on_centerline_closest_point_and_extrapolation():
    line = np.array([[0.0, 0, 0], [0, 0, 10], [0, 10, 10]])  # up 10 mm, then 10 mm anterior
    pts = np.array([[3.0, 0, 4], [0, 6, 13], [0, 0, -5], [0, 15, 10]])
    np.testing.assert_allclose(lv.project_on_centerline(pts, line), [4, 16, 0, 20])
    np.testing.assert_allclose(lv.project_on_centerline(pts, line, extrapolate=True), [4, 16, -5, 25])

    class Line:  # anything with points_mm works (the Centerline dataclass)
        points_mm = line

    assert lv.project_on_centerline(np.array([0, 0, 7.5]), Line())[0] == pytest.approx(7.5)


def test_levels_full_label_set():
    z, discs = _straight_spine()
    centerline = _vertical_centerline(z[25] - 20, z[1] + 10)
    levels = lv.levels_along_cord(centerline, discs)
    for n in range(1, 25):
        mid = (z[n] + z[n + 1]) / 2
        k = int(np.argmin(np.abs(centerline[:, 2] - mid)))
        assert levels[k] == n, (n, levels[k])
    assert np.isnan(levels[centerline[:, 2] > z[1]]).all()
    assert np.isnan(levels[centerline[:, 2] < z[25]]).all()


def test_levels_partial_discs_3_and_5_interpolate_only_between_them():
    z, discs = _straight_spine(scale=1.1, values=[3, 5])
    centerline = _vertical_centerline(z[5] - 40, z[3] + 40)
    levels = lv.levels_along_cord(centerline, discs)
    cz = centerline[:, 2]
    inside = (cz <= z[3]) & (cz >= z[5])
    assert np.isnan(levels[~inside]).all()  # no extrapolation beyond the labelled range
    assert set(np.unique(levels[inside])) == {3.0, 4.0, 5.0}  # 5 only at the disc itself
    # The missing C3-C4 disc (4) is placed by typical vertebral heights (C3 and C4 are equal).
    z4 = -1.1 * lv._TEMPLATE_POS[3]
    assert (levels[inside & (cz > z4 + 0.5)] == 3).all()
    assert (levels[inside & (cz < z4 - 0.5) & (cz > z[5])] == 4).all()


def test_lumbar_only_field_of_view_levels_and_conus():
    z, discs = _straight_spine(values=range(20, 26))
    conus_z = -np.interp(20.6, lv._TEMPLATE_VALUES, lv._TEMPLATE_POS)  # in L1
    centerline = _vertical_centerline(conus_z, z[20] + 60)  # cord enters from the top, ends at the conus
    levels = lv.levels_along_cord(centerline, discs)
    assert (levels[centerline[:, 2] < z[20]] == 20).all()
    assert np.isnan(levels[centerline[:, 2] > z[20]]).all()
    assert lv.conus_level(np.array([0.0, 0.0, conus_z]), centerline, discs) == "L1"
    marker = (lv.CONUS_VALUE, np.array([0.0, 5.0, conus_z]))  # the label-60 conus marker
    assert lv.conus_level(None, centerline, [*discs, marker]) == "L1"
    assert np.array_equal(lv.levels_along_cord(centerline, [*discs, marker]), levels, equal_nan=True)
    rows = lv.levels_tsv_rows(np.array([20.0, np.nan]))
    assert rows == [{"slice": 0, "vertebra": "L1", "level_value": 20},
                    {"slice": 1, "vertebra": "n/a", "level_value": "n/a"}]
    # The conus below the lowest known disc has no level: nothing is guessed.
    assert lv.conus_level(np.array([0.0, 0.0, conus_z]), centerline, discs[:1]) is None


def test_cervical_only_field_of_view_and_no_discs():
    z, discs = _straight_spine(values=range(2, 9))
    centerline = _vertical_centerline(z[8] - 30, z[2] + 10)
    levels = lv.levels_along_cord(centerline, discs)
    assert set(np.unique(levels[np.isfinite(levels)])) == set(range(2, 9))
    mask = np.ones((3, 3, 3), dtype=np.uint8)
    dseg, reason = lv.split_mask(mask, np.eye(4), centerline, discs)
    assert dseg is None and "T9-T10" in reason
    regions, reason = lv.region_masks(mask, np.eye(4), centerline, discs)
    assert regions is None and "T9-T10" in reason

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(lv.levels_along_cord(centerline, [])).all()
    assert lv.conus_level(np.zeros(3), centerline, []) is None
    assert lv.split_mask(mask, np.eye(4), centerline, []).dseg is None

    # Cord not found: the centerline has no points; nothing raises.
    empty = np.zeros((0, 3))
    assert lv.levels_along_cord(empty, discs).shape == (0,)
    assert lv.conus_level(np.zeros(3), empty, discs) is None
    assert "cord_position_mm" not in lv.discs_tsv_rows(discs, empty)[0]
    assert lv.split_mask(mask, np.eye(4), empty, discs, 5).dseg is None


def test_disc_labels_out_of_order_are_reported_not_fatal():
    z, discs = _straight_spine(values=[15, 16, 17, 18])
    swapped = [(15, discs[2][1]), (16, discs[1][1]), (17, discs[0][1]), (18, discs[3][1])]
    centerline = _vertical_centerline(z[18] - 10, z[15] + 10)
    with pytest.warns(lv.DiscLabelWarning, match="anatomical order"):
        assert np.isnan(lv.levels_along_cord(centerline, swapped)).all()
    result = lv.split_mask(np.ones((2, 2, 2)), np.eye(4), centerline, swapped)
    assert result.dseg is None and "anatomical order" in result.reason


def test_slice_levels_follow_the_centerline():
    points_vox = np.array([[5.0, 5, 2], [5, 5, 3], [5, 6, 4], [5, 6, 5]])
    got = lv.slice_levels(points_vox, np.array([20.0, 20, 19, 19]), 8)
    np.testing.assert_array_equal(got[:2], [np.nan, np.nan])
    np.testing.assert_array_equal(got[2:6], [20, 20, 19, 19])
    assert np.isnan(got[6:]).all()


# ----------------------------------------------------------------------------- split


def _curved_cord(radius_mm: float, phi_deg: np.ndarray, centre_yz=(0.0, 0.0)):
    """Centerline on a circle in the y-z plane, ordered by phi (inferior -> superior)."""
    phi = np.radians(phi_deg)
    return np.stack([np.full_like(phi, 3.0), centre_yz[0] + radius_mm * np.cos(phi),
                     centre_yz[1] + radius_mm * np.sin(phi)], axis=1)


def test_split_on_oblique_curved_cord_lands_on_the_plane():
    radius, zooms = 150.0, np.array([0.8, 0.7, 1.0])
    phi = np.linspace(-40, 40, 801)  # ~210 mm of gently curved cord
    centerline = _curved_cord(radius, phi)
    linear = _rotation_x(25) @ np.diag(zooms)  # oblique grid
    shape, affine = _grid_around(centerline, linear, 8.0)
    mask, _ = _tube_mask(centerline, shape, affine, radius_mm=4.0)

    # Discs 8 mm anterior of the cord (outside the circle), one every 10 degrees (~26 mm).
    disc_phi = {15: 25.0, 16: 15.0, 17: 5.0, 18: -5.0, 19: -15.0}
    discs = [(v, _curved_cord(radius + 8.0, np.array([p]))[0]) for v, p in disc_phi.items()]
    dseg, reason = lv.split_mask(mask, affine, centerline, discs)
    assert dseg is not None and "T9-T10" in reason
    assert dseg.dtype == np.uint8 and dseg.shape == mask.shape
    np.testing.assert_array_equal(dseg > 0, mask > 0)

    # True plane: through the centerline point at phi = 5 deg, normal = tangent (superior).
    p = _curved_cord(radius, np.array([5.0]))[0]
    a = math.radians(5.0)
    normal = np.array([0.0, -math.sin(a), math.cos(a)])
    vox = np.argwhere(mask)
    signed = (vox @ affine[:3, :3].T + affine[:3, 3] - p) @ normal
    labels = dseg[tuple(vox.T)]
    one_voxel = zooms.max()
    assert (signed[labels == 1] >= -one_voxel).all()
    assert (signed[labels == 2] <= one_voxel).all()
    assert (labels[signed > one_voxel] == 1).all() and (labels[signed < -one_voxel] == 2).all()
    assert (labels == 1).sum() > 1000 and (labels == 2).sum() > 1000

    regions, _ = lv.region_masks(mask, affine, centerline, discs)
    assert set(regions) == {"cervicothoracic", "lumbosacral"}
    np.testing.assert_array_equal(regions["cervicothoracic"] + regions["lumbosacral"], mask)

    # --split-level T10-T11 moves the boundary inferiorly.
    dseg18, reason18 = lv.split_mask(mask, affine, centerline, discs, "T10-T11")
    assert "T10-T11" in reason18 and (dseg18 == 2).sum() < (dseg == 2).sum()


def test_split_never_cuts_a_strongly_curved_cord_twice():
    """The extended plane crosses a hook-shaped cord again; far voxels follow the cord position."""
    radius = 40.0
    phi = np.linspace(0, 250, 1001)
    centerline = _curved_cord(radius, phi)
    shape, affine = _grid_around(centerline, np.diag([1.0, 1.0, 1.0]), 6.0)
    mask, nearest = _tube_mask(centerline, shape, affine, radius_mm=3.0)
    disc = _curved_cord(radius + 7.0, np.array([60.0]))[0]
    dseg, _ = lv.split_mask(mask, affine, centerline, [(17, disc)])
    near_phi = phi[nearest]
    inside = mask > 0
    assert (dseg[inside & (near_phi > 90)] == 1).all()  # includes phi ~ 240 where the plane returns
    assert (dseg[inside & (near_phi < 30)] == 2).all()


def test_split_rejects_far_or_invalid_split_disc():
    centerline = _vertical_centerline(-100, 0)
    mask = np.ones((2, 2, 2))
    far = lv.split_mask(mask, np.eye(4), centerline, [(17, np.array([0.0, 80.0, -50.0]))])
    assert far.dseg is None and "from the cord" in far.reason
    bad = lv.split_mask(mask, np.eye(4), centerline, [(17, np.zeros(3))], split_value="T9-T11")
    assert bad.dseg is None and "not adjacent" in bad.reason


# ----------------------------------------------------------------------------- automatic discs


def _detected(values_inferior_first, scale: float, seed: int, noise_mm: float = 0.7):
    rng = np.random.default_rng(seed)
    pos = scale * lv._TEMPLATE_POS[np.asarray(values_inferior_first) - 1]
    pts = np.stack([np.zeros_like(pos), 8.0 + 4 * np.sin(pos / 90.0), -pos], axis=1)
    return pts + rng.normal(0, noise_mm, pts.shape)


def test_identify_counting_up_from_the_sacrum_with_a_missed_disc():
    truth = [25, 24, 23, 21, 20, 19, 18]  # L3-L4 (22) missed by the detector
    result = lv.identify_discs(_detected(truth, 1.08, seed=1), sacrum_in_view=True, top_in_view=False)
    assert result.values == tuple(truth)
    assert result.confidence > 0.9
    assert "L5-S1" in result.reason and "1 undetected" in result.reason


def test_identify_counting_down_from_c2_c3():
    truth = list(range(10, 2, -1))  # T2-T3 .. C2-C3, inferior first
    values, confidence, reason, *_ = lv.identify_discs(_detected(truth, 0.92, seed=2), False, True)
    assert values == tuple(truth)
    assert confidence > 0.9 and "C2-C3" in reason
    # A sacrum flag on the same detections (an anchor output firing at the wrong end) is outweighed:
    # never a count up from L5-S1; held as a fixed constraint, the spacing priors refuse it.
    wrong_flag = lv.identify_discs(_detected(truth, 0.92, seed=2), True, False)
    assert wrong_flag.values in (None, tuple(truth)) and not wrong_flag.sacrum_anchored
    assert "sacrum outweighed" in wrong_flag.reason
    fixed = lv.IdentifyConfig(anchor_lr=math.inf)
    assert lv.identify_discs(_detected(truth, 0.92, seed=2), True, False, config=fixed).values is None


def test_identify_low_confidence_is_skipped_not_guessed():
    truth = list(range(16, 9, -1))  # mid-thoracic, neither end of the spine in view
    result = lv.identify_discs(_detected(truth, 1.0, seed=3), False, False)
    assert result.values is None
    assert result.confidence < 0.9
    assert "not trustworthy" in result.reason
    # The conus alone (usually L1-L2, range T12-L2) does not make a lumbar view trustworthy.
    lumbar = [24, 23, 22, 21, 20, 19]
    conus = np.array([0.0, 0.0, -np.interp(20.8, lv._TEMPLATE_VALUES, lv._TEMPLATE_POS)])
    assert lv.identify_discs(_detected(lumbar, 1.0, seed=4), False, False, conus).values is None


def test_identify_without_anchor_does_not_infer_missed_discs():
    """From the spacing priors and the conus alone, a labelling that needs an undetected disc is
    skipped: that is where an off-by-one count hides. The full chain is accepted."""
    truth = [25, 24, 23, 22, 21, 20, 19, 18, 17]       # L5-S1 .. T9-T10 (the shape of the synthetic views)
    conus = np.array([0.0, 8.0, -np.interp(20.8, lv._TEMPLATE_VALUES, lv._TEMPLATE_POS)])
    full = lv.identify_discs(_detected(truth, 1.0, seed=5), False, False, conus)
    gap = [v for v in truth if v != 22]                 # L3-L4 missed
    missed = lv.identify_discs(_detected(gap, 1.0, seed=5), False, False, conus)
    assert missed.values is None and "would have to be inferred" in missed.reason
    assert full.values in (None, tuple(truth))          # never a wrong count
    # with the sacrum in view the same detections are counted, the missed disc inferred
    assert lv.identify_discs(_detected(gap, 1.0, seed=5), True, False, conus).values == tuple(gap)


def test_fov_room_along_the_chain():
    """Room from each end of the chain to the edge of the field of view, along the chain."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -20.0, -100.0]          # z from -100 (index 0) to 98 (index 99)
    chain = np.array([[0.0, 0.0, -40.0], [0.0, 0.0, 0.0], [0.0, 0.0, 30.0]])
    below, above = lv.fov_room_mm(chain, (21, 21, 100), affine)
    assert below == pytest.approx(-40.0 - (-101.0)) and above == pytest.approx(99.0 - 30.0)
    # a tilted end segment leaves through the side: 45 degrees in y, 21 mm to the +y edge
    tilted = np.array([[0.0, 0.0, 0.0], [0.0, 10.0, 10.0]])
    assert lv.fov_room_mm(tilted, (21, 21, 100), affine)[1] == pytest.approx(11.0 * np.sqrt(2))
    # one disc: straight down and up
    assert lv.fov_room_mm(chain[1:2], (21, 21, 100), affine) == pytest.approx((101.0, 99.0))
    with pytest.raises(ValueError):
        lv.fov_room_mm(np.zeros((0, 3)), (21, 21, 100), affine)


def test_identify_counts_from_a_disc_free_end_of_the_field_of_view():
    """Without any anchor output, a long stretch without discs below the lowest detection is the
    sacrum (count up from L5-S1) and one above the highest is C2 with the skull base (count down
    from C2-C3). When the field of view ends close to the last disc, nothing is inferred."""
    lumbar = list(range(25, 16, -1))                   # L5-S1 .. T9-T10, the lumbosacral views
    pts = _detected(lumbar, 1.05, seed=11)
    free = lv.identify_discs(pts, False, False, room_mm=(60.0, 5.0))
    assert free.values == tuple(lumbar) and free.sacrum_anchored and not free.top_anchored
    assert free.confidence > 0.9 and "no disc in the 60 mm below" in free.reason
    cut = lv.identify_discs(pts, False, False, room_mm=(5.0, 5.0))
    assert cut.values is None and not cut.sacrum_anchored
    # the same room below a chain that really ends at L4-L5 cannot make it L5-S1: L5-S1 would
    # have to be missed in plain view, so the count stays unanchored (and is refused)
    upper = lv.identify_discs(_detected(list(range(24, 16, -1)), 1.05, seed=11), False, False,
                              room_mm=(10.0, 5.0))
    assert upper.values is None or upper.values[0] == 24
    cervical = list(range(10, 2, -1))                  # T2-T3 .. C2-C3
    top = lv.identify_discs(_detected(cervical, 0.95, seed=12), False, False, room_mm=(5.0, 45.0))
    assert top.values == tuple(cervical) and top.top_anchored and top.confidence > 0.9
    assert lv.identify_discs(_detected(cervical, 0.95, seed=12), False, False, room_mm=(5.0, 5.0)).values is None


def test_identify_edge_cases():
    assert lv.identify_discs(np.zeros((0, 3)), True, True)[:3] == (None, 0.0, "no discs detected")
    one = np.array([[0.0, 8.0, -500.0]])
    # one disc with the sacrum flag: fixed, it is L5-S1; weighed, only with the sacrum's room below it
    assert lv.identify_discs(one, True, False, config=lv.IdentifyConfig(anchor_lr=math.inf)).values == (25,)
    assert lv.identify_discs(one, True, False).values is None
    assert lv.identify_discs(one, True, False, room_mm=(60.0, 5.0)).values == (25,)
    too_many = _detected(list(range(25, 2, -1)) + [2, 1], 1.0, seed=5)
    assert lv.identify_discs(too_many, True, True).values is None
    labels = lv.make_disc_labels((21, 20), np.array([[0.0, 0, -10], [0.0, 0, 20]]), np.eye(4))
    assert [d.name for d in labels] == ["T12-L1", "L1-L2"]


def test_disc_blobs_far_from_the_spine_or_crowded_between_discs_are_dropped():
    """Regular discs along the cord are kept; a weaker blob squeezed between two discs (gap 10 mm
    where discs are 25 mm apart), a disc-like blob 120 mm from the spine below the cord's end
    (where blobs are not anchored to the cord) and one behind the cord are not discs."""
    zooms = 1.5
    shape = (40, 120, 140)
    affine = np.diag([zooms, zooms, zooms, 1.0])
    grid = np.indices(shape).transpose(1, 2, 3, 0) * zooms
    centerline = np.array([[30.0, 20.0, 0.0], [30.0, 20.0, 210.0]])
    prob = np.zeros(shape, np.float32)

    def blob(centre, value, radii=(8.0, 8.0, 3.0)):
        inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
        prob[inside] = value

    discs_z = [30.0, 55.0, 80.0, 105.0, 130.0, 155.0, 180.0]
    for z in discs_z:
        blob(np.array([30.0, 40.0, z]), 0.9)          # 20 mm anterior of the cord
    blob(np.array([30.0, 40.0, 65.0]), 0.6)            # between two discs, weaker
    points, scores = lv.disc_points_from_probability(prob, affine, centerline)
    np.testing.assert_allclose(points[:, 2], discs_z, atol=1.0)
    np.testing.assert_allclose(points[:, 1], 20.0, atol=0.5)     # moved onto the cord
    assert (scores > 0.85).all()
    loose, _ = lv.disc_points_from_probability(prob, affine, centerline, min_gap_ratio=0.0)
    assert len(loose) == len(discs_z) + 1 and any(abs(z - 65.0) < 1.5 for z in loose[:, 2])

    # the cord ends at z = 100 mm: below it, a blob far in front of the spine is dropped
    short = np.array([[30.0, 20.0, 100.0], [30.0, 20.0, 210.0]])
    blob(np.array([30.0, 160.0, 42.0]), 0.9)
    points, _ = lv.disc_points_from_probability(prob, affine, short)
    np.testing.assert_allclose(points[:, 2], discs_z, atol=1.5)
    loose, _ = lv.disc_points_from_probability(prob, affine, short, max_line_distance_mm=1e9)
    assert (loose[:, 1] > 100.0).any()      # without the distance check it would count as a disc

    # a disc-like blob 18 mm behind the cord (posterior elements, paraspinal fat) is no disc
    blob(np.array([30.0, 2.0, 92.0]), 0.9)
    points, _ = lv.disc_points_from_probability(prob, affine, centerline)
    np.testing.assert_allclose(points[:, 2], discs_z, atol=1.0)
    loose, _ = lv.disc_points_from_probability(prob, affine, centerline, max_behind_mm=1e9)
    assert any(abs(z - 92.0) < 1.5 for z in loose[:, 2])
