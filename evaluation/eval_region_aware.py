"""Region-aware segmentation against one model (issue #7): Dice overall and per region.

Runs the participant level twice on a labelled BIDS dataset with disc labels (e.g. from
``conus synth --region whole thoracolumbar``): once with ``--model`` alone, once with
``--lumbosacral-model`` below the split disc, both with ``--split`` so that each run's Dice is
also reported for the cervicothoracic and lumbosacral cord. Prints a per-run table and the mean
difference; nothing is written into the BIDS folder.

    python evaluation/eval_region_aware.py BIDS_DIR OUT --lumbosacral-model BUNDLE [--model NAME] \
        [--split-level T9-T10] [--reuse single]

``--reuse single`` collects the single-model reports already in ``OUT/single`` (from an earlier
call, e.g. run while the specialist was still training) instead of running them again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

KEYS = ("dice", "dice_cervicothoracic", "dice_lumbosacral", "conus_tip_error_mm")


def summarise(runs: dict[str, dict], keys=KEYS) -> dict[str, float | None]:
    """Mean of each key over the runs that have it (None when none has)."""
    out = {}
    for key in keys:
        values = [r[key] for r in runs.values() if r.get(key) is not None]
        out[key] = statistics.fmean(values) if values else None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--lumbosacral-model", required=True)
    parser.add_argument("--model", default=None, help="general segmentation model (default: the shipped one)")
    parser.add_argument("--split-level", default="T9-T10")
    parser.add_argument("--reuse", nargs="+", choices=("single", "region-aware"), default=(),
                        help="collect these conditions' reports from OUT instead of running them again")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bids_app.cli import main as conus_main
    from bids_app.report import collect_run_reports

    results = {}
    for name, extra in (("single", []), ("region-aware", ["--lumbosacral-model", args.lumbosacral_model])):
        out = args.out_dir / name
        reused, code = name in args.reuse, None
        if not reused:
            argv_run = [str(args.bids_dir), str(out), "participant", "--skip_bids_validator", "--overwrite", "-q",
                        "--split", "--split-level", args.split_level, *extra]
            if args.model:
                argv_run += ["--model", args.model]
            code = conus_main(argv_run)
        runs = {r.run_id: {k: r.values.get(k) for k in KEYS} for r in collect_run_reports(out)}
        if reused and not runs:
            parser.error(f"--reuse {name}: no run reports in {out}")
        results[name] = {"exit_code": code, "runs": runs, "mean": summarise(runs), "reused": reused}
    print(json.dumps(results, indent=1))
    print(f"{'run':36s} " + " ".join(f"{k[:18]:>18s}" for k in KEYS))
    for run_id in results["single"]["runs"]:
        for name in results:
            values = results[name]["runs"].get(run_id, {})
            cells = " ".join("n/a".rjust(18) if values.get(k) is None else f"{values[k]:18.3f}" for k in KEYS)
            print(f"{run_id[:24] + ' ' + name:36s} {cells}")
    for name in results:
        mean = results[name]["mean"]
        print(f"{'mean ' + name:36s} " + " ".join("n/a".rjust(18) if mean[k] is None else f"{mean[k]:18.3f}"
                                                 for k in KEYS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
