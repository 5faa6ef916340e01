"""BIDS queries: run identity, entity filters, reference discovery, dataset checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import ImageSpec, build_dataset

from bids_app import bids_io
from bids_app.config import ParticipantConfig
from bids_app.errors import InputMissingError, NoMatchError, UsageError


def _cfg(bids: Path, **kw) -> ParticipantConfig:
    return ParticipantConfig(bids_dir=bids, output_dir=bids / "derivatives" / "conus", **kw)


@pytest.fixture
def rich(tmp_path: Path) -> Path:
    """Runs that differ by session, acq, rec, run and ce, plus several contrasts."""
    small = (6, 6, 8)
    specs = [
        ImageSpec(sub="01", ses="a", entities={"acq": "sag"}, shape=small),
        ImageSpec(sub="01", ses="a", entities={"acq": "ax"}, shape=small),
        ImageSpec(sub="01", ses="b", entities={"acq": "sag"}, shape=small, reference_style="_seg-manual"),
        ImageSpec(sub="02", entities={"rec": "norm", "run": "1"}, shape=small),
        ImageSpec(sub="02", entities={"rec": "norm", "run": "2"}, shape=small, reference=False),
        ImageSpec(sub="02", entities={"ce": "gad"}, suffix="T1w", shape=small,
                  reference_style="_label-SC_mask"),
        ImageSpec(sub="03", suffix="T2starw", shape=small, discs=True),
    ]
    return build_dataset(tmp_path / "rich", specs)


def test_parse_bids_name_keeps_every_entity():
    entities, suffix = bids_io.parse_bids_name("sub-01_ses-a_acq-sag_ce-gad_rec-x_run-02_T2w.nii.gz")
    assert entities == {"sub": "01", "ses": "a", "acq": "sag", "ce": "gad", "rec": "x", "run": "02"}
    assert suffix == "T2w"
    with pytest.raises(UsageError):
        bids_io.parse_bids_name("T2w.nii.gz")


def test_run_ids_are_unique_and_complete(rich):
    runs = bids_io.find_runs(_cfg(rich))
    ids = [r.run_id for r in runs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == 7
    assert "sub-02_rec-norm_run-1_T2w" in ids and "sub-02_rec-norm_run-2_T2w" in ids
    run = next(r for r in runs if r.run_id == "sub-01_ses-b_acq-sag_T2w")
    assert run.entities == {"sub": "01", "ses": "b", "acq": "sag"} and run.suffix == "T2w"
    assert run.subject == "01" and run.session == "b"
    assert run.relative_dir == Path("sub-01/ses-b/anat")
    assert run.path == rich / "sub-01/ses-b/anat/sub-01_ses-b_acq-sag_T2w.nii.gz"


def test_reference_discovery_all_naming_styles(rich):
    runs = {r.run_id: r for r in bids_io.find_runs(_cfg(rich))}
    labels = rich / "derivatives" / "labels"
    assert runs["sub-01_ses-a_acq-sag_T2w"].reference_mask == \
        labels / "sub-01/ses-a/anat/sub-01_ses-a_acq-sag_T2w_label-SC_seg.nii.gz"
    assert runs["sub-01_ses-b_acq-sag_T2w"].reference_mask.name == "sub-01_ses-b_acq-sag_T2w_seg-manual.nii.gz"
    assert runs["sub-02_ce-gad_T1w"].reference_mask.name == "sub-02_ce-gad_T1w_label-SC_mask.nii.gz"
    assert runs["sub-02_rec-norm_run-2_T2w"].reference_mask is None
    assert runs["sub-03_T2starw"].disc_labels.name == "sub-03_T2starw_label-discs_dlabel.nii.gz"
    assert runs["sub-02_ce-gad_T1w"].disc_labels is None


def test_older_disc_names_and_reference_dir(rich, tmp_path):
    ref = tmp_path / "myrefs"
    ref.mkdir()
    src = rich / "derivatives/labels/sub-03/anat/sub-03_T2starw_label-discs_dlabel.nii.gz"
    (ref / "sub-03_T2starw_labels-disc-manual.nii.gz").write_bytes(src.read_bytes())
    (ref / "sub-03_T2starw_label-SC_seg.nii.gz").write_bytes(src.read_bytes())
    runs = {r.run_id: r for r in bids_io.find_runs(_cfg(rich, reference_dir=ref))}
    assert runs["sub-03_T2starw"].disc_labels == ref / "sub-03_T2starw_labels-disc-manual.nii.gz"
    assert runs["sub-03_T2starw"].reference_mask == ref / "sub-03_T2starw_label-SC_seg.nii.gz"
    # runs without a file in --reference-dir still find derivatives/labels
    assert runs["sub-01_ses-a_acq-sag_T2w"].reference_mask is not None


def test_participant_session_and_contrast_selection(rich):
    ids = [r.run_id for r in bids_io.find_runs(_cfg(rich, participant_labels=("01",), session_labels=("b",)))]
    assert ids == ["sub-01_ses-b_acq-sag_T2w"]
    ids = [r.run_id for r in bids_io.find_runs(_cfg(rich, contrasts=("T1w", "T2starw")))]
    assert ids == ["sub-02_ce-gad_T1w", "sub-03_T2starw"]


def test_unknown_participant_lists_available_labels(rich):
    with pytest.raises(NoMatchError) as info:
        bids_io.find_runs(_cfg(rich, participant_labels=("01", "99")))
    assert info.value.exit_code == 18
    assert "sub-99" in str(info.value) and "sub-01, sub-02, sub-03" in str(info.value)


def test_unknown_session_is_no_match(rich):
    with pytest.raises(NoMatchError, match="ses-zz"):
        bids_io.find_runs(_cfg(rich, session_labels=("zz",)))


def test_filter_file_flat_and_per_contrast(rich, tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"acquisition": "sag"}))
    ids = [r.run_id for r in bids_io.find_runs(_cfg(rich, bids_filters=bids_io.load_filter_file(flat)))]
    assert ids == ["sub-01_ses-a_acq-sag_T2w", "sub-01_ses-b_acq-sag_T2w"]
    per = {"t2w": {"run": 2, "reconstruction": "norm"}, "T1w": {"ceagent": "gad"}}
    ids = [r.run_id for r in bids_io.find_runs(_cfg(rich, bids_filters=per, contrasts=("T2w", "T1w")))]
    assert ids == ["sub-02_ce-gad_T1w", "sub-02_rec-norm_run-2_T2w"]
    # null = entity absent, "*" = entity present
    ids = [r.run_id for r in bids_io.find_runs(_cfg(rich, bids_filters={"session": None, "run": None}))]
    assert ids == ["sub-02_ce-gad_T1w", "sub-03_T2starw"]
    ids = [r.run_id for r in bids_io.find_runs(_cfg(rich, bids_filters={"run": "*"}))]
    assert ids == ["sub-02_rec-norm_run-1_T2w", "sub-02_rec-norm_run-2_T2w"]


def test_filters_matching_nothing(rich):
    with pytest.raises(NoMatchError, match="no T2w images matched"):
        bids_io.find_runs(_cfg(rich, contrasts=("T2w",), bids_filters={"acquisition": "cor"}))


def test_filter_file_not_an_object(tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    with pytest.raises(UsageError, match="list.json"):
        bids_io.load_filter_file(bad)


def test_check_dataset(tmp_path):
    with pytest.raises(InputMissingError, match="does not exist"):
        bids_io.check_dataset(tmp_path / "nope")
    with pytest.raises(InputMissingError, match="empty"):
        bids_io.check_dataset(tmp_path)
    (tmp_path / "sub-01").mkdir()
    with pytest.raises(InputMissingError, match="dataset_description.json"):
        bids_io.check_dataset(tmp_path)


def test_bids_uri(tmp_path):
    assert bids_io.bids_uri(tmp_path / "sub-01/anat/x.nii.gz", tmp_path) == "bids:raw:sub-01/anat/x.nii.gz"
    assert bids_io.bids_uri(Path("/elsewhere/x.nii.gz"), tmp_path) == "/elsewhere/x.nii.gz"


def test_validator_accepts_fixture_dataset(rich):
    report = bids_io.validate_dataset(rich)
    assert "BIDS compatible" in report
