"""Evaluate conus on a labelled BIDS dataset (e.g. ../shared/data/bids-cervical).

Runs the participant level once per centerline mode (automatic, and the reference mask's
centerline: the thesis's "exact centerline" experiment), then the group level and a side-by-side
comparison, and prints per-run Dice. Nothing is written into the BIDS folder.

    python evaluation/evaluate_bids.py BIDS_DIR OUT_DIR [--model NAME_OR_PATH] [--modes auto reference]

These are development numbers when BIDS_DIR is the cervical development set: report them as such.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bids_app.cli import main as conus_main
from bids_app.report import collect_run_reports, compare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", default=None, help="segmentation bundle name or path")
    parser.add_argument("--modes", nargs="+", default=["auto", "reference"], choices=["auto", "reference"])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more conus options")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    results: dict[str, dict] = {}
    folders = []
    for mode in args.modes:
        out = args.out_dir / f"centerline-{mode}"
        argv = [str(args.bids_dir), str(out), "participant", "--skip_bids_validator", "--overwrite",
                "--centerline", mode, "-q", *args.extra]
        if args.model:
            argv += ["--model", args.model]
        start = time.perf_counter()
        code = conus_main(argv)
        seconds = time.perf_counter() - start
        conus_main([str(args.bids_dir), str(out), "group", "-q"])
        runs = {r.run_id: {k: r.values.get(k) for k in ("dice", "precision", "recall", "hd95_mm")}
                for r in collect_run_reports(out)}
        results[mode] = {"exit_code": code, "seconds": round(seconds, 1), "runs": runs}
        folders.append(out)
    if len(folders) > 1:
        compare(folders, args.out_dir / "compare")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = evaluate(args)
    print(json.dumps(results, indent=2))
    for mode, result in results.items():
        for run_id, values in result["runs"].items():
            dice = values.get("dice")
            print(f"{mode:10s} {run_id:40s} Dice {dice if dice is None else round(dice, 4)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
