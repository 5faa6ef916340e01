"""End-to-end tests of the inference chain with the shipped models (``models/``).

Centerline → crop extended 30 mm → sliding-window U-Net → native mask, on small procedural
phantoms (``bids_app.synth.generate_sample(source="phantom")``, cropped around the cord so that
each segmentation takes a few seconds). The shipped bundles must be present: a missing
``models/seg-general`` is a failure, not a skip.

The Dice floors below were measured with the shipped models (value in the comment) and set
with a margin; they are not targets.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fixtures import write_dataset_description

from bids_app import cli, inference, metrics, registry
from bids_app import levels as lv
from bids_app.errors import BundleError
from bids_app.geometry import reorientation_for
from bids_app.image_io import GEOMETRY_FIELDS, load_image, load_mask
from bids_app.synth import LABELS, generate_sample

PHANTOM_SEED = 0
NO_CORD_SEED = 0
CUT_MM = 15.0
#: Dice with the true centerline given as a file; measured 0.917 on PHANTOM_SEED.
FILE_DICE_FLOOR = 0.80
#: Dice with ``--centerline reference``; measured 0.918 on PHANTOM_SEED.
REFERENCE_DICE_FLOOR = 0.80
#: How far apart (mm) the inferior ends of the masks may be with the full and the cut centerline.
END_TOLERANCE_MM = 3.0
#: where the mask ends vs the phantom's true conus tip. History: seg-general v1 (model.keras sha256
#: 2c52eae1…, 155 min) ended 5.2 mm above it; the shipped model (bundle f67b971a…, warm-started from it on
#: labels whose cord ends at a blunt conus, filum not cord) ends 9.4 mm above it on this phantom,
#: though its median tip error over 48 held-out synthetic crops is 7.0 mm (v1: 10.5 mm) and it
#: runs past the tip less often (5 vs 20 of 48). A known weakness, in the model card, not hidden.
CONUS_END_TOLERANCE_MM = 10.0


# --------------------------------------------------------------------------------------------
# phantoms


def _crop_sample(image, cord, affine, lo_mm, hi_mm):
    """Crop ``image``/``cord`` to the voxel box covering the scanner-mm box [lo_mm, hi_mm]."""
    inv = np.linalg.inv(affine)
    corners = np.array([[x, y, z] for x in (lo_mm[0], hi_mm[0]) for y in (lo_mm[1], hi_mm[1])
                        for z in (lo_mm[2], hi_mm[2])])
    vox = corners @ inv[:3, :3].T + inv[:3, 3]
    start = np.clip(np.floor(vox.min(axis=0)).astype(int), 0, None)
    stop = np.minimum(np.ceil(vox.max(axis=0)).astype(int) + 1, image.shape)
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return image[box], cord[box], new_affine


@pytest.fixture(scope="module")
def phantom():
    """A lumbosacral phantom (isotropic ~1 mm) cropped to the cord: 35 mm below the conus tip,
    50 mm above it, 14 mm around the centerline. Returns (image, cord, affine, centerline_mm)."""
    s = generate_sample(PHANTOM_SEED, source="phantom", region="lumbosacral", acquisition="iso")
    assert s.conus_tip_mm is not None
    tip, pts = s.conus_tip_mm, s.centerline_mm
    lo = np.array([pts[:, 0].min() - 14.0, pts[:, 1].min() - 14.0, tip[2] - 35.0])
    hi = np.array([pts[:, 0].max() + 14.0, pts[:, 1].max() + 14.0, tip[2] + 50.0])
    image, cord, affine = _crop_sample(s.image, s.cord, s.affine, lo, hi)
    inside = (pts[:, 2] >= affine[2, 3] - 0.5) & (pts[:, 2] <= hi[2])
    return image.astype(np.float32), cord.astype(np.uint8), affine, pts[inside]


@pytest.fixture(scope="module")
def no_cord_phantom():
    """A phantom below the conus (dural sac, cauda equina, sacrum; no cord), cropped to 40 mm
    around the sac in-plane and its upper 100 mm. Returns (image, affine)."""
    s = generate_sample(NO_CORD_SEED, source="phantom", region="below_conus", acquisition="iso")
    assert not s.cord.any()
    sac = np.argwhere(np.isin(s.labels, [LABELS["csf"], LABELS["cauda_equina"], LABELS["filum"]]))
    sac_mm = sac @ s.affine[:3, :3].T + s.affine[:3, 3]
    centre = sac_mm.mean(axis=0)
    top = sac_mm[:, 2].max()
    lo = np.array([centre[0] - 20.0, centre[1] - 20.0, top - 100.0])
    hi = np.array([centre[0] + 20.0, centre[1] + 20.0, top])
    image, _, affine = _crop_sample(s.image, s.cord, s.affine, lo, hi)
    return image.astype(np.float32), affine


@pytest.fixture(scope="module")
def models():
    """The shipped segmentation bundle, loaded once (file / reference centerline modes)."""
    folder = registry.models_dir() / registry.default_bundle("segmentation")
    assert folder.is_dir(), f"shipped model missing: {folder} (the shipped bundles must be committed)"
    return inference.Models(inference.InferenceOptions(centerline_mode="file"))


@pytest.fixture(scope="module")
def phantom_files(phantom, tmp_path_factory):
    """The phantom as NIfTI, its cord mask, and its true centerline as a TSV (mm), full and cut
    ``CUT_MM`` short at the inferior end (towards the conus)."""
    image, cord, affine, points = phantom
    folder = tmp_path_factory.mktemp("phantom")
    nib.save(nib.Nifti1Image(image, affine), folder / "image.nii.gz")
    nib.save(nib.Nifti1Image(cord, affine), folder / "cord.nii.gz")
    arc = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))]
    for name, keep in (("full", np.ones(len(points), bool)), ("cut", arc >= CUT_MM)):
        np.savetxt(folder / f"{name}.tsv", points[keep], delimiter="\t", header="x_mm\ty_mm\tz_mm", comments="")
    return folder


def _segment_with_file(folder: Path, name: str, models):
    options = inference.InferenceOptions(centerline_mode="file", centerline_file=folder / f"{name}.tsv")
    return inference.segment_image(load_image(folder / "image.nii.gz"), options, models=models)


def _inferior_end_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    z = metrics.si_coordinates_mm(mask, affine)
    assert z.size, "empty mask"
    return float(z.min())


@pytest.fixture(scope="module")
def full_result(phantom_files, models):
    return _segment_with_file(phantom_files, "full", models)


# --------------------------------------------------------------------------------------------
# the chain on the phantom


def test_true_centerline_gives_a_good_mask(full_result, phantom):
    _, cord, _, _ = phantom
    assert full_result.cord_found and full_result.mask.dtype == np.uint8
    assert full_result.mask.shape == cord.shape
    assert metrics.dice(full_result.mask, cord) >= FILE_DICE_FLOOR


@pytest.fixture(scope="module")
def cut_result(phantom_files, models):
    return _segment_with_file(phantom_files, "cut", models)


def test_centerline_cut_short_costs_little(full_result, cut_result, phantom, phantom_files):
    """Issue 6: a centerline cut 15 mm short (towards the conus) costs < 0.02 Dice, because the
    crop extends 30 mm beyond the centerline's ends."""
    _, cord, _, points = phantom
    cut_points = np.loadtxt(phantom_files / "cut.tsv", skiprows=1)
    assert cut_points[:, 2].min() - points[:, 2].min() >= CUT_MM - 2.0   # the cut is real
    dice_full, dice_cut = metrics.dice(full_result.mask, cord), metrics.dice(cut_result.mask, cord)
    assert dice_full - dice_cut < 0.02, (dice_full, dice_cut)


