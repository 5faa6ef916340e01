"""Scale-out: concurrent participant processes into one folder, the SLURM array script, BABS.

Several processes (array tasks, ``--n_cpus`` workers) write into one derivatives folder; none
may lose or corrupt another's outputs, and dataset_description.json must stay valid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from fixtures import ImageSpec, build_dataset

from bids_app.cli import config_from_args, get_bids_parser
from bids_app.derivatives import dataset_description

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SLURM = REPO / "scripts" / "slurm_array.sh"
BABS = REPO / "scripts" / "babs_config.yaml"
LABELS = ("01", "02", "03", "04")

# One participant-level process: waits for the start signal so that all of them write the
# dataset files at the same moment, then runs the pipeline for its participant only.
WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from fixtures import threshold_segmenter
    from bids_app.config import ParticipantConfig
    from bids_app.pipeline import run_participant_level

    label, go = sys.argv[1], Path(sys.argv[2])
    cfg = ParticipantConfig(bids_dir=Path({bids!r}), output_dir=Path({out!r}), participant_labels=(label,),
                            skip_bids_validator=True, verbosity=-1)
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    summary = run_participant_level(cfg, threshold_segmenter)
    print(summary.line())
    raise SystemExit(summary.exit_code)
""")


@pytest.fixture
def four_subjects(tmp_path) -> Path:
    """Four participants, two runs each (T2w and an acq-sag T2w with another header)."""
    specs = []
    for i, label in enumerate(LABELS):
        specs.append(ImageSpec(sub=label, seed=10 + i))
        specs.append(ImageSpec(sub=label, entities={"acq": "sag"}, header="psr", seed=20 + i))
    return build_dataset(tmp_path / "bids", specs)


