"""Tests of the synthetic spine MRI engine (bids_app.synth).

They use the procedural phantom and a miniature PAM50-like template written in code to a
temporary folder with PAM50's file names, so Source A's loader runs without ../shared.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bids_app.errors import BadDataError, InputMissingError, UsageError
from bids_app.synth import CORD_LABELS, LABELS, generate_crop, generate_sample
from bids_app.synth.bids_writer import main_synth, reorient_sample, write_synthetic_bids
from bids_app.synth.labels import CANAL_CONTENT_LABELS, disc_name
from bids_app.synth.template import (
    MIN_CONUS_AREA_MM2,
    TEMPLATE_SPACING,
    load_pam50_template,
    make_phantom_template,
    trim_filum,
)

BONE = [LABELS[k] for k in ("vertebral_body", "posterior_elements", "disc_annulus", "disc_nucleus", "sacrum")]


@pytest.fixture(scope="session", autouse=True)
def _template_cache(tmp_path_factory):
    """Keep built templates in a per-session folder, never in the user's cache."""
    old = os.environ.get("CONUS_CACHE_DIR")
    os.environ["CONUS_CACHE_DIR"] = str(tmp_path_factory.mktemp("conus-cache"))
    yield
    if old is None:
        os.environ.pop("CONUS_CACHE_DIR", None)
    else:
        os.environ["CONUS_CACHE_DIR"] = old


def _write_mini_pam50(folder) -> None:
    """A miniature PAM50 (0.5 mm, LAS like the real one): straight cord ending just above the
    L1-L2 disc, CSF stopping 7 mm above the cord's end, vertebral bodies and arches with gaps
    at the discs, point disc labels 1..21 and 60 on the centerline."""
    nx, ny, nz = 61, 81, 300
    ci, cj = 30, 35
    ii, jj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    # LAS: voxel i increases to the left, so x_ras = -(i - ci) * 0.5
    x = -(ii - ci) * 0.5
    y = (jj - cj) * 0.5
    disc_k = {v: 30 + (21 - v) * 12 for v in range(1, 22)}
    cord = np.zeros((nx, ny, nz), np.uint8)
    csf = np.zeros_like(cord)
    spine = np.zeros_like(cord)
    gm = np.zeros((nx, ny, nz), np.float32)
    disc = np.zeros_like(cord)
    cord_xy = (x / 3.5) ** 2 + (y / 2.6) ** 2 <= 1
    canal_xy = (x / 7.0) ** 2 + (y / 6.0) ** 2 <= 1
    body_xy = (x / 10.0) ** 2 + ((y - 14.0) / 6.0) ** 2 <= 1
    arch_xy = ((x / 10.0) ** 2 + (y / 10.0) ** 2 <= 1) & ~((x / 8.0) ** 2 + (y / 7.5) ** 2 <= 1) & (y < 2)
    gm_xy = cord_xy & ((np.abs(y) < 0.6) | ((np.abs(x) > 0.8) & (np.abs(x) < 2.0)))
    near_disc = np.zeros(nz, bool)
    for k in disc_k.values():
        near_disc[max(k - 2, 0): k + 3] = True
    for k in range(nz):
        if 31 <= k <= 295:
            taper = min(1.0, (k - 30) / 10.0)
            c = (x / (3.5 * taper)) ** 2 + (y / (2.6 * taper)) ** 2 <= 1
            cord[:, :, k] = c
            gm[:, :, k] = (gm_xy & c).astype(np.float32)
        if 45 <= k <= 290:
            csf[:, :, k] = canal_xy & ~cord[:, :, k].astype(bool)
        if 5 <= k <= 292 and not near_disc[k]:
            spine[:, :, k] = body_xy | arch_xy
    for v, k in disc_k.items():
        disc[ci, cj, k] = v
    disc[ci, cj, 31] = 60
    aff = np.array([[-0.5, 0, 0, ci * 0.5], [0, 0.5, 0, -cj * 0.5], [0, 0, 0.5, -100.0], [0, 0, 0, 1]])
    for name, arr in (("cord", cord), ("csf", csf), ("spine", spine), ("gm", gm), ("label_disc", disc)):
        nib.save(nib.Nifti1Image(arr, aff), str(folder / f"PAM50_{name}.nii.gz"))


