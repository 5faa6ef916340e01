"""Participant-level orchestration with the test-only threshold segmenter."""

from __future__ import annotations

import json
from pathlib import Path

import fixtures
import nibabel as nib
import numpy as np
import pytest
from fixtures import HEADERS, ImageSpec, build_dataset, threshold_segmenter

from bids_app import bids_io, pipeline, registry
from bids_app.config import ParticipantConfig
from bids_app.image_io import GEOMETRY_FIELDS


def _cfg(bids: Path, out: Path, **kw) -> ParticipantConfig:
    return ParticipantConfig(bids_dir=bids, output_dir=out, verbosity=-1, **kw)


def _anat(out: Path, sub: str) -> Path:
    return out / f"sub-{sub}" / "anat"


def test_every_header_kind_gives_header_exact_masks(tmp_path):
    specs = [ImageSpec(sub=f"{i:02d}", header=kind, seed=i) for i, kind in enumerate(HEADERS)]
    bids = build_dataset(tmp_path / "bids", specs)
    out = tmp_path / "out"
    summary = pipeline.run_participant_level(_cfg(bids, out), threshold_segmenter)
    assert summary.exit_code == 0 and summary.count("ok") == len(HEADERS)
    for spec in specs:
        src = nib.load(bids / spec.anat / f"{spec.stem}.nii.gz")
        mask_path = _anat(out, spec.sub) / f"{spec.stem}_label-SC_seg.nii.gz"
        mask = nib.load(mask_path)
        for name in GEOMETRY_FIELDS:
            assert np.array_equal(mask.header[name], src.header[name]), (spec.header, name)
        assert np.array_equal(mask.header["pixdim"][:4], src.header["pixdim"][:4])
        assert mask.shape == src.shape and mask.get_data_dtype() == np.uint8
        data = np.asarray(mask.dataobj)
        ref = np.asarray(nib.load(bids / "derivatives/labels" / spec.anat /
                                  f"{spec.stem}_label-SC_seg.nii.gz").dataobj)
        assert set(np.unique(data)) == {0, 1} and np.array_equal(data, ref), spec.header
        centerline = nib.load(_anat(out, spec.sub) / f"{spec.stem}_label-centerline_seg.nii.gz")
        assert np.all(np.asarray(centerline.dataobj)[np.asarray(centerline.dataobj) > 0] <= data[
            np.asarray(centerline.dataobj) > 0])
        points = np.loadtxt(_anat(out, spec.sub) / f"{spec.stem}_desc-centerline.tsv", skiprows=1, ndmin=2)
        assert points.shape[1] == 3 and np.all(np.diff(points[:, 2]) > 0)


def test_sidecar_content(bids_two, tmp_path):
    out = tmp_path / "out"
    pipeline.run_participant_level(_cfg(bids_two, out, tta=True), threshold_segmenter)
    side = json.loads((_anat(out, "01") / "sub-01_T2w_label-SC_seg.json").read_text())
    assert side["Sources"] == ["bids:raw:sub-01/anat/sub-01_T2w.nii.gz"]
    assert side["ReferenceMask"] == "bids:raw:derivatives/labels/sub-01/anat/sub-01_T2w_label-SC_seg.nii.gz"
    assert side["DiscLabels"].endswith("sub-01_T2w_label-discs_dlabel.nii.gz")
    assert side["CordFound"] is True
    assert side["Model"]["name"] == "test-threshold" and side["Model"]["sha256"] == "0" * 64
    assert side["Parameters"]["tta"] is True and side["Seconds"]["total"] > 0
    assert side["Provenance"]["InputSHA256"] and side["Provenance"]["ReferenceSHA256"]
    assert set(side["Outputs"]) == {f"sub-01_T2w_{tail}" for tail in (
        "label-SC_seg.nii.gz", "label-centerline_seg.nii.gz", "desc-centerline.tsv", "desc-discs.tsv",
        "desc-levels.tsv", "desc-metrics.json", "desc-slicemetrics.tsv", "desc-morphometry.tsv",
        "desc-morphometrylevels.tsv", "desc-qc.png")}
    tip = side["ConusTip"]
    assert tip["voxel"][2] == pytest.approx(0.0) and len(tip["mm"]) == 3
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "conus"


