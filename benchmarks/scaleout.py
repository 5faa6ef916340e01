"""Scale-out benchmark: participant runs per minute with 1, 2 and 4 concurrent runs.

Two ways of running N participants at once are measured:

* ``tasks``: N separate processes, one participant each, as SLURM array tasks or BABS jobs do
  (each pays its own start-up, BIDS indexing and model loading);
* ``ncpus``: one ``conus ... participant --n_cpus N`` invocation (N worker processes).

Every concurrency level writes into a fresh output folder, so nothing is skipped. The runs use
the shipped model through the real ``conus`` command, or with ``--segmenter test`` the tests'
threshold segmenter (orchestration, I/O and BIDS indexing only: no network is evaluated).

    python benchmarks/scaleout.py                       # tiny tube dataset, shipped model
    python benchmarks/scaleout.py --segmenter test      # no model needed
    python benchmarks/scaleout.py --bids /path/to/copy/of/bids-cervical --levels 1 2 3

Prints one line per (mode, concurrency): runs, wall seconds, runs/minute and the speed-up over
one run at a time. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

# `conus` with the tests' threshold segmenter plugged into the participant level.
TEST_CONUS = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from fixtures import threshold_segmenter
from bids_app import pipeline
real = pipeline.run_participant_level
pipeline.run_participant_level = lambda cfg, segment_fn=None, runs=None: real(cfg, threshold_segmenter, runs)
from bids_app.cli import main
raise SystemExit(main())
"""


def conus_command(segmenter: str) -> list[str]:
    """The command that runs the BIDS App form of conus with the chosen segmenter."""
    if segmenter == "test":
        return [sys.executable, "-c", TEST_CONUS]
    return [sys.executable, "-m", "bids_app"]


def build_tube_dataset(root: Path, n_subjects: int, shape: tuple[int, int, int]) -> Path:
    """A BIDS dataset of ``n_subjects`` tube phantoms (the tests' fixture builder)."""
    sys.path.insert(0, str(TESTS))
    from fixtures import ImageSpec, build_dataset

    specs = [ImageSpec(sub=f"{i + 1:02d}", shape=shape, seed=i) for i in range(n_subjects)]
    return build_dataset(root, specs)


def participants(bids: Path) -> list[str]:
    """Participant labels (without ``sub-``) from participants.tsv, else from the sub-* folders."""
    tsv = bids / "participants.tsv"
    if tsv.is_file():
        with open(tsv, newline="", encoding="utf-8") as fh:
            rows = csv.DictReader(fh, delimiter="\t")
            return [r["participant_id"].removeprefix("sub-") for r in rows if r.get("participant_id")]
    return sorted(p.name.removeprefix("sub-") for p in bids.glob("sub-*") if p.is_dir())


def run_tasks(command: list[str], bids: Path, out: Path, labels: list[str], concurrency: int,
              extra: list[str]) -> float:
    """One process per participant, at most ``concurrency`` at a time; returns wall seconds."""
    pending = list(labels)
    running: list[subprocess.Popen] = []
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < concurrency:
            label = pending.pop(0)
            argv = [*command, str(bids), str(out), "participant", "--participant_label", label, *extra]
            running.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        time.sleep(0.05)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(proc.args[-6:])} exited {proc.returncode}:\n{proc.stderr.read()}")
    return time.perf_counter() - started


def run_ncpus(command: list[str], bids: Path, out: Path, labels: list[str], concurrency: int,
              extra: list[str]) -> float:
    """One invocation for all participants with ``--n_cpus concurrency``; returns wall seconds."""
    argv = [*command, str(bids), str(out), "participant", "--participant_label", *labels,
            "--n_cpus", str(concurrency), *extra]
    started = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"conus --n_cpus {concurrency} exited {proc.returncode}:\n{proc.stderr}")
    return time.perf_counter() - started


def count_sidecars(out: Path) -> int:
    """Number of completed runs (a run's sidecar is written last)."""
    return len(list(out.glob("sub-*/**/*_label-SC_seg.json")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bids", type=Path, help="BIDS dataset (default: build tube phantoms)")
    parser.add_argument("--subjects", type=int, default=4, help="phantom participants to build (default 4)")
    parser.add_argument("--shape", type=int, nargs=3, default=(20, 20, 24), help="phantom shape in voxels")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4], help="concurrency levels")
    parser.add_argument("--modes", nargs="+", choices=("tasks", "ncpus"), default=["tasks", "ncpus"])
    parser.add_argument("--segmenter", choices=("shipped", "test"), default="shipped")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, deleted)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="conus-scaleout-", dir=args.work))
    try:
        bids = args.bids or build_tube_dataset(work / "bids", args.subjects, tuple(args.shape))
        labels = participants(bids)
        if len(labels) < max(args.levels):
            print(f"note: {len(labels)} participants, fewer than the top concurrency {max(args.levels)}")
        command = conus_command(args.segmenter)
        extra = ["--skip_bids_validator", "-q"]
        print(f"{len(labels)} participants from {bids}; segmenter: {args.segmenter}; "
              f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}")
        print(f"{'mode':6} {'concurrent':>10} {'runs':>5} {'wall s':>8} {'runs/min':>9} {'speed-up':>9}")
        for mode in args.modes:
            base = None
            for level in args.levels:
                out = work / f"out-{mode}-{level}"
                run = run_tasks if mode == "tasks" else run_ncpus
                seconds = run(command, bids, out, labels, level, extra)
                runs = count_sidecars(out)
                rate = 60.0 * runs / seconds
                base = base or rate
                print(f"{mode:6} {level:>10} {runs:>5} {seconds:>8.1f} {rate:>9.1f} {rate / base:>8.2f}x",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