@pytest.fixture(scope="session")
def mini_pam50(tmp_path_factory):
    folder = tmp_path_factory.mktemp("PAM50")
    _write_mini_pam50(folder)
    return folder


# --------------------------------------------------------------------------- helpers

def _assert_cord_in_sac(sample) -> None:
    """Every cord voxel's 6-neighbours are cord, CSF / canal content or epidural fat, never bone."""
    cord = np.isin(sample.labels, CORD_LABELS)
    assert np.array_equal(cord, sample.cord.astype(bool))
    ring = ndimage.binary_dilation(cord) & ~cord
    allowed = np.isin(sample.labels, list(CANAL_CONTENT_LABELS) + [LABELS["epidural_fat"]])
    # ignore the patch border, where the neighbourhood is cut
    inner = np.zeros_like(cord)
    inner[1:-1, 1:-1, 1:-1] = True
    bad = ring & inner & ~allowed
    assert not np.isin(sample.labels[bad], BONE).any()
    # and CSF (or its content) surrounds most of the cord's outline
    assert allowed[ring & inner].mean() > 0.9


def _assert_no_cord_below_conus(sample, tol_mm: float = 2.0) -> None:
    if sample.conus_tip_mm is None or not sample.cord.any():
        return
    vox = np.argwhere(sample.cord > 0)
    mm = vox @ sample.affine[:3, :3].T + sample.affine[:3, 3]
    # distance below the tip along the local cord direction (last centerline segment)
    cl = sample.centerline_mm
    direction = cl[min(5, len(cl) - 1)] - cl[0]
    direction = direction / np.linalg.norm(direction)
    below = (mm - sample.conus_tip_mm) @ direction
    assert below.min() > -tol_mm
    # and the cord really ends there: its lowest voxels reach the annotated tip
    assert np.linalg.norm(mm - sample.conus_tip_mm, axis=1).min() < tol_mm + 1.5


# --------------------------------------------------------------------------- tests

def test_disc_names_follow_sct_convention():
    assert disc_name(3) == "C2-C3"
    assert disc_name(8) == "C7-T1"
    assert disc_name(17) == "T9-T10"
    assert disc_name(21) == "L1-L2"
    assert disc_name(25) == "L5-S1"
    assert disc_name(60) == "conus"
    assert LABELS["background"] == 0 and LABELS["cord"] == 1 and LABELS["csf"] == 2


def test_crop_shape_spacing_and_types():
    s = generate_crop(3, patch_size=(40, 36, 24), spacing=(0.6, 0.6, 1.2), source="phantom")
    assert s.image.shape == s.cord.shape == s.labels.shape == (40, 36, 24)
    assert s.image.dtype == np.float32 and s.cord.dtype == np.uint8 and s.labels.dtype == np.uint8
    assert np.isfinite(s.image).all() and 0.0 <= s.image.min() and s.image.max() <= 1.0
    np.testing.assert_allclose(s.affine[:3, :3], np.diag([0.6, 0.6, 1.2]))
    assert s.spacing == pytest.approx((0.6, 0.6, 1.2))
    assert set(np.unique(s.cord)) <= {0, 1}
    assert s.levels.shape == (24,)
    # background is never empty: several tissues besides the canal
    assert len(np.unique(s.labels)) >= 5


def test_same_seed_same_bytes():
    a = generate_crop(11, source="phantom")
    b = generate_crop(11, source="phantom")
    assert a.image.tobytes() == b.image.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()
    c = generate_crop(12, source="phantom")
    assert a.image.tobytes() != c.image.tobytes()
    f1 = generate_sample(5, source="phantom", region="cervical", acquisition="sagittal")
    f2 = generate_sample(5, source="phantom", region="cervical", acquisition="sagittal")
    assert f1.image.tobytes() == f2.image.tobytes() and np.array_equal(f1.affine, f2.affine)