def _run_concurrently(bids: Path, out: Path, labels, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    go = tmp_path / "go"
    script = WORKER.format(tests=str(TESTS), bids=str(bids), out=str(out))
    procs = [subprocess.Popen([sys.executable, "-c", script, label, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for label in labels]
    time.sleep(0.5)
    go.touch()
    results = []
    for label, proc in zip(labels, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess([label], proc.returncode, stdout, stderr))
    return results


def test_four_concurrent_participant_processes_lose_nothing(four_subjects, tmp_path):
    bids, out = four_subjects, four_subjects / "derivatives" / "conus"
    results = _run_concurrently(bids, out, LABELS, tmp_path)
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "2 run(s): 2 ok, 0 skipped, 0 failed" in result.stdout

    desc_path = out / "dataset_description.json"
    assert json.loads(desc_path.read_text()) == dataset_description(bids)
    for label in LABELS:
        for stem in (f"sub-{label}_T2w", f"sub-{label}_acq-sag_T2w"):
            anat = out / f"sub-{label}" / "anat"
            sidecar = json.loads((anat / f"{stem}_label-SC_seg.json").read_text())
            assert sidecar["CordFound"] is True
            assert sidecar["Sources"][0].endswith(f"sub-{label}/anat/{stem}.nii.gz")
            assert sidecar["Outputs"] and all((anat / name).is_file() for name in sidecar["Outputs"])
            mask = nib.load(anat / f"{stem}_label-SC_seg.nii.gz")
            reference = nib.load(bids / "derivatives" / "labels" / f"sub-{label}" / "anat"
                                 / f"{stem}_label-SC_seg.nii.gz")
            assert np.array_equal(np.asarray(mask.dataobj), np.asarray(reference.dataobj))
            assert np.array_equal(mask.affine, reference.affine)
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".conus-write-test")]
    assert not leftovers
    assert not list(out.glob("sub-*/log/*_error.json"))
    assert sorted(p.name for p in out.glob("sub-*")) == [f"sub-{label}" for label in LABELS]

    # A later task leaves the identical dataset_description.json in place (not rewritten).
    inode = desc_path.stat().st_ino
    again = _run_concurrently(bids, out, ("02",), tmp_path)
    assert again[0].returncode == 0 and "0 ok, 2 skipped" in again[0].stdout
    assert desc_path.stat().st_ino == inode


# --------------------------------------------------------------------------------------------
# SLURM array script (sbatch and conus replaced by recorders)


def _recorder(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch) -> Path:
    """`sbatch` and `conus` on PATH that append their arguments to calls.log (one line each)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    _recorder(bin_dir / "sbatch", f'echo "sbatch $*" >> {log}\n'
              f'n=$(grep -c ^sbatch {log}); echo "$((1000 + n));cluster"\n')
    _recorder(bin_dir / "conus", f'echo "conus $*" >> {log}\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in ("CONUS_SIF", "CONUS_SBATCH_ARGS", "CONUS_MAX_PARALLEL", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    return log


def _slurm(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM), *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={**os.environ, **(env or {})})


def test_slurm_array_submits_one_task_per_participant_then_group(tmp_path, fake_cluster):
    bids = build_dataset(tmp_path / "bids", [ImageSpec(sub=s) for s in ("01", "02", "10")])
    (bids / "participants.tsv").write_text("participant_id\tage\nsub-10\t30\nsub-01\t41\r\nsub-02\tn/a\n")
    out = tmp_path / "out"
    result = _slurm("submit", str(bids), str(out), "--contrast", "T2w", cwd=tmp_path,
                    env={"CONUS_MAX_PARALLEL": "2"})
    assert result.returncode == 0, result.stderr
    array_call, group_call = fake_cluster.read_text().splitlines()
    assert "--array=1-3%2" in array_call and f" task {bids} {out} --n_cpus 2 --contrast T2w" in array_call
    assert "--dependency=afterany:1001" in group_call and group_call.endswith(f" group {bids} {out}")
    assert "array job 1001" in result.stdout and "group job 1002" in result.stdout
    assert f"--output={tmp_path}/conus-slurm-logs/participant-%A_%a.log" in array_call


def test_slurm_array_task_processes_only_its_own_participant(tmp_path, fake_cluster):
    bids = build_dataset(tmp_path / "bids", [ImageSpec(sub=s) for s in ("01", "02", "10")])
    (bids / "participants.tsv").write_text("age\tparticipant_id\n30\tsub-10\n41\tsub-01\n\n52\tsub-02\n")
    out = tmp_path / "out"
    for index in (1, 2, 3):
        result = _slurm("task", str(bids), str(out), "--n_cpus", "2", cwd=tmp_path,
                        env={"SLURM_ARRAY_TASK_ID": str(index)})
        assert result.returncode == 0, result.stderr
    calls = fake_cluster.read_text().splitlines()
    assert calls == [f"conus {bids} {out} participant --participant_label {label} --n_cpus 2"
                     for label in ("10", "01", "02")]
    beyond = _slurm("task", str(bids), str(out), cwd=tmp_path, env={"SLURM_ARRAY_TASK_ID": "4"})
    assert beyond.returncode != 0 and "outside 1..3" in beyond.stderr


def test_slurm_array_task_runs_the_apptainer_image_with_private_tmp(tmp_path, fake_cluster):
    bids = build_dataset(tmp_path / "bids", [ImageSpec(sub="01")])
    out, sif, scratch = tmp_path / "out", tmp_path / "conus.sif", tmp_path / "scratch"
    _recorder(fake_cluster.parent / "fakebin" / "apptainer", f'echo "apptainer $*" >> {fake_cluster}\n')
    result = _slurm("task", str(bids), str(out), cwd=tmp_path,
                    env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "77", "CONUS_SIF": str(sif),
                         "SLURM_TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr
    tmp = scratch / "conus-77-1"
    assert fake_cluster.read_text().splitlines() == [
        f"apptainer run --containall --bind {bids}:{bids}:ro --bind {out}:{out} --bind {tmp}:/tmp {sif} "
        f"{bids} {out} participant --participant_label 01"]
    assert tmp.is_dir() and out.is_dir()


def test_slurm_array_refuses_a_dataset_without_participants_tsv(tmp_path, fake_cluster):
    bids = build_dataset(tmp_path / "bids", [ImageSpec(sub="01")])
    (bids / "participants.tsv").unlink()
    result = _slurm("submit", str(bids), str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 66 and "participants.tsv" in result.stderr
    assert not fake_cluster.exists()


# --------------------------------------------------------------------------------------------
# BABS


def test_babs_config_arguments_parse_with_the_bids_parser(tmp_path):
    """Every argument in the BABS config is a conus option, and the sub- prefixed label BABS
    passes through the subject-selection flag comes out as the bare label."""
    config = yaml.safe_load(BABS.read_text())
    args = config["bids_app_args"]
    flag = args.pop("$SUBJECT_SELECTION_FLAG")
    argv = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", flag, "sub-01"]
    for key, value in args.items():
        argv.append(key)
        if value != "":
            argv.append(str(value).replace("$BABS_TMPDIR", str(tmp_path)))
    parsed = get_bids_parser().parse_args(argv)
    (tmp_path / "bids").mkdir()
    cfg = config_from_args(parsed)
    assert cfg.participant_labels == ("01",)
    assert "--containall" in config["singularity_args"]