def test_rerun_skips_only_identical_work(bids_two, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(bids_two, out)
    assert pipeline.run_participant_level(cfg, threshold_segmenter).count("ok") == 2
    assert pipeline.run_participant_level(cfg, threshold_segmenter).count("skipped") == 2
    assert pipeline.run_participant_level(cfg.with_changes(overwrite=True), threshold_segmenter).count("ok") == 2
    # a parameter change recomputes
    assert pipeline.run_participant_level(cfg.with_changes(overlap=3), threshold_segmenter).count("ok") == 2
    # a changed input recomputes that run only
    src = bids_two / "sub-02/anat/sub-02_T2w.nii.gz"
    img = nib.load(src)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, None, img.header), src)
    summary = pipeline.run_participant_level(cfg.with_changes(overlap=3), threshold_segmenter)
    assert [o.status for o in summary.outcomes] == ["skipped", "ok"]
    # an incomplete output set recomputes
    (_anat(out, "01") / "sub-01_T2w_desc-centerline.tsv").unlink()
    summary = pipeline.run_participant_level(cfg.with_changes(overlap=3), threshold_segmenter)
    assert [o.status for o in summary.outcomes] == ["ok", "skipped"]


def test_model_change_recomputes(bids_two, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = _cfg(bids_two, out)
    pipeline.run_participant_level(cfg, threshold_segmenter)
    monkeypatch.setattr(threshold_segmenter, "model_info", {"name": "test-threshold", "sha256": "1" * 64})
    assert pipeline.run_participant_level(cfg, threshold_segmenter).count("ok") == 2


def test_no_cord_is_not_an_error(tmp_path):
    bids = build_dataset(tmp_path / "bids", [ImageSpec(sub="01", cord=False, reference=False),
                                             ImageSpec(sub="02")])
    out = tmp_path / "out"
    summary = pipeline.run_participant_level(_cfg(bids, out), threshold_segmenter)
    assert summary.exit_code == 0
    side = json.loads((_anat(out, "01") / "sub-01_T2w_label-SC_seg.json").read_text())
    assert side["CordFound"] is False and side["ConusTip"] is None
    assert not np.asarray(nib.load(_anat(out, "01") / "sub-01_T2w_label-SC_seg.nii.gz").dataobj).any()
    assert not (_anat(out, "01") / "sub-01_T2w_desc-centerline.tsv").exists()


def test_stale_outputs_are_removed_when_no_longer_produced(tmp_path):
    bids = build_dataset(tmp_path / "bids", [ImageSpec(sub="01")])
    out = tmp_path / "out"
    pipeline.run_participant_level(_cfg(bids, out), threshold_segmenter)
    assert (_anat(out, "01") / "sub-01_T2w_desc-centerline.tsv").exists()
    src = bids / "sub-01/anat/sub-01_T2w.nii.gz"
    img = nib.load(src)
    nib.save(nib.Nifti1Image(np.full(img.shape, 100, np.int16), None, img.header), src)
    pipeline.run_participant_level(_cfg(bids, out), threshold_segmenter)
    assert not (_anat(out, "01") / "sub-01_T2w_desc-centerline.tsv").exists()
    assert not (_anat(out, "01") / "sub-01_T2w_label-centerline_seg.nii.gz").exists()


def test_failed_run_writes_error_record_and_batch_goes_on(bids_two, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = []

    def flaky(loaded, options, reference=None):
        calls.append(loaded.path.name)
        if "sub-01" in loaded.path.name:
            raise RuntimeError("model exploded")
        return threshold_segmenter(loaded, options, reference)

    flaky.model_info = fixtures.THRESHOLD_MODEL
    summary = pipeline.run_participant_level(_cfg(bids_two, out), flaky)
    assert summary.exit_code == 1 and [o.status for o in summary.outcomes] == ["failed", "ok"]
    record = json.loads((out / "sub-01/log/sub-01_T2w_error.json").read_text())
    assert record["Message"] == "model exploded" and record["ExitCode"] == 1
    assert "RuntimeError" in record["Traceback"] and record["Input"].endswith("sub-01_T2w.nii.gz")
    assert not (_anat(out, "01") / "sub-01_T2w_label-SC_seg.json").exists()
    assert (_anat(out, "02") / "sub-02_T2w_label-SC_seg.json").exists()
    # the derivatives folder, error log included, passes the BIDS validator thanks to .bidsignore
    assert "BIDS compatible" in bids_io.validate_dataset(out)
    # fixed: the rerun processes the failed run, skips the other, and clears the error record
    summary = pipeline.run_participant_level(_cfg(bids_two, out), threshold_segmenter)
    assert [o.status for o in summary.outcomes] == ["ok", "skipped"]
    assert not (out / "sub-01/log/sub-01_T2w_error.json").exists()


def test_parallel_workers_match_serial(bids_two, tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    pipeline.run_participant_level(_cfg(bids_two, serial), threshold_segmenter)
    summary = pipeline.run_participant_level(_cfg(bids_two, parallel, n_cpus=2), threshold_segmenter)
    assert summary.count("ok") == 2
    for sub in ("01", "02"):
        name = f"sub-{sub}_T2w_label-SC_seg.nii.gz"
        assert (_anat(serial, sub) / name).read_bytes() == (_anat(parallel, sub) / name).read_bytes()
    assert pipeline.worker_threads(4, cpus=16) == 4 and pipeline.worker_threads(4, cpus=2) == 1


def test_summary_line():
    summary = pipeline.Summary((pipeline.RunOutcome("a", "ok", 1.0), pipeline.RunOutcome("b", "skipped", 0.0),
                                pipeline.RunOutcome("c", "failed", 0.5, 65, "bad")), 2.0)
    assert summary.line() == "3 run(s): 1 ok, 1 skipped, 1 failed in 2.0 s"
    assert summary.exit_code == 1


def test_inference_options_from_config(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "out", model="seg-general", tta=True, overlap=3, centerline="reference")
    options = pipeline.inference_options(cfg)
    assert (options.model, options.tta, options.overlap, options.centerline_mode) == ("seg-general", True, 3,
                                                                                      "reference")
    assert options.disc_heatmaps is False
    options = pipeline.inference_options(cfg.with_changes(centerline_file=tmp_path / "c.tsv"))
    assert options.centerline_mode == "file" and options.centerline_file == tmp_path / "c.tsv"
    assert pipeline.default_segment_fn() is pipeline.shipped_segmenter
    # --levels auto asks for disc heatmaps, so their bundle (when one ships) is part of the identity
    assert pipeline.inference_options(cfg.with_changes(levels="auto")).disc_heatmaps is True
    assert set(pipeline.model_identity(cfg, None)["bundles"]) == {"segmentation"}
    levels = {"levels"} if registry.default_bundle("levels", required=False) else set()
    assert set(pipeline.model_identity(cfg.with_changes(levels="auto"), None)["bundles"]) == {"segmentation",
                                                                                             *levels}
    auto = cfg.with_changes(centerline="auto", levels="auto")
    assert set(pipeline.model_identity(auto, None)["bundles"]) == {"segmentation", "centerline", *levels}


def test_work_dir_receives_temporary_files(bids_two, tmp_path, monkeypatch):
    import os
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setenv("TMPDIR", os.environ.get("TMPDIR", "/tmp"))
    work = tmp_path / "work" / "nested"
    summary = pipeline.run_participant_level(_cfg(bids_two, tmp_path / "out", work_dir=work), threshold_segmenter)
    assert summary.exit_code == 0 and work.is_dir()
    assert tempfile.gettempdir() == str(work) and os.environ["TMPDIR"] == str(work)


def test_lumbosacral_model_gets_the_run_disc_labels(bids_two, tmp_path):
    """With --lumbosacral-model the segmenter receives each run's disc labels (None without any),
    and the option is part of the provenance (a change reruns)."""
    received = {}

    def segment(loaded, cfg, reference=None, discs=None):
        received[loaded.path.name] = discs
        return threshold_segmenter(loaded, cfg, reference)

    segment.model_info = fixtures.THRESHOLD_MODEL
    out = tmp_path / "out"
    cfg = _cfg(bids_two, out, lumbosacral_model="seg-general")
    assert pipeline.run_participant_level(cfg, segment).exit_code == 0
    assert received["sub-02_T2w.nii.gz"] is None
    values = [d.value for d in received["sub-01_T2w.nii.gz"]]
    assert values and values == sorted(values)
    assert cfg.processing_parameters()["lumbosacral_model"] == "seg-general"
    # without the option the segmenter is called as before (no discs keyword)
    assert pipeline.run_participant_level(_cfg(bids_two, tmp_path / "out2"), threshold_segmenter).exit_code == 0
    assert pipeline.run_participant_level(cfg.with_changes(lumbosacral_model=None), segment).count("ok") == 2