@pytest.mark.parametrize("seed", range(6))
def test_crop_cord_inside_csf_and_centred(seed):
    region = ["cervical", "thoracic", "lumbosacral"][seed % 3]
    s = generate_crop(seed, source="phantom", region=region)
    assert s.cord.sum() > 100
    _assert_cord_in_sac(s)
    _assert_no_cord_below_conus(s)
    # the patch is roughly centred on the cord
    cx, cy = np.argwhere(s.cord > 0)[:, :2].mean(axis=0)
    assert abs(cx - 32) < 20 and abs(cy - 32) < 20


def test_render_sac_contains_even_an_oversized_cord():
    """A cord scaled beyond its canal still gets a CSF rim: sac fraction >= cord fraction."""
    import dataclasses

    from bids_app.synth.deform import random_geometry
    from bids_app.synth.render import random_body, random_roots, render
    from bids_app.synth.template import make_phantom_template

    tpl = make_phantom_template()
    rng = np.random.default_rng(0)
    geo = random_geometry(rng, tpl, straight=True)
    geo = dataclasses.replace(geo, cord=dataclasses.replace(geo.cord, scale_x=1.6, scale_y=1.6, canal_x=0.8,
                                                            canal_y=0.8, rim=0.4))
    z = tpl.disc_z[5]
    aff = np.diag([0.5, 0.5, 1.0, 1.0])
    aff[:3, 3] = [-12, -12, z - 8]
    r = render(tpl, geo, random_body(rng), random_roots(rng, tpl, geo), aff, (48, 48, 16))
    assert (r.cord_frac > 0.5).sum() > 500
    assert np.all(r.sac_frac >= r.cord_frac - 1e-6)
    csf = r.labels == LABELS["csf"]
    ring = ndimage.binary_dilation(np.isin(r.labels, CORD_LABELS), structure=np.ones((3, 3, 1), bool))
    assert (csf & ring).sum() > 0.3 * (ring & ~np.isin(r.labels, CORD_LABELS)).sum()
    assert not np.isin(r.labels[ring], BONE).any()


def test_trim_filum_ends_the_cord_where_it_is_thick_enough():
    px = TEMPLATE_SPACING[0] * TEMPLATE_SPACING[1]
    cord = np.zeros((20, 20, 30), bool)
    cord[8:12, 8:12, 12:] = True                     # 16 px = 4 mm² from slice 12 up
    cord[10, 10, 2:12] = True                        # a 0.25 mm² thread below it
    cord[9, 10, 5] = True
    out = trim_filum(cord)
    assert not out[:, :, :12].any() and np.array_equal(out[:, :, 12:], cord[:, :, 12:])
    # the threshold is an area: a thread of 3 mm² and more stays cord
    assert np.array_equal(trim_filum(cord, min_area_mm2=px), cord)
    # a cord thinner than the threshold everywhere is left alone rather than erased
    thin = np.zeros_like(cord)
    thin[10, 10, :] = True
    assert np.array_equal(trim_filum(thin), thin)


def test_templates_end_the_cord_at_a_blunt_conus(mini_pam50):
    for tpl in (make_phantom_template(), load_pam50_template(mini_pam50)):
        k = int(round(tpl.conus_z / TEMPLATE_SPACING[2]))
        assert np.pi * tpl.cord_radius[k] ** 2 >= MIN_CONUS_AREA_MM2 - 1e-6, tpl.name
        assert tpl.cord_radius[:k].max(initial=0) == 0
        # the sac still reaches below the tip, where the filum runs
        assert (tpl.sac_sdf[:, :, max(k - 3, 0)] < 0).any()


def test_crops_below_conus_have_empty_cord():
    for seed in range(3):
        s = generate_crop(seed, source="phantom", region="below_conus")
        assert s.cord.sum() == 0
        assert s.conus_tip_mm is None
        assert np.isin(s.labels, [LABELS["csf"], LABELS["cauda_equina"], LABELS["filum"]]).any()


