"""Fault suite (issue 3): one test per faulty input or invocation.

Each test checks the documented handling (a warning and a sane result, or a clear error naming
the file and the problem, with its exit code or error record) and that the other runs' outputs
are intact. Image-level rules are implemented in bids_app.image_io; here they are exercised
through the pipeline / command line, as a user meets them.

Note on "output folder not writable": the tests run as root, for whom permission bits do not
stop writes, so the unwritable OUTPUT_DIR is a path below a regular file (mkdir fails with
ENOTDIR), which exercises the same error path (CannotCreateOutputError, exit 73).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import fixtures
import nibabel as nib
import numpy as np
import pytest
from fixtures import ImageSpec, build_dataset, make_nifti, threshold_segmenter, tube_volume

from bids_app import cli, pipeline
from bids_app.config import ParticipantConfig
from bids_app.image_io import GEOMETRY_FIELDS

BAD = "sub-02/anat/sub-02_T2w.nii.gz"


@pytest.fixture
def fake_segmenter(monkeypatch):
    monkeypatch.setattr(pipeline, "default_segment_fn", lambda: fixtures.threshold_segmenter)


def _dataset(tmp_path: Path) -> Path:
    return build_dataset(tmp_path / "bids", [ImageSpec(sub="01", seed=1), ImageSpec(sub="02", seed=2),
                                             ImageSpec(sub="03", seed=3)])


def _run(bids: Path, out: Path):
    cfg = ParticipantConfig(bids_dir=bids, output_dir=out, verbosity=-1)
    return pipeline.run_participant_level(cfg, threshold_segmenter)


def _good_runs_intact(out: Path, subs=("01", "03")) -> None:
    for sub in subs:
        side = json.loads((out / f"sub-{sub}/anat/sub-{sub}_T2w_label-SC_seg.json").read_text())
        assert side["CordFound"] is True
        for name in side["Outputs"]:
            assert (out / f"sub-{sub}/anat" / name).is_file()
        assert not (out / f"sub-{sub}/log").exists()


def _expect_run_error(tmp_path: Path, replace, code: int, words: tuple[str, ...]) -> dict:
    """Replace sub-02's image, run the batch, check the error record and the other runs."""
    bids = _dataset(tmp_path)
    replace(bids / BAD)
    out = tmp_path / "out"
    summary = _run(bids, out)
    assert summary.exit_code == 1
    assert [o.status for o in summary.outcomes] == ["ok", "failed", "ok"]
    record = json.loads((out / "sub-02/log/sub-02_T2w_error.json").read_text())
    assert record["ExitCode"] == code, record
    assert "sub-02_T2w.nii.gz" in record["Message"] and record["Input"] == str(bids / BAD)
    for word in words:
        assert word.lower() in record["Message"].lower(), (word, record["Message"])
    assert not (out / "sub-02/anat/sub-02_T2w_label-SC_seg.nii.gz").exists()
    _good_runs_intact(out)
    return record


def _expect_handled(tmp_path: Path, replace, warning_words: tuple[str, ...]) -> dict:
    """Replace sub-02's image, run the batch: every run ok, a warning in sub-02's sidecar."""
    bids = _dataset(tmp_path)
    replace(bids / BAD)
    out = tmp_path / "out"
    summary = _run(bids, out)
    assert summary.exit_code == 0, summary.outcomes
    side = json.loads((out / "sub-02/anat/sub-02_T2w_label-SC_seg.json").read_text())
    text = " ".join(side["Warnings"]).lower()
    for word in warning_words:
        assert word.lower() in text, (word, side["Warnings"])
    src, mask = nib.load(bids / BAD), nib.load(out / "sub-02/anat/sub-02_T2w_label-SC_seg.nii.gz")
    for name in GEOMETRY_FIELDS:
        assert np.array_equal(src.header[name], mask.header[name]), name
    _good_runs_intact(out)
    return side


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tmp_path, fake_segmenter):
    """A dataset already processed once, and a snapshot of its outputs."""
    bids = _dataset(tmp_path)
    out = tmp_path / "out"
    assert cli.main([str(bids), str(out), "participant", "--skip_bids_validator", "-q"]) == 0
    return bids, out, _snapshot(out)


# ----------------------------------------------------------------------------- image faults


def test_truncated_gzip(tmp_path):
    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    _expect_run_error(tmp_path, truncate, 65, ())


def test_not_a_nifti(tmp_path):
    _expect_run_error(tmp_path, lambda p: p.write_bytes(gzip.compress(b"this is a text file, not an image\n")),
                      65, ())


def test_4d_with_several_volumes(tmp_path):
    def four_d(path: Path) -> None:
        image, _ = tube_volume((20, 20, 24), 2)
        nib.save(make_nifti(np.stack([image, image, image], axis=-1)), path)

    _expect_run_error(tmp_path, four_d, 65, ("volume",))


def test_4d_with_one_volume_is_squeezed(tmp_path):
    def four_d_one(path: Path) -> None:
        image, _ = tube_volume((20, 20, 24), 2)
        nib.save(make_nifti(image[..., None]), path)

    bids = _dataset(tmp_path)
    four_d_one(bids / BAD)
    out = tmp_path / "out"
    assert _run(bids, out).exit_code == 0
    mask = nib.load(out / "sub-02/anat/sub-02_T2w_label-SC_seg.nii.gz")
    assert mask.shape[:3] == (20, 20, 24) and np.asarray(mask.dataobj).any()


