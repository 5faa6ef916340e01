"""The synthetic engine's yardstick and its ablations (issue #4).

Each *arm* trains a base-8 3D U-Net from scratch on one engine variant
(``conus train --synthetic --engine VARIANT``, :data:`bids_app.synth.features.ABLATIONS`) with the
same recipe and the same number of steps, then scores it

- on real scans with reference masks (``--real BIDS_DIR``, e.g. the cervical development set),
  through the pipeline with the reference mask's centerline (the thesis's exact-centerline crops),
- on a held-out phantom family with parameters outside the training ranges (procedural phantom,
  deformation/size strength ``--phantom-strength``, seeds 6,000,000+; crops as one network input).

Arms train ``--parallel`` at a time (one TensorFlow thread and one data worker each) and are budgeted
by steps, not wall clock, so that a loaded machine cannot favour one arm. A finished arm is not
retrained; a killed arm resumes from its checkpoints. Results accumulate in ``OUT/results.json``
and a Markdown table is printed.

    python evaluation/engine_ablation.py OUT --pam50 DIR --real BIDS_DIR \
        [--arms full:1 plain:1 no-acquisition:1 ...] [--epochs 10] [--steps 50]

The same harness compares network architectures at equal training wall-clock time (issue #5):
``--architecture NAME --max-minutes M`` trains each arm for M minutes instead of a number of
epochs; run the two architectures into two OUT folders at the same time, so that they share the
machine alike.

    python evaluation/engine_ablation.py runs/arch-b8 --arms full:1 --max-minutes 40 ... &
    python evaluation/engine_ablation.py runs/arch-thesis --arms full:1 --architecture thesis --max-minutes 40 ...

The real scans are a development set: report their numbers as such and never train on them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

DEFAULT_ARMS = ("full:1", "plain:1", "no-acquisition:1", "no-extra-tissues:1", "no-size-variation:1",
                "no-artefacts:1", "no-deformation:1", "full:2")
PHANTOM_SEED_BASE = 6_000_000
REGIONS = ("cervical", "thoracic", "lumbosacral")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the arms' runs, bundles and results")
    parser.add_argument("--pam50", type=Path, required=True, help="PAM50 template folder")
    parser.add_argument("--real", type=Path, default=None, help="BIDS dataset with reference masks")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help="VARIANT:SEED (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="steps per epoch")
    parser.add_argument("--lr", type=float, default=1e-3, help="start of the cosine decay over the epochs")
    parser.add_argument("--parallel", type=int, default=2, help="arms training at once")
    parser.add_argument("--architecture", default=None,
                        help="network architecture of every arm (default: the task's, unet3d-b8d3)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="train each arm for this wall-clock time instead of --epochs")
    parser.add_argument("--phantom-n", type=int, default=8, help="phantom crops per region")
    parser.add_argument("--phantom-strength", type=float, default=1.8)
    parser.add_argument("--evaluate-only", action="store_true", help="score finished arms, train nothing")
    return parser.parse_args(argv)


def arm_dirs(out: Path, arm: str) -> tuple[Path, Path]:
    name = arm.replace(":", "-s")
    return out / name / "run", out / name / "bundle"


def train_command(args, arm: str) -> list[str]:
    variant, seed = arm.split(":")
    run_dir, bundle = arm_dirs(args.out, arm)
    cmd = [sys.executable, "-m", "bids_app", "train", "--synthetic", "--pam50", str(args.pam50),
           "--task", "segmentation", "--engine", variant, "--out", str(bundle), "--name", f"ablation-{variant}",
           "--run-dir", str(run_dir), "--steps", str(args.steps),
           "--batch-size", "4", "--seed", seed, "--lr", str(args.lr), "--schedule", "cosine",
           "--threads", "1", "--workers", "1"]
    if args.max_minutes is not None:
        cmd += ["--max-minutes", str(args.max_minutes)]
    else:
        cmd += ["--epochs", str(args.epochs)]
    if args.architecture is not None:
        cmd += ["--architecture", args.architecture]
    if (run_dir / "state.json").is_file():
        cmd.append("--resume")
    return cmd


def score_arm(args, arm: str) -> dict:
    """Real exact-centerline Dice and phantom-family Dice of a finished arm."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import eval_synthetic
    import evaluate_bids

    from bids_app.bundle import load_bundle

    _, bundle = arm_dirs(args.out, arm)
    meta = json.loads((bundle / "metadata.json").read_text())
    result = {"arm": arm, "variant": arm.split(":")[0], "seed": int(arm.split(":")[1]),
              "architecture": meta.get("architecture"),
              "steps": meta["training"]["steps"], "train_seconds": meta["training"]["seconds"],
              "bundle_sha256": load_bundle(bundle).sha256}
    if args.real is not None:
        ns = argparse.Namespace(bids_dir=args.real, out_dir=args.out / arm.replace(":", "-s") / "real",
                                model=str(bundle), modes=["reference"], extra=[])
        runs = evaluate_bids.evaluate(ns)["reference"]["runs"]
        result["real_dice"] = {run_id: values.get("dice") for run_id, values in runs.items()}
    phantom = eval_synthetic.evaluate(str(bundle), None, args.phantom_n, args.phantom_strength, "phantom",
                                      PHANTOM_SEED_BASE, REGIONS)
    result["phantom_dice"] = {region: r["dice_mean"] for region, r in phantom.items()}
    result["phantom_by_contrast"] = {region: r["by_contrast"] for region, r in phantom.items()}
    return result


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def table(results: dict) -> str:
    """Markdown table of the scored arms."""
    real_ids = sorted({k for r in results.values() for k in r.get("real_dice", {})})
    head = ["arm", "steps", "min"] + [k.split("_")[-1] for k in real_ids] + ["real mean"] + \
        [f"phantom {r[:5]}" for r in REGIONS] + ["phantom mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, r in results.items():
        real = [r.get("real_dice", {}).get(k) for k in real_ids]
        ph = [r["phantom_dice"].get(k) for k in REGIONS]
        cells = [arm, str(r["steps"]), f"{r['train_seconds'] / 60:.0f}"]
        cells += ["-" if v is None else f"{v:.3f}" for v in real]
        cells += [f"{_mean(real):.3f}" if _mean(real) is not None else "-"]
        cells += ["-" if v is None else f"{v:.3f}" for v in ph] + [f"{_mean(ph):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    todo = [a for a in args.arms if a not in results]
    running: dict[str, subprocess.Popen] = {}

    def save():
        results_path.write_text(json.dumps(results, indent=1))

    def score(arm: str):
        t0 = time.time()
        try:
            results[arm] = score_arm(args, arm)
        except Exception:  # noqa: BLE001 - keep the other arms going; the traceback says what broke
            traceback.print_exc()
            return
        results[arm]["score_seconds"] = round(time.time() - t0, 1)
        save()
        print(f"scored {arm}: {json.dumps(results[arm])}", flush=True)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    while todo or running:
        for arm in [a for a in todo if (arm_dirs(args.out, a)[1] / "metadata.json").is_file()]:
            todo.remove(arm)
            score(arm)
        while todo and len(running) < args.parallel and not args.evaluate_only:
            arm = todo.pop(0)
            log = open(args.out / f"{arm.replace(':', '-s')}.log", "a")
            print(f"training {arm}: {' '.join(train_command(args, arm))}", flush=True)
            running[arm] = subprocess.Popen(train_command(args, arm), stdout=log, stderr=subprocess.STDOUT, env=env)
        if args.evaluate_only:
            break
        for arm, proc in list(running.items()):
            if proc.poll() is not None:
                del running[arm]
                if proc.returncode != 0:
                    print(f"arm {arm} failed with exit code {proc.returncode}; see its log", flush=True)
                    continue
                score(arm)
        time.sleep(5)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