def test_whole_spine_discs_ordered_and_conus_in_view():
    s = generate_sample(2, source="phantom", region="whole", acquisition="sagittal", contrast="T2w")
    values = [v for v, _ in s.discs if v != 60]
    assert len(values) >= 20
    z = np.array([xyz[2] for v, xyz in s.discs if v != 60])
    order = np.argsort(-z)                            # superior to inferior
    assert list(np.array(values)[order]) == sorted(values)
    assert s.conus_tip_mm is not None and (60, ) == (s.discs[-1][0], )
    # the conus lies between T11-T12 and L2-L3 (levels T12-L2)
    zd = dict(zip(values, z, strict=True))
    assert zd[22] < s.conus_tip_mm[2] < zd[19]
    # centerline inferior -> superior, starting at the conus tip
    assert np.all(np.diff(s.centerline_mm[:, 2]) > -1.0)
    assert np.linalg.norm(s.centerline_mm[0] - s.conus_tip_mm) < 2.0
    assert s.levels.max() >= 20 and (s.levels > 0).mean() > 0.8


def test_coarse_view_spacing_and_truth():
    s = generate_sample(4, source="phantom", region="lumbosacral", spacing=(1.5, 1.5, 1.5), acquisition="iso")
    np.testing.assert_allclose(np.diag(s.affine)[:3], [1.5, 1.5, 1.5])
    assert s.image.shape == s.cord.shape
    assert s.cord.any() and s.conus_tip_mm is not None
    _assert_no_cord_below_conus(s, tol_mm=2.5)


def test_below_conus_view_is_empty():
    s = generate_sample(6, source="phantom", region="below_conus", acquisition="axial")
    assert s.cord.sum() == 0 and s.conus_tip_mm is None and len(s.centerline_mm) == 0
    assert np.isin(s.labels, [LABELS["cauda_equina"]]).any()


def test_axial_thoracolumbar_request_stays_lumbar():
    for seed in range(4):
        s = generate_sample(seed, source="phantom", region="thoracolumbar", acquisition="axial", spacing=(2.0, 2.0, 2.0))
        assert s.region == "lumbosacral" and s.meta["acquisition"] == "axial", seed


def test_axial_thick_slices_blur_along_z_only():
    s = generate_crop(8, source="phantom", region="thoracic", acquisition="axial", contrast="T2w")
    assert s.meta["acquisition"] == "axial" and s.meta["voxel"][2] >= 3.0
    dz = np.abs(np.diff(s.image, axis=2)).mean()
    dx = np.abs(np.diff(s.image, axis=0)).mean()
    assert dz < dx


def test_contrast_presets_order_cord_and_csf():
    for contrast, cord_brighter in (("T2w", False), ("T1w", True), ("T2starw", False)):
        s = generate_crop(21, source="phantom", region="cervical", contrast=contrast, acquisition="iso")
        cord = s.image[s.labels == LABELS["cord"]].mean()
        csf = s.image[s.labels == LABELS["csf"]].mean()
        assert (cord > csf) == cord_brighter, contrast


def test_pam50_loader_on_a_miniature_template(mini_pam50):
    tpl = load_pam50_template(mini_pam50)
    # the procedural extension adds L2-L5, the sacrum and the dural sac below L1-L2
    assert [v for v in sorted(tpl.disc_z) if v > 21] == [22, 23, 24, 25]
    assert tpl.sac_end_z < tpl.disc_z[25] < tpl.conus_z < tpl.disc_z[20]
    zs = sorted(tpl.disc_z.items())
    assert all(a[1] > b[1] for a, b in zip(zs, zs[1:], strict=False))
    # CSF now surrounds the conus: the sac exists at the cord's tip
    k = int(tpl.conus_z) + 1
    assert (tpl.sac_sdf[:, :, k] < 0).sum() > (tpl.cord_sdf[:, :, k] < 0).sum()
    assert (tpl.static == LABELS["disc_annulus"]).any() and (tpl.static == LABELS["sacrum"]).any()
    for seed in range(3):
        s = generate_crop(seed, pam50_dir=mini_pam50, source="pam50", region="lumbosacral")
        assert s.meta["source"] == "pam50"
        if s.cord.any():
            _assert_cord_in_sac(s)
        _assert_no_cord_below_conus(s)
    w = generate_sample(1, source="pam50", pam50_dir=mini_pam50, region="whole", acquisition="iso", spacing=(2.0, 2.0, 2.0))
    assert w.meta["source"] == "pam50" and w.conus_tip_mm is not None


