"""The conus command line: parsers, routing, exit codes, speed of --help, validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fixtures
import pytest
from fixtures import ImageSpec, build_dataset

from bids_app import __version__, cli, pipeline
from bids_app.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


def _conus_script() -> str:
    return str(Path(sys.executable).parent / "conus")


@pytest.fixture
def fake_segmenter(monkeypatch):
    """Route the CLI's default segmenter to the test-only threshold segmenter."""
    monkeypatch.setattr(pipeline, "default_segment_fn", lambda: fixtures.threshold_segmenter)


def test_help_does_not_import_tensorflow_or_pybids():
    # what keeps --help fast (timed in benchmarks/cli_startup.py, not here): neither heavy library loads
    proc = subprocess.run([_conus_script(), "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "participant_label" in proc.stdout and "{participant,group}" in proc.stdout
    code = ("import contextlib, io, sys\n"
            "from bids_app import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert cli.main(['--help']) == 0 and cli.main(['train', '--help']) == 0\n"
            "print(*(name in sys.modules for name in ('tensorflow', 'keras', 'bids')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_python_dash_m_and_version():
    proc = subprocess.run([sys.executable, "-m", "bids_app", "--version"], capture_output=True, text=True,
                          check=False, cwd=REPO)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"conus {__version__}"
    proc = subprocess.run([sys.executable, "-m", "bids_app", "--help"], capture_output=True, text=True,
                          check=False, cwd=REPO)
    assert proc.returncode == 0 and "usage: conus" in proc.stdout


@pytest.mark.parametrize("argv", [
    ["a", "b", "participant", "--no-such-option"],
    ["a", "b", "participant", "--contrast", "FLAIR"],
    ["a", "b", "participant", "--n_cpus", "0"],
    ["a", "b", "participant", "--overlap", "1.5"],
    ["a", "b", "participant", "--split-level", "T9"],
    ["a", "b"],
    ["train", "--data", "x"],          # --out missing
    ["finetune", "--data", "x", "--out", "y"],   # --from missing
])
def test_argparse_errors_exit_64_never_2(argv, capsys):
    assert cli.main(argv) == 64
    assert "usage:" in capsys.readouterr().err


def test_unknown_analysis_level_exits_17(tmp_path, capsys):
    assert cli.main([str(tmp_path), str(tmp_path / "out"), "session"]) == 17
    assert "unknown analysis level" in capsys.readouterr().err


def _parse(*extra: str):
    args = cli.get_bids_parser().parse_args(["/data", "/out", "participant", *extra])
    return cli.config_from_args(args)


def test_labels_accept_both_forms_and_strip_prefix_with_startswith():
    cfg = _parse("--participant_label", "01", "sub-02", "sub-s03", "s04", "--session_label", "ses-a", "b")
    assert cfg.participant_labels == ("01", "02", "s03", "s04")
    assert cfg.session_labels == ("a", "b")


@pytest.mark.parametrize("label", ["../01", "sub-01/anat", "01/..", "sub-", "0 1", "sub-01_ses-1", "01-2"])
def test_bad_labels_are_usage_errors(label):
    with pytest.raises(UsageError):
        _parse("--participant_label", label)
    assert cli.main(["/data", "/out", "participant", "--participant_label", label]) == 64


def test_config_holds_every_option(tmp_path):
    centerline = tmp_path / "cl.tsv"
    centerline.write_text("x_mm\ty_mm\tz_mm\n")
    cfg = _parse("--contrast", "T1w", "--n_cpus", "3", "--overwrite", "--tta", "--overlap", "3",
                 "--levels", "auto", "--split", "--split-level", "T12-L1", "--centerline", "reference",
                 "--centerline-file", str(centerline), "--reference-dir", str(tmp_path), "-v",
                 "--work-dir", "w")
    assert cfg.contrasts == ("T1w",) and cfg.n_cpus == 3 and cfg.overwrite and cfg.tta
    assert cfg.overlap == 3 and isinstance(cfg.overlap, int)
    assert (cfg.levels, cfg.split, cfg.split_level, cfg.centerline) == ("auto", True, "T12-L1", "reference")
    assert cfg.centerline_file == centerline and cfg.reference_dir == tmp_path and cfg.verbosity == 1
    assert cfg.work_dir == Path("w").absolute() and isinstance(cfg.bids_dir, Path)
    assert _parse().contrasts == ("T2w", "T1w", "T2starw")
    assert _parse("--overlap", "0.25").overlap == 0.25
    assert _parse("-q").quiet


def test_missing_reference_dir_is_input_missing(tmp_path):
    assert cli.main([str(tmp_path), str(tmp_path / "o"), "participant", "--reference-dir",
                     str(tmp_path / "nope")]) == 66


def test_model_accepts_shipped_name_or_path(tmp_path):
    assert _parse("--model", str(tmp_path)).model == str(tmp_path)
    for name in cli._model_names():
        assert _parse("--model", name).model == name
    assert cli.main(["/data", "/out", "participant", "--model", "no-such-model"]) == 64


def test_lumbosacral_model_takes_segmentation_models(tmp_path):
    assert _parse().lumbosacral_model is None
    assert _parse("--lumbosacral-model", "seg-general").lumbosacral_model == "seg-general"
    assert _parse("--lumbosacral-model", str(tmp_path)).lumbosacral_model == str(tmp_path)
    assert cli.main(["/data", "/out", "participant", "--lumbosacral-model", "spine-coarse"]) == 64


def test_centerline_model_takes_centerline_role_names_only(tmp_path):
    assert _parse().centerline_model is None
    assert _parse("--centerline-model", str(tmp_path)).centerline_model == str(tmp_path)
    for name in cli._model_names("centerline"):
        assert _parse("--centerline-model", name).centerline_model == name
    for name in cli._model_names("segmentation"):   # a segmentation bundle is not a centerline model
        assert cli.main(["/data", "/out", "participant", "--centerline-model", name]) == 64


def test_tools_route_to_lazily_imported_modules(monkeypatch, tmp_path):
    seen = {}

    def fake_entry(args):
        seen["args"] = args
        return 0

    monkeypatch.setattr(fixtures, "tool_entry", fake_entry, raising=False)
    monkeypatch.setitem(cli.TOOL_ENTRY_POINTS, "synth", ("fixtures", "tool_entry"))
    assert cli.main(["synth", str(tmp_path), "--n", "3", "--seed", "7", "--contrast", "T1w"]) == 0
    args = seen["args"]
    assert (args.tool, args.n, args.seed, args.contrast, args.output_dir) == ("synth", 3, 7, ["T1w"], tmp_path)


def test_missing_tool_module_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(cli.TOOL_ENTRY_POINTS, "demo", ("bids_app.no_such_module", "run"))
    assert cli.main(["demo", str(tmp_path)]) == 64
    assert "not available" in capsys.readouterr().err


def test_output_dir_inside_raw_data_is_refused(bids_two, capsys):
    for out in (bids_two, bids_two / "sub-01", bids_two / "derivatives", bids_two / "stuff"):
        assert cli.main([str(bids_two), str(out), "participant", "--skip_bids_validator"]) == 64
        assert "derivatives/conus" in capsys.readouterr().err
    assert not (bids_two / "stuff").exists()


def test_dry_run_lists_runs_and_writes_nothing(bids_two, capsys):
    out = bids_two / "derivatives" / "conus"
    assert cli.main([str(bids_two), str(out), "participant", "--dry-run", "--skip_bids_validator"]) == 0
    text = capsys.readouterr().out
    assert "sub-01_T2w" in text and "sub-02_T2w" in text
    assert "derivatives/labels/sub-01/anat/sub-01_T2w_label-SC_seg.nii.gz" in text
    assert "sub-01_T2w_label-discs_dlabel.nii.gz" in text
    assert "2 run(s), 2 reference mask(s), 1 disc label file(s)" in text
    assert not out.exists()


def test_participant_run_through_main(bids_two, tmp_path, fake_segmenter):
    out = tmp_path / "out"
    assert cli.main([str(bids_two), str(out), "participant", "--participant_label", "sub-02", "-q"]) == 0
    assert (out / "sub-02/anat/sub-02_T2w_label-SC_seg.nii.gz").is_file()
    assert not (out / "sub-01").exists()
    assert (out / "dataset_description.json").is_file() and (out / ".bidsignore").is_file()


def test_validator_failure_exits_16_with_its_report(bids_two, tmp_path, capsys, fake_segmenter):
    (bids_two / "sub-01" / "anat" / "not_bids_at_all.txt").write_text("x")
    out = tmp_path / "out"
    assert cli.main([str(bids_two), str(out), "participant"]) == 16
    err = capsys.readouterr().err
    assert "BIDS validation failed" in err and "not_bids_at_all.txt" in err
    assert not out.exists()
    assert cli.main([str(bids_two), str(out), "participant", "--skip_bids_validator", "-q"]) == 0


def test_conus_console_script_exit_code(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run([_conus_script(), str(tmp_path), str(tmp_path / "o"), "grouped"],
                          capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 17


def test_group_level_runs_the_report(bids_two, tmp_path, fake_segmenter):
    out = tmp_path / "out"
    build = build_dataset(tmp_path / "b2", [ImageSpec(sub="01")])
    assert cli.main([str(build), str(out), "participant", "--skip_bids_validator", "-q"]) == 0
    assert cli.main([str(build), str(out), "group", "-q"]) == 0
    assert (out / "group").is_dir()