def test_model_not_crop_decides_where_the_cord_ends(full_result, cut_result, phantom, phantom_files):
    """The thesis's central finding, checked on the mask's inferior end: with the full or the
    cut centerline the mask ends at the same place (the crops end 15 mm apart), at the true
    conus, below the end of the cut centerline."""
    _, cord, affine, _ = phantom
    cut_end_mm = np.loadtxt(phantom_files / "cut.tsv", skiprows=1)[:, 2].min()
    end_full, end_cut = _inferior_end_mm(full_result.mask, affine), _inferior_end_mm(cut_result.mask, affine)
    end_true = _inferior_end_mm(cord, affine)
    assert abs(end_full - end_cut) <= END_TOLERANCE_MM, (end_full, end_cut)
    assert abs(end_cut - end_true) <= CONUS_END_TOLERANCE_MM, (end_cut, end_true)
    assert end_cut < cut_end_mm - 5.0


def test_same_input_gives_identical_mask(full_result, phantom_files, models):
    again = _segment_with_file(phantom_files, "full", models)
    assert again.mask.tobytes() == full_result.mask.tobytes()
    assert again.probability.tobytes() == full_result.probability.tobytes()


def test_reference_centerline_mode(phantom, phantom_files, models):
    _, cord, _, _ = phantom
    loaded = load_image(phantom_files / "image.nii.gz")
    reference = load_mask(phantom_files / "cord.nii.gz", like=loaded)
    result = inference.segment_image(loaded, inference.InferenceOptions(centerline_mode="reference"),
                                     reference=reference, models=models)
    assert result.centerline.found and result.centerline.source == "reference"
    assert metrics.dice(result.mask, cord) >= REFERENCE_DICE_FLOOR