def test_pam50_missing_or_bad(tmp_path, mini_pam50):
    with pytest.raises(InputMissingError):
        load_pam50_template(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in mini_pam50.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "PAM50_cord.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(BadDataError):
        load_pam50_template(bad)


def test_reorient_sample_round_trip():
    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7)).astype(np.float32)
    aff = np.diag([0.5, 0.8, 3.0, 1.0])
    aff[:3, 3] = [-10, 20, 30]
    for _ in range(8):
        perm, flips = rng.permutation(3), rng.random(3) < 0.5
        out, new = reorient_sample(data, aff, perm, flips)
        back = nib.as_closest_canonical(nib.Nifti1Image(out, new))
        np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
        np.testing.assert_allclose(back.affine, aff, atol=1e-9)


@pytest.fixture()
def fast_samples(monkeypatch):
    """The writer's logic does not depend on the grid: write 1.5 mm views to keep tests fast."""
    import functools

    import bids_app.synth.bids_writer as bw

    monkeypatch.setattr(bw, "generate_sample", functools.partial(generate_sample, spacing=(1.5, 1.5, 1.5)))


def test_write_synthetic_bids(tmp_path, fast_samples):
    out = tmp_path / "bids"
    paths = write_synthetic_bids(out, n=2, seed=3, region="lumbosacral")
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["DatasetType"] == "raw"
    deriv = json.loads((out / "derivatives" / "labels" / "dataset_description.json").read_text())
    assert deriv["DatasetType"] == "derivative"
    rows = (out / "participants.tsv").read_text().strip().splitlines()
    assert rows[0].startswith("participant_id") and len(rows) == 3
    n_discs = 0
    for p in paths:
        sub = p.name.split("_")[0]
        stem = p.name[: -len(".nii.gz")]
        lab = out / "derivatives" / "labels" / sub / "anat"
        seg = nib.load(lab / f"{stem}_label-SC_seg.nii.gz")
        discs = nib.load(lab / f"{stem}_label-discs_dlabel.nii.gz")
        img = nib.load(p)
        assert p.with_name(f"{stem}.json").is_file()
        for other in (seg, discs):
            assert other.shape == img.shape
            np.testing.assert_array_equal(other.affine, img.affine)
            assert int(other.header["qform_code"]) == int(img.header["qform_code"])
            assert int(other.header["sform_code"]) == int(img.header["sform_code"])
            assert other.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1}
        d = np.asanyarray(discs.dataobj)
        values = [int(v) for v in d[d > 0]]
        assert len(values) == len(set(values))                # single voxels, one per disc
        truth = json.loads((lab / f"{stem}_label-SC_seg.json").read_text())
        assert sorted(disc_name(v) for v in values) == sorted(truth["Discs"])
        n_discs += len(values)
        for v in values:                                      # each voxel sits at its recorded position
            vox = np.argwhere(d == v)[0]
            mm = img.affine[:3, :3] @ vox + img.affine[:3, 3]
            assert np.linalg.norm(mm - np.array(truth["Discs"][disc_name(v)])) < max(img.header.get_zooms()) * 0.9
    assert n_discs >= 2
    # same seed -> same bytes
    again = write_synthetic_bids(tmp_path / "again", n=1, seed=3, region="lumbosacral")
    a = nib.load(paths[0])
    b = nib.load(again[0])
    assert np.asanyarray(a.dataobj).tobytes() == np.asanyarray(b.dataobj).tobytes()
    np.testing.assert_array_equal(a.affine, b.affine)