def _with_nonfinite(fraction: float):
    def write(path: Path) -> None:
        image, _ = tube_volume((20, 20, 24), 2)
        image = image.astype(np.float32)
        n = int(round(fraction * image.shape[0]))
        image[:n] = np.nan          # e.g. outside a registered field of view
        image[:n, 0, 0] = np.inf
        nib.save(make_nifti(image, dtype=np.float32), path)

    return write


def test_few_nonfinite_voxels_are_handled(tmp_path):
    side = _expect_handled(tmp_path, _with_nonfinite(0.15), ("non-finite",))
    assert side["CordFound"] is True


def test_mostly_nonfinite_is_refused(tmp_path):
    _expect_run_error(tmp_path, _with_nonfinite(0.8), 65, ("nan",))


def test_zero_size_dimension(tmp_path):
    _expect_run_error(tmp_path, lambda p: nib.save(make_nifti(np.zeros((20, 0, 24))), p), 65, ())


def test_2d_image(tmp_path):
    def two_d(path: Path) -> None:
        nib.save(nib.Nifti1Image(np.ones((20, 20), np.int16), np.eye(4)), path)

    _expect_run_error(tmp_path, two_d, 65, ())


def test_zero_qform_and_sform_codes(tmp_path):
    def no_codes(path: Path) -> None:
        image, _ = tube_volume((20, 20, 24), 2)
        header = make_nifti(image).header.copy()
        header["qform_code"], header["sform_code"] = 0, 0
        nib.save(nib.Nifti1Image(image.astype(np.int16), None, header), path)
        assert int(nib.load(path).header["sform_code"]) == 0

    _expect_handled(tmp_path, no_codes, ())
    written = nib.load(tmp_path / "out/sub-02/anat/sub-02_T2w_label-SC_seg.nii.gz").header
    assert int(written["qform_code"]) == 0 and int(written["sform_code"]) == 0


def test_contradictory_qform_and_sform(tmp_path):
    def contradict(path: Path) -> None:
        image, _ = tube_volume((20, 20, 24), 2)
        header = make_nifti(image).header.copy()
        other = header.get_sform()
        other[:3, 3] += [0.0, 25.0, 0.0]
        header.set_qform(other, code=1)
        nib.save(nib.Nifti1Image(image.astype(np.int16), None, header), path)
        loaded = nib.load(path).header
        assert not np.allclose(loaded.get_qform(), loaded.get_sform()) and loaded["sform_code"] > 0

    _expect_handled(tmp_path, contradict, ("sform",))


def test_non_invertible_affine(tmp_path):
    def singular(path: Path) -> None:
        image, _ = tube_volume((20, 20, 24), 2)
        header = make_nifti(image).header.copy()
        bad = header.get_sform()
        bad[:3, 2] = bad[:3, 0]          # two identical columns
        header.set_sform(bad, code=1)
        header["qform_code"] = 0
        nib.save(nib.Nifti1Image(image.astype(np.int16), None, header), path)
        assert np.linalg.matrix_rank(nib.load(path).header.get_sform()[:3, :3]) == 2

    _expect_run_error(tmp_path, singular, 65, ("invertible",))


# ----------------------------------------------------------------------------- invocation faults


def test_unknown_participant(finished, capsys):
    bids, out, before = finished
    assert cli.main([str(bids), str(out), "participant", "--participant_label", "07",
                     "--skip_bids_validator"]) == 18
    err = capsys.readouterr().err
    assert "sub-07" in err and "available: sub-01, sub-02, sub-03" in err
    assert _snapshot(out) == before


@pytest.mark.parametrize("label", ["../sub-01", "01/../02", "sub-01/anat", "/01"])
def test_dotdot_or_slash_in_label(finished, label, capsys):
    bids, out, before = finished
    assert cli.main([str(bids), str(out), "participant", "--participant_label", label]) == 64
    assert "invalid label" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_output_folder_not_writable(finished, tmp_path, capsys):
    bids, out, before = finished
    blocker = tmp_path / "regular_file"
    blocker.write_text("a file where a folder is needed")
    target = blocker / "derivatives"
    assert cli.main([str(bids), str(target), "participant", "--skip_bids_validator"]) == 73
    assert "regular_file" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_filter_file_not_json(finished, tmp_path, capsys):
    bids, out, before = finished
    bad = tmp_path / "filters.json"
    bad.write_text("{'subject': '01'}  # python, not JSON")
    assert cli.main([str(bids), str(out), "participant", "--bids-filter-file", str(bad)]) == 64
    err = capsys.readouterr().err
    assert "filters.json" in err and "not valid JSON" in err
    assert _snapshot(out) == before


def test_empty_bids_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([str(empty), str(tmp_path / "out"), "participant"]) == 66
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_dataset_description(finished, capsys):
    bids, out, before = finished
    (bids / "dataset_description.json").unlink()
    assert cli.main([str(bids), str(out), "participant"]) == 66
    assert "dataset_description.json" in capsys.readouterr().err
    assert _snapshot(out) == before
