"""Tests for bids_app.image_io: validation rules, header-exact mask writing, atomic writes."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fixtures import rotation

from bids_app.errors import BadDataError, ConusIOError, InputMissingError
from bids_app.image_io import (
    GEOMETRY_FIELDS,
    atomic_write_bytes,
    atomic_write_text,
    load_image,
    load_mask,
    save_like,
)


def make_affine(linear: np.ndarray, zooms, origin) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(linear, dtype=float) * np.asarray(zooms, dtype=float)
    aff[:3, 3] = origin
    return aff


PSR = np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], dtype=float)  # axis0 -> P, axis1 -> S, axis2 -> R

# name: (shape, affine, qform_code, sform_code)
FIXTURES = {
    "codes_2_1_oblique": (
        (12, 10, 8),
        make_affine(rotation(12, -7, 20), (0.8, 0.9, 1.5), (-30, 12, 40)),
        2,
        1,
    ),
    "codes_0_2": ((9, 11, 7), make_affine(np.eye(3), (1.0, 1.0, 2.0), (5, -6, 7)), 0, 2),
    "qfac_minus_1": (
        (10, 9, 6),
        make_affine(np.diag([-1.0, 1.0, 1.0]), (0.7, 0.7, 3.0), (40, -20, 10)),
        1,
        1,
    ),
    "sagittal_psr": ((6, 14, 12), make_affine(PSR, (0.9, 0.8, 3.5), (-8, 60, -120)), 1, 1),
    "axial_thick": ((16, 14, 5), make_affine(np.eye(3), (0.5, 0.5, 7.5), (-4, -3.5, 100)), 1, 1),
    "oblique_30deg": ((11, 13, 9), make_affine(rotation(30, 0, 0), (1.0, 1.0, 1.0), (1.5, -2.5, 3.5)), 1, 0),
}


def make_nifti(shape, affine, qcode=1, scode=1, data=None, dtype=np.int16) -> nib.Nifti1Image:
    """A NIfTI image with both forms set from ``affine`` and the given codes."""
    if data is None:
        rng = np.random.default_rng(0)
        data = rng.integers(0, 1000, size=shape).astype(dtype)
    img = nib.Nifti1Image(data, None)
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_save_like_header_fields_one_by_one(tmp_path, name):
    shape, affine, qcode, scode = FIXTURES[name]
    src_path = write(make_nifti(shape, affine, qcode, scode), tmp_path / "src.nii.gz")
    loaded = load_image(src_path)
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-4)
    mask = (loaded.data > 500).astype(np.uint8)
    out = save_like(mask, loaded.img, tmp_path / "sub" / "mask.nii.gz")
    src_hdr = nib.load(str(src_path)).header
    out_img = nib.load(str(out))
    out_hdr = out_img.header
    assert out_img.shape == shape
    for field in ("srow_x", "srow_y", "srow_z"):
        assert np.array_equal(out_hdr[field], src_hdr[field]), field
    for field in ("quatern_b", "quatern_c", "quatern_d"):
        assert out_hdr[field] == src_hdr[field], field
    for field in ("qoffset_x", "qoffset_y", "qoffset_z"):
        assert out_hdr[field] == src_hdr[field], field
    assert np.array_equal(out_hdr["pixdim"][:4], src_hdr["pixdim"][:4])  # qfac + zooms
    assert out_hdr["pixdim"][0] == src_hdr["pixdim"][0]
    assert int(out_hdr["qform_code"]) == qcode == int(src_hdr["qform_code"])
    assert int(out_hdr["sform_code"]) == scode == int(src_hdr["sform_code"])
    assert np.array_equal(out_hdr.get_best_affine(), src_hdr.get_best_affine())
    assert np.array_equal(out_img.affine, nib.load(str(src_path)).affine)
    assert out_hdr.get_data_dtype() == np.uint8
    data = np.asanyarray(out_img.dataobj)
    assert data.dtype == np.uint8
    assert set(np.unique(data)) <= {0, 1}
    assert np.array_equal(data, mask)


def test_qfac_and_codes_of_fixtures_are_what_they_claim():
    """Guard the fixtures themselves: qfac -1 really is stored, codes are as named."""
    for name in ("qfac_minus_1", "sagittal_psr"):
        shape, affine, qcode, scode = FIXTURES[name]
        assert make_nifti(shape, affine, qcode, scode).header["pixdim"][0] == -1.0
    assert nib.aff2axcodes(FIXTURES["sagittal_psr"][1]) == ("P", "S", "R")


def test_save_like_accepts_4d_single_volume_source_and_loaded_image(tmp_path):
    _, affine, _, _ = FIXTURES["codes_2_1_oblique"]
    src = write(make_nifti((5, 6, 7, 1), affine, 2, 1), tmp_path / "four.nii")
    loaded = load_image(src)
    assert loaded.data.shape == (5, 6, 7)
    out = save_like(np.ones((5, 6, 7), bool), loaded, tmp_path / "m.nii")
    img = nib.load(str(out))
    assert img.shape == (5, 6, 7)
    for field in GEOMETRY_FIELDS:
        assert np.array_equal(img.header[field], loaded.img.header[field]), field


def test_save_like_refuses_wrong_shape_and_non_binary_uint8(tmp_path):
    img = make_nifti((4, 5, 6), np.eye(4))
    with pytest.raises(BadDataError, match="shape"):
        save_like(np.zeros((4, 5, 7)), img, tmp_path / "m.nii.gz")
    with pytest.raises(BadDataError, match="fit"):
        save_like(np.full((4, 5, 6), 0.5), img, tmp_path / "m.nii.gz")
    assert not (tmp_path / "m.nii.gz").exists()
    out = save_like(np.full((4, 5, 6), 0.25, np.float32), img, tmp_path / "p.nii.gz", dtype=np.float32)
    assert np.allclose(np.asanyarray(nib.load(str(out)).dataobj), 0.25)


def test_save_like_is_deterministic(tmp_path):
    img = make_nifti((4, 5, 6), np.eye(4))
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1:3, 2:4, 1:5] = 1
    a = save_like(mask, img, tmp_path / "a.nii.gz").read_bytes()
    time.sleep(1.1)
    b = save_like(mask, img, tmp_path / "b.nii.gz").read_bytes()
    assert a == b


# ------------------------------------------------------------------------ validation


def test_missing_file(tmp_path):
    with pytest.raises(InputMissingError) as info:
        load_image(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(info.value)


def test_truncated_gzip(tmp_path):
    good = write(make_nifti((20, 20, 20), np.eye(4)), tmp_path / "good.nii.gz")
    blob = good.read_bytes()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(BadDataError) as info:
        load_image(bad)
    assert "trunc.nii.gz" in str(info.value)


def test_not_a_nifti(tmp_path):
    bad = tmp_path / "text.nii.gz"
    bad.write_bytes(gzip.compress(b"hello, this is not an image" * 20))
    with pytest.raises(BadDataError, match="text.nii.gz"):
        load_image(bad)
    plain = tmp_path / "plain.nii"
    plain.write_text("nope")
    with pytest.raises(BadDataError, match="plain.nii"):
        load_image(plain)


def test_4d_single_volume_squeezed_several_refused(tmp_path):
    one = load_image(write(make_nifti((4, 5, 6, 1), np.eye(4)), tmp_path / "one.nii"))
    assert one.data.shape == (4, 5, 6) and one.data.dtype == np.float32
    with pytest.raises(BadDataError, match="one volume"):
        load_image(write(make_nifti((4, 5, 6, 3), np.eye(4)), tmp_path / "three.nii"))


def test_2d_and_empty_dimension_refused(tmp_path):
    with pytest.raises(BadDataError, match="3-D"):
        load_image(write(make_nifti((4, 5), np.eye(4)), tmp_path / "flat.nii"))
    with pytest.raises(BadDataError, match="empty"):
        load_image(
            write(make_nifti((4, 0, 6), np.eye(4), data=np.zeros((4, 0, 6), np.int16)), tmp_path / "e.nii")
        )


@pytest.mark.parametrize("bad_zoom", [0.0, -1.0, np.nan, np.inf])
def test_bad_zooms_refused(tmp_path, bad_zoom):
    img = make_nifti((4, 5, 6), np.eye(4))
    img.header["pixdim"][2] = bad_zoom
    path = tmp_path / "z.nii"
    path.write_bytes(img.to_bytes())  # bypass nibabel's own checks on save
    with pytest.raises(BadDataError, match="voxel sizes"):
        load_image(path)


def test_non_invertible_affine_refused(tmp_path):
    singular = np.diag([1.0, 1.0, 1.0, 1.0])
    singular[:3, 2] = [1.0, 1.0, 0.0]
    singular[:3, 1] = [2.0, 2.0, 0.0]
    img = make_nifti((4, 5, 6), np.eye(4), qcode=1, scode=1)
    img.header.set_sform(singular, code=1)
    path = tmp_path / "sing.nii"
    path.write_bytes(img.to_bytes())
    with pytest.raises(BadDataError, match="invertible"):
        load_image(path)


def test_affine_rule_sform_then_qform_then_fallback(tmp_path):
    q_aff = make_affine(np.eye(3), (1, 1, 1), (10, 0, 0))
    s_aff = make_affine(np.eye(3), (1, 1, 1), (20, 0, 0))
    img = make_nifti((4, 5, 6), q_aff, qcode=1, scode=1)
    img.header.set_sform(s_aff, code=2)
    both = load_image(write(img, tmp_path / "both.nii"))
    np.testing.assert_allclose(both.affine, s_aff)
    assert any("disagree" in w for w in both.warnings)

    img.header.set_sform(s_aff, code=0)
    q_only = load_image(write(img, tmp_path / "q.nii"))
    np.testing.assert_allclose(q_only.affine, q_aff)
    assert q_only.warnings == ()

    img.header.set_qform(q_aff, code=0)
    neither = load_image(write(img, tmp_path / "none.nii"))
    np.testing.assert_allclose(neither.affine, img.header.get_base_affine())
    assert any("both 0" in w for w in neither.warnings)


def test_consistent_forms_give_no_warning(tmp_path):
    shape, affine, qcode, scode = FIXTURES["codes_2_1_oblique"]
    assert load_image(write(make_nifti(shape, affine, qcode, scode), tmp_path / "ok.nii")).warnings == ()


def test_non_finite_voxels(tmp_path):
    data = np.ones((10, 10, 10), np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 0] = np.inf
    loaded = load_image(write(make_nifti((10, 10, 10), np.eye(4), data=data), tmp_path / "few.nii"))
    assert np.all(np.isfinite(loaded.data)) and loaded.data[0, 0, 0] == 0 and loaded.data[5, 5, 5] == 1
    assert any("non-finite" in w for w in loaded.warnings)
    data[:, :5] = np.nan
    with pytest.raises(BadDataError, match="NaN"):
        load_image(write(make_nifti((10, 10, 10), np.eye(4), data=data), tmp_path / "many.nii"))


def test_scaled_data_are_float32_with_scaling_applied(tmp_path):
    img = make_nifti((3, 3, 3), np.eye(4), data=np.full((3, 3, 3), 10, np.int16))
    img.header.set_slope_inter(0.5, 1.0)
    loaded = load_image(write(img, tmp_path / "s.nii"))
    assert loaded.data.dtype == np.float32 and np.allclose(loaded.data, 6.0)


# ------------------------------------------------------------------------ masks


def test_load_mask_binarises_and_keeps_grid(tmp_path):
    data = np.zeros((6, 6, 6), np.float32)
    data[2:4, 2:4, 2:4] = 0.7
    data[0, 0, 0] = 0.3
    path = write(make_nifti((6, 6, 6), np.eye(4), data=data), tmp_path / "m.nii.gz")
    image = load_image(path)
    mask = load_mask(path, like=image)
    assert mask.data.dtype == np.uint8 and int(mask.data.sum()) == 8 and mask.warnings == ()


def test_load_mask_resamples_to_like_grid_with_warning(tmp_path):
    fine_aff = make_affine(np.eye(3), (0.5, 0.5, 0.5), (0, 0, 0))
    image = load_image(write(make_nifti((20, 20, 20), fine_aff), tmp_path / "img.nii"))
    coarse_aff = make_affine(np.eye(3), (1.0, 1.0, 1.0), (0.25, 0.25, 0.25))  # same field of view
    coarse = np.zeros((10, 10, 10), np.uint8)
    coarse[3:7, 2:5, 4:9] = 1
    path = write(make_nifti((10, 10, 10), coarse_aff, data=coarse), tmp_path / "ref.nii.gz")
    mask = load_mask(path, like=image)
    assert mask.data.shape == (20, 20, 20)
    np.testing.assert_allclose(mask.affine, image.affine)
    assert any("nearest neighbour" in w for w in mask.warnings)
    expected = np.kron(coarse, np.ones((2, 2, 2), np.uint8))  # each coarse voxel = 2x2x2 fine voxels
    assert np.array_equal(mask.data, expected)


# ------------------------------------------------------------------------ atomic writes


def test_atomic_write_text_and_bytes(tmp_path):
    target = tmp_path / "a" / "b" / "f.json"
    atomic_write_text(target, "{}\n")
    assert target.read_text() == "{}\n"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]


def test_atomic_write_failure_keeps_old_content_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(ConusIOError, match="disk full"):
        atomic_write_text(target, "new content")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_killed_write_leaves_no_partial_file(tmp_path):
    """SIGKILL a process in the middle of a write: the final name never holds partial data."""
    target = tmp_path / "big.bin"
    code = (
        "import os, sys, time\n"
        "from bids_app import image_io\n"
        "os.fsync = lambda fd: time.sleep(60)\n"  # hang after the data are written, before the rename
        "image_io.atomic_write_bytes(sys.argv[1], b'x' * 1_000_000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)])
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
            time.sleep(0.05)
        assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), "writer never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not target.exists()