def test_write_synthetic_bids_source_and_strength(tmp_path, fast_samples, mini_pam50, monkeypatch):
    """source="phantom" ignores a PAM50 found through $SCT_DIR; strength reaches the generator."""
    sct = tmp_path / "sct" / "data" / "PAM50"
    sct.mkdir(parents=True)
    (sct / "template").symlink_to(mini_pam50, target_is_directory=True)
    monkeypatch.setenv("SCT_DIR", str(tmp_path / "sct"))

    def written(name, **kwargs):
        path = write_synthetic_bids(tmp_path / name, n=1, seed=4, region="lumbosacral", contrast="T2w", **kwargs)[0]
        row = (tmp_path / name / "participants.tsv").read_text().splitlines()[1].split("\t")
        truth = json.loads(next((tmp_path / name / "derivatives").rglob("*_label-SC_seg.json")).read_text())
        return np.asanyarray(nib.load(path).dataobj), row[4], truth["Strength"]

    _, source, strength = written("default")
    assert (source, strength) == ("pam50", 1.0)
    plain, source, strength = written("phantom", source="phantom")
    assert (source, strength) == ("phantom", 1.0)
    strong, source, strength = written("strong", source="phantom", strength=1.8)
    assert (source, strength) == ("phantom", 1.8)
    assert plain.shape != strong.shape or not np.array_equal(plain, strong)
    with pytest.raises(UsageError):
        write_synthetic_bids(tmp_path / "x", n=1, seed=0, source="elbow")


def test_main_synth_and_usage_errors(tmp_path, fast_samples):
    from bids_app.cli import get_tools_parser

    # the real parser's namespace (a hand-made one once hid a renamed attribute)
    args = get_tools_parser().parse_args(["synth", str(tmp_path / "o"), "--n", "2", "--seed", "0", "--source",
                                          "phantom", "--region", "cervical", "--contrast", "T1w", "--strength", "1.2"])
    assert main_synth(args) == 0
    assert len(list((tmp_path / "o").glob("sub-*/anat/sub-*_T1w.nii.gz"))) == 2
    with pytest.raises(UsageError):
        write_synthetic_bids(tmp_path / "x", n=0, seed=0)
    with pytest.raises(UsageError):
        write_synthetic_bids(tmp_path / "x", n=1, seed=0, region="elbow")


def test_crop_pool_round_trip(tmp_path):
    from bids_app.synth.pool import iter_crop_pool, write_crop_pool

    paths = write_crop_pool(tmp_path / "pool", 3, seed=40, shard_size=2, source="phantom", patch_size=(16, 16, 8))
    assert [p.name for p in paths] == ["crops-00000.npz", "crops-00001.npz"]
    items = list(iter_crop_pool(tmp_path / "pool"))
    assert len(items) == 3
    ref = generate_crop(41, source="phantom", patch_size=(16, 16, 8))
    np.testing.assert_allclose(items[1][0], ref.image, atol=1e-3)
    np.testing.assert_array_equal(items[1][1], ref.cord)
    with pytest.raises(InputMissingError):
        next(iter_crop_pool(tmp_path / "empty"))


# --------------------------------------------------------------------------- realism features (ablations)


def test_engine_variants_are_named_and_the_default_drops_the_artefacts():
    from bids_app.synth.features import ABLATIONS, DEFAULT, FULL, Features, features_named

    # the ablation's verdict: every feature but the scanner artefacts
    assert features_named("default") == DEFAULT == Features() and DEFAULT.off() == ["artefacts"]
    assert features_named("full") == FULL and FULL.off() == []
    assert features_named("no-artefacts") == DEFAULT
    assert features_named("no-acquisition").off() == ["acquisition"]
    assert set(features_named("plain").off()) == {"artefacts", "extra_tissues", "size_variation"}
    # every single-feature arm turns exactly the feature it names off the full engine
    for name, f in ABLATIONS.items():
        if name.startswith("no-"):
            assert f.off() == [name[3:].replace("-", "_")], name
    with pytest.raises(ValueError, match="no-artefacts"):
        features_named("no-cord")


def test_default_engine_is_the_full_engine_without_artefacts_draw_for_draw():
    """Switching the artefacts off changes nothing else: where the full engine draws none, same bytes."""
    from bids_app.synth.features import FULL

    same, seeds = 0, range(12)
    for seed in seeds:
        default = generate_crop(seed, source="phantom", patch_size=(24, 24, 16))
        full = generate_crop(seed, source="phantom", patch_size=(24, 24, 16), features=FULL)
        np.testing.assert_array_equal(default.cord, full.cord)
        np.testing.assert_array_equal(default.labels, full.labels)
        same += int(np.array_equal(default.image, full.image))
    assert same < len(seeds)   # the full engine does add artefacts to some of these crops