# --------------------------------------------------------------------------------------------
# through the command line: oblique header, and an image without cord


def _rotation(ax_deg: float, az_deg: float) -> np.ndarray:
    a, b = np.deg2rad(ax_deg), np.deg2rad(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ rx
    return out


@pytest.fixture(scope="module")
def cli_run(phantom, no_cord_phantom, tmp_path_factory):
    """``conus BIDS OUT participant`` (default: automatic centerline) on sub-01 = the phantom
    with an oblique header (qform code 2, sform code 1), sub-02 = the phantom without cord."""
    image, _, affine, _ = phantom
    empty, empty_affine = no_cord_phantom
    bids = tmp_path_factory.mktemp("cli") / "bids"
    write_dataset_description(bids)
    (bids / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    oblique = nib.Nifti1Image(image, _rotation(17.0, 8.0) @ affine)
    oblique.header.set_qform(oblique.affine, code=2)
    oblique.header.set_sform(oblique.affine, code=1)
    plain = nib.Nifti1Image(empty, empty_affine)
    for sub, img in (("01", oblique), ("02", plain)):
        (bids / f"sub-{sub}" / "anat").mkdir(parents=True)
        nib.save(img, bids / f"sub-{sub}" / "anat" / f"sub-{sub}_T2w.nii.gz")
    out = bids.parent / "out"
    code = cli.main([str(bids), str(out), "participant", "-q"])
    return bids, out, code


def test_oblique_mask_header_is_exact(cli_run):
    bids, out, code = cli_run
    assert code == 0
    src = nib.load(bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    assert int(src.header["qform_code"]) == 2 and int(src.header["sform_code"]) == 1
    for name in ("label-SC_seg", "label-centerline_seg"):
        written = nib.load(out / "sub-01" / "anat" / f"sub-01_T2w_{name}.nii.gz")
        for field in GEOMETRY_FIELDS:
            assert np.array_equal(written.header[field], src.header[field]), (name, field)
        assert np.array_equal(written.header["pixdim"][:4], src.header["pixdim"][:4])
        assert written.shape == src.shape and written.get_data_dtype() == np.uint8
    mask = np.asarray(nib.load(out / "sub-01" / "anat" / "sub-01_T2w_label-SC_seg.nii.gz").dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_T2w_label-SC_seg.json").read_text())
    assert sidecar["CordFound"] is True and mask.any()


def test_no_cord_in_view_gives_empty_mask(cli_run):
    _, out, code = cli_run
    assert code == 0
    anat = out / "sub-02" / "anat"
    mask = np.asarray(nib.load(anat / "sub-02_T2w_label-SC_seg.nii.gz").dataobj)
    assert not mask.any()
    sidecar = json.loads((anat / "sub-02_T2w_label-SC_seg.json").read_text())
    assert sidecar["CordFound"] is False and sidecar["ConusTip"] is None
    assert not (out / "sub-02" / "log").exists()


# --------------------------------------------------------------------------------------------
# automatic vertebral levels: a tiny multi-channel ("spine") centerline bundle whose predictions
# are replaced by analytic heatmaps read off a phantom (pointwise, exact on the coarse grid)

VOXEL_MM = 1.5
SPINE_DISCS = tuple(range(25, 15, -1))  # L5-S1 .. T8-T9, inferior first
BACKGROUND, CORD = 100.0, 1000.0
SACRUM = -5000.0  # the anchor channel; discs are encoded in [-900, 100): never cord-like


def _spine_phantom(sacrum: bool = True, discs=SPINE_DISCS):
    """A straight lumbar + lower thoracic spine at 1.5 mm, stored L-P-S (axes 0 and 1 flipped).

    Cord: a tube (radius 4 mm) from the top of the view down to the conus near L1-L2. Discs
    (``discs``, at template spacing) are Gaussian blobs (sd 4 mm, cut at 0.3) 15 mm anterior of
    the cord, centred on voxel centres, encoded as intensities ``100 - 1000 g``; their expected
    labels are the cord points at their level. The sacrum (optional) is
    a block 6-40 mm below L5-S1. Returns (image, cord mask, affine, {value: native voxel}).
    """
    z_mm = {v: round((620.0 - lv._TEMPLATE_POS[v - 1]) / VOXEL_MM) * VOXEL_MM for v in SPINE_DISCS}
    z_mm = {v: z for v, z in z_mm.items() if v in discs}
    conus_z = 620.0 - float(np.interp(20.8, lv._TEMPLATE_VALUES, lv._TEMPLATE_POS))
    shape = (21, 25, 244)
    affine = np.diag([-VOXEL_MM, -VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = [15.0, 24.0, -45.0]   # x from 15 to -15, y from 24 to -12, z from -45 up
    vox = np.indices(shape).reshape(3, -1).T
    mm = (vox @ affine[:3, :3].T + affine[:3, 3]).reshape(shape + (3,))
    x, y, z = mm[..., 0], mm[..., 1], mm[..., 2]
    cord = ((x**2 + y**2 <= 16.0) & (z >= conus_z)).astype(np.uint8)
    image = np.full(shape, BACKGROUND, np.float32)
    image[cord > 0] = CORD
    inv = np.linalg.inv(affine)
    planted = {}
    for value, zv in z_mm.items():
        centre = np.array([0.0, 15.0, zv])
        g = np.exp(-((mm - centre) ** 2).sum(axis=-1) / (2 * 4.0**2))
        blob = g > 0.3
        image[blob] = BACKGROUND - 1000.0 * g[blob]
        # SCT convention: the disc's label lies on the cord, at the disc's level
        planted[value] = tuple(int(i) for i in np.rint(inv[:3, :3] @ np.array([0.0, 0.0, zv]) + inv[:3, 3]))
    if sacrum:
        top = z_mm[25] - 6.0
        image[(np.abs(x) <= 10) & (y >= 0) & (y <= 20) & (z <= top) & (z >= top - 34.0)] = SACRUM
    return image, cord, affine, planted


def _fake_predictors(outputs):
    """Pointwise stand-ins for the networks: cord, discs and anchors read off the intensities."""

    def maps(batch):
        v = batch[..., 0]
        return {"cord": np.clip((v - BACKGROUND) / (CORD - BACKGROUND), 0.0, 1.0),
                "discs": np.where(v > -1000.0, np.clip((BACKGROUND - v) / 1000.0, 0.0, 1.0), 0.0),
                "anchors": (v <= -2000.0).astype(np.float32)}

    def channels(batch, names):
        found = maps(batch)
        return np.stack([found[name] for name in names], axis=-1).astype(np.float32)

    return {"segmentation": lambda batch: channels(batch, ("cord",)),
            "coarse": lambda batch: channels(batch, outputs)}


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    """Tiny untrained bundles at 1.5 mm: segmentation, one-channel centerline, 3-channel spine."""
    from bids_app.bundle import write_bundle
    from bids_app.training.networks import unet3d

    folder = tmp_path_factory.mktemp("bundles")
    meta = {"version": "0.0.1", "architecture": "unet3d-test", "spacing": [VOXEL_MM] * 3,
            "normalisation": {"method": "percentile_zscore", "percentiles": [0.5, 99.5], "scope": "patch"},
            "threshold": 0.5, "training": {"argv": ["conus", "train", "--test"], "seed": 0}}
    specs = {"seg": ("segmentation", 1, [16, 16, 16], None),
             "centerline": ("centerline", 1, [32, 32, 32], None),
             "spine": ("spine", 3, [32, 32, 32], ["cord", "discs", "anchors"])}
    bundles = {}
    for name, (task, n_out, patch, outputs) in specs.items():
        extra = {"outputs": outputs} if outputs else {}
        model = unet3d(base_filters=2, depth=1, name=name, outputs=n_out)
        bundles[name] = write_bundle(folder / name, model, {**meta, "name": name, "task": task,
                                                             "patch_size": patch, **extra})
    return bundles


def _models(tiny_bundles, centerline="spine", **options):
    opts = inference.InferenceOptions(model=str(tiny_bundles["seg"].path),
                                      centerline_model=str(tiny_bundles[centerline].path), **options)
    return inference.Models(opts), opts


@pytest.fixture()
def no_shipped_levels_model(monkeypatch):
    """The registry without a default levels bundle (as when none ships)."""
    monkeypatch.setattr(registry, "SHIPPED_BUNDLES",
                        {n: e for n, e in registry.SHIPPED_BUNDLES.items() if e["task"] != "levels"})


@pytest.fixture()
def fake_networks(monkeypatch):
    """Replace the bundles' networks by :func:`_fake_predictors`; counts the calls per model."""
    calls = {"segmentation": 0, "centerline": 0, "levels": 0, "lumbosacral": 0}

    def predict_fn(self, which):
        fine = which in ("segmentation", "lumbosacral")
        fn = _fake_predictors(getattr(self, which).outputs)["segmentation" if fine else "coarse"]

        def counted(batch):
            calls[which] += 1
            return fn(batch)

        return counted

    monkeypatch.setattr(inference.Models, "predict_fn", predict_fn)
    return calls


def test_spine_bundle_predicts_channels_last(tiny_bundles):
    from bids_app.segment import sliding_window_predict

    spine = tiny_bundles["spine"]
    assert spine.outputs == ("cord", "discs", "anchors") and spine.channel("anchors") == 2
    assert tiny_bundles["centerline"].outputs == ("cord",) and tiny_bundles["centerline"].channel("discs") is None
    vol = np.random.default_rng(0).random((20, 12, 34)).astype(np.float32)
    heat = sliding_window_predict(vol, spine.predict_fn(), spine.patch_size, 0.5)
    assert heat.shape == vol.shape + (3,) and 0.0 <= heat.min() and heat.max() <= 1.0
    # the roles: a spine bundle serves as centerline model, not as segmentation model
    assert registry.serves("centerline", "spine") and not registry.serves("segmentation", "spine")
    with pytest.raises(BundleError, match="cannot be used as the segmentation model"):
        inference.Models(inference.InferenceOptions(model=str(spine.path), centerline_mode="file"))


def test_coarse_run_keeps_disc_heatmaps(tiny_bundles, fake_networks):
    image, cord, affine, planted = _spine_phantom()
    loaded = _loaded(image, affine)
    models, options = _models(tiny_bundles, disc_heatmaps=True)
    assert models.levels is models.centerline       # the spine model serves both: one coarse pass
    result = inference.segment_image(loaded, options, models=models)
    assert result.cord_found and metrics.dice(result.mask, cord) > 0.95
    assert "disc_heatmaps" not in result.seconds
    heat = result.coarse_heatmaps
    assert heat is not None and set(heat) == {"affine", "discs", "anchors"}
    # the coarse grid is the working (RAS) grid here: x and y flipped from the native L-P-S
    np.testing.assert_allclose(heat["affine"], reorientation_for(affine, image.shape).working_affine)
    peak = np.asarray(np.unravel_index(np.argmax(heat["discs"]), heat["discs"].shape), float)
    peak_mm = heat["affine"][:3, :3] @ peak + heat["affine"][:3, 3]
    planted_mm = [affine[:3, :3] @ np.array(v, float) + affine[:3, 3] for v in planted.values()]
    assert min(np.linalg.norm(peak_mm - (p + [0.0, 15.0, 0.0])) for p in planted_mm) < 1e-6   # a disc centre
    assert heat["anchors"].max() == 1.0 and heat["discs"].max() == pytest.approx(1.0)
    # a one-channel centerline bundle keeps no heatmaps: a separate levels bundle gives them
    models, options = _models(tiny_bundles, centerline="centerline")
    assert models.levels is None
    assert inference.segment_image(loaded, options, models=models).coarse_heatmaps is None
    models, options = _models(tiny_bundles, centerline="centerline", disc_heatmaps=True,
                              levels_model=str(tiny_bundles["spine"].path))
    assert models.levels is not None and models.levels is not models.centerline
    result = inference.segment_image(loaded, options, models=models)
    assert result.coarse_heatmaps is not None and "disc_heatmaps" in result.seconds
    assert set(result.model_info) == {"segmentation", "centerline", "levels"}
    np.testing.assert_allclose(result.coarse_heatmaps["discs"], heat["discs"])
    # a levels bundle must predict discs
    with pytest.raises(BundleError, match="cannot be used as the levels model"):
        _models(tiny_bundles, centerline="centerline", disc_heatmaps=True,
                levels_model=str(tiny_bundles["centerline"].path))


def test_heatmaps_run_only_when_asked_without_coarse_centerline(tiny_bundles, fake_networks):
    image, cord, affine, _ = _spine_phantom()
    loaded = _loaded(image, affine)
    reference = _loaded(cord.astype(np.float32), affine)
    for asked in (False, True):
        models, options = _models(tiny_bundles, centerline_mode="reference", disc_heatmaps=asked,
                                  levels_model=str(tiny_bundles["spine"].path))
        assert models.centerline is None
        fake_networks["levels"] = 0
        result = inference.segment_image(loaded, options, reference=reference, models=models)
        assert result.cord_found and result.centerline.source == "reference"
        assert (result.coarse_heatmaps is not None) is asked
        assert (fake_networks["levels"] > 0) is asked
        assert ("disc_heatmaps" in result.seconds) is asked


def _loaded(data: np.ndarray, affine: np.ndarray):
    from bids_app.image_io import LoadedImage

    img = nib.Nifti1Image(data, affine)
    return LoadedImage(Path("phantom.nii.gz"), img, data.astype(np.float32), affine, (VOXEL_MM,) * 3, ())


def _spine_dataset(root: Path, sacrum: bool, discs) -> tuple[Path, np.ndarray, dict]:
    """One subject: the spine phantom (L-P-S, qform code 2, sform code 1) and its reference cord."""
    image, cord, affine, planted = _spine_phantom(sacrum, discs)
    write_dataset_description(root)
    (root / "participants.tsv").write_text("participant_id\nsub-01\n")
    img = nib.Nifti1Image(image, affine)
    img.header.set_qform(affine, code=2)
    img.header.set_sform(affine, code=1)
    (root / "sub-01" / "anat").mkdir(parents=True)
    nib.save(img, root / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    labels = root / "derivatives" / "labels"
    write_dataset_description(labels, "reference labels", "derivative")
    (labels / "sub-01" / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(cord, affine), labels / "sub-01" / "anat" / "sub-01_T2w_label-SC_seg.nii.gz")
    return root, cord, planted


def _run_pipeline(tmp_path, tiny_bundles, centerline="spine", sacrum=True, discs=SPINE_DISCS, **cfg_options):
    from bids_app import pipeline
    from bids_app.config import ParticipantConfig

    bids, _, planted = _spine_dataset(tmp_path / "bids", sacrum, discs)
    models, _ = _models(tiny_bundles, centerline=centerline, disc_heatmaps=True)

    def segment(loaded, cfg, reference=None):
        options = replace(pipeline.inference_options(cfg), model=str(tiny_bundles["seg"].path),
                          centerline_model=str(tiny_bundles[centerline].path))
        return inference.segment_image(loaded, options, reference=reference, models=models)

    segment.model_info = {"name": "tiny", "sha256": "1" * 64}
    out = tmp_path / "out"
    cfg = ParticipantConfig(bids_dir=bids, output_dir=out, verbosity=-1, **cfg_options)
    summary = pipeline.run_participant_level(cfg, segment)
    anat = out / "sub-01" / "anat"
    sidecar = json.loads((anat / "sub-01_T2w_label-SC_seg.json").read_text())
    return summary, bids, anat, sidecar, planted


def test_levels_auto_writes_detected_discs_and_split(tmp_path, tiny_bundles, fake_networks):
    summary, bids, anat, sidecar, planted = _run_pipeline(tmp_path, tiny_bundles, levels="auto", split=True)
    assert summary.exit_code == 0 and summary.count("ok") == 1
    assert any("experimental" in w and "label-discs_dlabel" in w for w in sidecar["Warnings"])
    src = nib.load(bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    dlabel = nib.load(anat / "sub-01_T2w_label-discs_dlabel.nii.gz")
    for name in GEOMETRY_FIELDS:
        assert np.array_equal(dlabel.header[name], src.header[name]), name
    assert dlabel.shape == src.shape and dlabel.get_data_dtype() == np.uint8
    written = np.asarray(dlabel.dataobj)
    found = {int(written[tuple(v)]): tuple(v) for v in np.argwhere(written > 0)}
    assert sorted(found) == sorted(planted)   # every planted disc, once, with its value
    for value, voxel in planted.items():   # the conus lies just above L1-L2 (21) here
        # on the cord: the cord point at the disc's level; under the conus the label is placed a fixed
        # distance behind the disc (calibrated on the synthetic engine), so a few mm off here
        tolerance = 1 if value <= 20 else 5
        assert np.abs(np.subtract(found[value], voxel)).max() <= tolerance, value
    # then exactly the labels path: discs TSV, per-slice levels, split, per-region Dice
    rows = (anat / "sub-01_T2w_desc-discs.tsv").read_text().splitlines()
    assert [r.split("\t")[1] for r in rows[1:]] == [lv.disc_name(v) for v in sorted(SPINE_DISCS)]
    assert (anat / "sub-01_T2w_desc-levels.tsv").is_file()
    dseg = np.asarray(nib.load(anat / "sub-01_T2w_label-SC_dseg.nii.gz").dataobj)
    assert set(np.unique(dseg)) == {0, 1, 2}
    split_z = planted[17][2]   # T9-T10: cervicothoracic above it, lumbosacral below (z grows upward)
    assert not (dseg[..., split_z + 2:] == 2).any() and not (dseg[..., : split_z - 1] == 1).any()
    report = json.loads((anat / "sub-01_T2w_desc-metrics.json").read_text())
    assert report["metrics"]["dice_lumbosacral"] > 0.95 and report["metrics"]["dice_cervicothoracic"] > 0.95
    levels = sidecar["Levels"]
    assert levels["DiscSource"] == "auto" and levels["Identified"] is True
    assert levels["Confidence"] > 0.9 and levels["SacrumInView"] is True and levels["TopInView"] is False
    assert levels["DiscsDetected"] == len(SPINE_DISCS) and "L5-S1" in levels["Reason"]
    assert levels["ConusLevel"] in ("L1", "T12", "L2") and report["levels"] == levels
    assert "sub-01_T2w_label-discs_dlabel.nii.gz" in sidecar["Outputs"]


def test_levels_auto_without_trustworthy_identities_skips(tmp_path, tiny_bundles, fake_networks):
    # four thoracic discs, neither end of the spine in view: the conus alone cannot fix them
    summary, _, anat, sidecar, _ = _run_pipeline(tmp_path, tiny_bundles, sacrum=False, discs=(19, 18, 17, 16),
                                                 levels="auto", split=True)
    assert summary.exit_code == 0 and summary.count("ok") == 1
    levels = sidecar["Levels"]
    assert levels["DiscSource"] == "auto" and levels["Identified"] is False and levels["Confidence"] < 0.9
    assert levels["SacrumInView"] is False and levels["DiscsDetected"] == 4
    assert any("disc identities not found" in w and levels["Reason"] in w for w in sidecar["Warnings"])
    for tail in ("label-discs_dlabel.nii.gz", "label-SC_dseg.nii.gz", "desc-discs.tsv", "desc-levels.tsv"):
        assert not (anat / f"sub-01_T2w_{tail}").exists(), tail
    assert (anat / "sub-01_T2w_label-SC_seg.nii.gz").is_file()


def test_levels_auto_with_one_channel_centerline_model_warns(tmp_path, tiny_bundles, fake_networks,
                                                            no_shipped_levels_model):
    summary, _, anat, sidecar, _ = _run_pipeline(tmp_path, tiny_bundles, centerline="centerline", levels="auto")
    assert summary.exit_code == 0
    assert any("no model predicts discs" in w for w in sidecar["Warnings"])
    assert sidecar["Levels"]["DiscSource"] is None
    assert not (anat / "sub-01_T2w_label-discs_dlabel.nii.gz").exists()
    assert not (anat / "sub-01_T2w_desc-levels.tsv").exists()


def test_tube_roi_covers_the_extended_centerline_only():
    from bids_app.inference import tube_roi

    pts = np.stack([np.full(41, 30.0), np.linspace(10, 50, 41), np.arange(40, 81, dtype=float)], 1)
    roi = tube_roi(pts, (60, 80, 140), (0.5, 0.5, 1.0), extend_mm=20.0, radius_mm=5.0)
    assert roi[30, 10, 40] and roi[30, 50, 80]
    assert roi[30, 30, 60] and roi[30 + 10, 30, 60] and not roi[30 + 11, 30, 60]   # 5 mm = 10 voxels in x
    assert roi[30, 10 - 10, 20] and not roi[30, 10, 10]       # the extension follows the oblique end direction
    assert not roi[5, 70, 40]


def test_decoy_coarse_centerline_falls_back_to_the_whole_image(tiny_bundles, fake_networks, monkeypatch):
    """A coarse centerline on a cord-like blob away from the cord (here: below the conus, where the
    phantom has no cord) gives an empty crop; the whole image is then segmented, with a warning."""
    from bids_app import centerline as cl

    image, cord, affine, _ = _spine_phantom()
    assert np.argwhere(cord)[:, 2].min() * VOXEL_MM - 45.0 > 40.0 + 30.0 + 10.0   # the crop cannot reach the cord

    def decoy(work, waff, models, overlap):
        line = np.zeros(work.shape, np.uint8)
        line[10, 12, 3:57] = 1                     # z from about -40 to +40 mm
        return cl.centerline_from_mask(line, waff), None

    monkeypatch.setattr(inference, "_coarse_centerline", decoy)
    models, options = _models(tiny_bundles)
    result = inference.segment_image(_loaded(image, affine), options, models=models)
    assert result.cord_found and metrics.dice(result.mask, cord) > 0.95
    assert any("found no cord around the coarse centerline" in w for w in result.warnings)
    # without room for the fallback the mask stays empty, and nothing crashes
    small = replace(options, fallback_windows=1)
    empty = inference.segment_image(_loaded(image, affine), small, models=models)
    assert not empty.cord_found and not any("around the coarse centerline" in w for w in empty.warnings)


def test_coarse_no_cord_fallback_needs_a_cord_sized_result(tiny_bundles, fake_networks, monkeypatch):
    """When the coarse model sees no cord, the whole image is segmented: a real cord overrules
    the coarse model, a small cord-like blob (as in views below the conus) does not."""
    from bids_app import centerline as cl

    def nothing(work, waff, models, overlap):
        return cl.Centerline.empty(waff, models.centerline.spacing), None

    monkeypatch.setattr(inference, "_coarse_centerline", nothing)
    models, options = _models(tiny_bundles)
    image, cord, affine, _ = _spine_phantom()
    result = inference.segment_image(_loaded(image, affine), options, models=models)
    assert result.cord_found and metrics.dice(result.mask, cord) > 0.95
    assert any("found no cord" in w and "mm3 of cord" in w for w in result.warnings)

    blob = np.full(image.shape, BACKGROUND, np.float32)
    blob[10:12, 11:13, 90:110] = CORD            # a thin 30 mm streak: 2x2x20 voxels of 1.5 mm, 270 mm3
    small = inference.segment_image(_loaded(blob, affine), options, models=models)
    assert not small.cord_found and not small.mask.any()
    assert any("only" in w and "< 500" in w for w in small.warnings)
    # a lower bar lets the blob through: the check, not the network, removed it
    lenient = inference.segment_image(_loaded(blob, affine), replace(options, fallback_min_cord_mm3=100.0),
                                      models=models)
    assert lenient.cord_found



def test_region_aware_segmentation_hands_over_at_the_split(tiny_bundles, fake_networks, monkeypatch):
    """Below the split disc the lumbosacral model decides, above it the general one, blended over 5 mm."""
    image, cord, affine, planted = _spine_phantom()
    loaded = _loaded(image, affine)
    reference = _loaded(cord.astype(np.float32), affine)
    discs = lv.make_disc_labels(list(planted), [affine[:3, :3] @ np.array(v, float) + affine[:3, 3]
                                                 for v in planted.values()], affine)
    split_z = (affine @ np.array([*planted[17], 1.0]))[2]        # T9-T10, the default split
    z = (affine @ np.c_[np.zeros((image.shape[2], 2)), np.arange(image.shape[2]), np.ones(image.shape[2])].T)[2]
    fake = inference.Models.predict_fn

    def blind_below(self, which):     # a lumbosacral model that sees no cord at all
        fn = fake(self, which)
        return (lambda batch: np.zeros_like(fn(batch))) if which == "lumbosacral" else fn

    monkeypatch.setattr(inference.Models, "predict_fn", blind_below)
    ls = str(tiny_bundles["seg"].path)
    for mode in ("auto", "reference"):          # whole-image and crop paths
        single_models, single_opts = _models(tiny_bundles, centerline_mode=mode)
        single = inference.segment_image(loaded, single_opts, reference=reference, models=single_models)
        models, options = _models(tiny_bundles, centerline_mode=mode, lumbosacral_model=ls)
        assert models.lumbosacral is not None
        split = inference.RegionSplit(tuple(discs), 17)
        result = inference.segment_image(loaded, options, reference=reference, models=models, split=split)
        per_slice = result.mask.sum(axis=(0, 1))
        above, below = z > split_z + 5.0 + VOXEL_MM, z < split_z - 5.0 - VOXEL_MM
        assert per_slice[below].sum() == 0 and single.mask.sum(axis=(0, 1))[below].sum() > 0, mode
        np.testing.assert_array_equal(result.mask[..., above], single.mask[..., above])
        assert "lumbosacral" in result.model_info and "lumbosacral" in result.seconds
        # without disc labels, or without the split disc among them: one model, with a warning
        for split, why in ((None, "needs the run's disc labels"), (inference.RegionSplit(tuple(discs), 5), "C4-C5")):
            result = inference.segment_image(loaded, options, reference=reference, models=models, split=split)
            np.testing.assert_array_equal(result.mask, single.mask)
            assert any(why in w for w in result.warnings), (mode, result.warnings)
    with pytest.raises(BundleError, match="cannot be used as the lumbosacral model"):
        _models(tiny_bundles, lumbosacral_model=str(tiny_bundles["spine"].path))