def test_size_variation_off_keeps_template_sizes_and_other_draws():
    from bids_app.synth.deform import random_cord

    tpl = make_phantom_template()
    on = random_cord(np.random.default_rng(4), tpl)
    off = random_cord(np.random.default_rng(4), tpl, size_variation=False)
    assert (off.scale_x, off.scale_y, off.canal_x, off.canal_y, off.lumbar_enlargement) == (1, 1, 1, 1, 1)
    assert (on.scale_x, on.scale_y) != (1, 1)
    # the same random numbers are drawn: everything but the sizes is unchanged
    assert (off.shift_x, off.shift_y, off.rim, off.conus_z, off.n_roots) == \
        (on.shift_x, on.shift_y, on.rim, on.conus_z, on.n_roots)


def test_deformation_off_gives_a_straight_untilted_spine():
    from bids_app.synth.features import Features

    for seed in range(3):
        s = generate_crop(seed, source="phantom", region="thoracic", features=Features(deformation=False))
        line = s.centerline_mm
        assert len(line) > 20
        assert np.ptp(line[:, 0]) < 0.01 and np.ptp(line[:, 1]) < 0.01, seed
        bent = generate_crop(seed, source="phantom", region="thoracic").centerline_mm
        assert max(np.ptp(bent[:, 0]), np.ptp(bent[:, 1])) > 0.1, seed


def test_extra_tissues_off_gives_roots_the_csf_intensity():
    """Below the conus, T2w: roots are dark in CSF with the full engine, invisible without extra tissues."""
    from bids_app.synth.features import Features

    quiet = dict(source="phantom", region="below_conus", contrast="T2w", acquisition="iso")
    for features, same in ((Features(), False), (Features(extra_tissues=False, acquisition=False), True)):
        s = generate_crop(3, features=features, **quiet)
        roots = s.image[ndimage.binary_erosion(s.labels == LABELS["cauda_equina"])]
        csf = s.image[ndimage.binary_erosion(s.labels == LABELS["csf"], iterations=2)]
        assert roots.size > 20 and csf.size > 100
        gap = abs(np.median(roots) - np.median(csf)) / np.median(csf)
        assert (gap < 0.1) == same, (features, gap)


def test_acquisition_off_renders_on_the_working_grid():
    from bids_app.synth.features import Features

    thick = generate_crop(8, source="phantom", region="thoracic", acquisition="axial", contrast="T2w")
    sharp = generate_crop(8, source="phantom", region="thoracic", acquisition="axial", contrast="T2w",
                          features=Features(acquisition=False))
    assert thick.meta["acquisition"] == "axial" and sharp.meta["acquisition"] == "iso"
    assert sharp.meta["voxel"] == pytest.approx((0.5, 0.5, 1.0))
    # thick axial slices smooth the image along z; the working-grid image keeps its z detail
    dz = [np.abs(np.diff(s.image, axis=2)).mean() / np.abs(np.diff(s.image, axis=0)).mean() for s in (thick, sharp)]
    assert dz[0] < dz[1]
    view = generate_sample(2, source="phantom", region="cervical", acquisition="sagittal",
                           features=Features(acquisition=False))
    assert view.meta["acquisition"] == "iso" and view.spacing == pytest.approx((1.0, 1.0, 1.0))


def test_artefacts_off_never_draws_ghosts_motion_or_wrap(monkeypatch):
    from bids_app.synth import intensity
    from bids_app.synth.features import Features

    def boom(*args, **kwargs):
        raise AssertionError("artefact drawn")

    for name in ("ghosting", "motion", "wrap_around"):
        monkeypatch.setattr(intensity, name, boom)
    seeds = range(12)
    for seed in seeds:
        generate_crop(seed, source="phantom", patch_size=(24, 24, 16), features=Features(artefacts=False))
    drawn = 0
    for seed in seeds:  # the default engine has them off too
        generate_crop(seed, source="phantom", patch_size=(24, 24, 16))
    for seed in seeds:
        try:
            generate_crop(seed, source="phantom", patch_size=(24, 24, 16), features=Features(artefacts=True))
        except AssertionError:
            drawn += 1
    assert drawn > 0    # the full engine does draw them for some of these seeds
