"""Why automatic disc identities fail: the spine model's detections under oracle anchors (issue #7).

Runs a spine bundle (cord + discs [+ anchors]) over held-out whole synthetic views, the way
``bids_app.training.view_eval`` does, and scores the disc identities three ways:

- ``model``: what conus ships (sacrum / top-of-spine flags from the model's anchor output, weighed
  against spacing and conus, and the disc-free room at the chain's ends);
- ``oracle_anchors``: the same detections, with the sacrum and top-of-spine flags taken from the
  truth (L5-S1 / C2-C3 in view) and held fixed: the most a perfect anchor output could give on its own;
- ``oracle_anchors_drop_beyond``: as above, and detections more than ``margin`` mm beyond the true
  L5-S1 / C2-C3 (inside the sacrum or C2/C1/skull) removed, as a perfect anchor *region* would.

It also counts the detector's errors per view: false detections (no true disc within
``match_mm``) above the top true disc, below the bottom one or in between, and missed discs.
A skipped identification counts as a failure (as in the issue); ``wrong_*`` counts the detected
true discs given another value (a skip is safe, a wrong value is not). Usage::

    python evaluation/identity_diagnosis.py --model spine-coarse --pam50 DIR [--n 3] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

TOP, BOTTOM = 3, 25   # C2-C3 and L5-S1 (SCT disc values)
CONDITIONS = ("model", "oracle_anchors", "oracle_anchors_drop_beyond")


def oracle_flags(truth: list[tuple[int, np.ndarray]]) -> tuple[bool, bool]:
    """(sacrum in view, top of the spine in view) from the true discs: L5-S1 / C2-C3 present."""
    values = {v for v, _ in truth}
    return BOTTOM in values, TOP in values


def drop_beyond(points: np.ndarray, truth: list[tuple[int, np.ndarray]], margin: float = 5.0) -> np.ndarray:
    """Detections (inferior -> superior) without those more than ``margin`` mm (scanner z) above the
    true C2-C3 or below the true L5-S1, when that disc is in view."""
    truth_at = dict(truth)
    keep = np.ones(len(points), bool)
    if TOP in truth_at:
        keep &= points[:, 2] <= truth_at[TOP][2] + margin
    if BOTTOM in truth_at:
        keep &= points[:, 2] >= truth_at[BOTTOM][2] - margin
    return points[keep]


def identity_hits(points: np.ndarray, values, truth: list[tuple[int, np.ndarray]], match_mm: float = 10.0,
                  wrong: bool = False) -> int:
    """True discs detected (nearest detection within ``match_mm``) *and* given their true value (with
    ``wrong``: detected and given another value)."""
    from bids_app.training.view_eval import match_true_discs

    if values is None:
        return 0
    return sum(i is not None and (values[i] != value if wrong else values[i] == value)
               for value, i, _ in match_true_discs(points, truth, match_mm))


def detection_errors(points: np.ndarray, truth: list[tuple[int, np.ndarray]], match_mm: float = 10.0) -> dict:
    """False detections above / below / inside the true chain (by scanner z) and missed true discs."""
    out = {"false_above": 0, "false_below": 0, "false_inside": 0, "missed": 0}
    if not truth:
        out["false_inside"] = len(points)
        return out
    true_pts = np.array([p for _, p in truth])
    for p in points:
        if np.linalg.norm(true_pts - p, axis=1).min() > match_mm:
            key = ("false_above" if p[2] > true_pts[:, 2].max() else
                   "false_below" if p[2] < true_pts[:, 2].min() else "false_inside")
            out[key] += 1
    for q in true_pts:
        if len(points) == 0 or np.linalg.norm(points - q, axis=1).min() > match_mm:
            out["missed"] += 1
    return out


def diagnose_view(predict_fn, sample, outputs, patch_size) -> dict:
    """Per-view detector errors and identity hits under the three :data:`CONDITIONS`."""
    from bids_app import levels as lv
    from bids_app.training.view_eval import true_discs, view_discs, view_heatmaps

    heat, centre = view_heatmaps(predict_fn, sample, outputs, patch_size)
    conus = centre.conus_tip_mm if centre.found else None
    auto = view_discs(heat, outputs, sample, centre)
    truth = true_discs(sample)
    points = auto.points_mm
    sacrum, top = oracle_flags(truth)
    row = {"region": sample.region, "discs_true": len(truth), "discs_detected": int(len(points)),
           **detection_errors(points, truth), "model_flags": [bool(auto.sacrum_in_view), bool(auto.top_in_view)],
           "oracle_flags": [sacrum, top]}
    fixed = lv.IdentifyConfig(anchor_lr=math.inf)  # perfect flags are held fixed
    oracle = lv.identify_discs(points, sacrum, top, conus, config=fixed) if len(points) else None
    kept = drop_beyond(points, truth)
    dropped = lv.identify_discs(kept, sacrum, top, conus, config=fixed) if len(kept) else None
    for cond, pts, ident in (("model", points, auto.identification), ("oracle_anchors", points, oracle),
                             ("oracle_anchors_drop_beyond", kept, dropped)):
        values = ident.values if ident else None
        row[cond] = identity_hits(pts, values, truth)
        row[f"wrong_{cond}"] = identity_hits(pts, values, truth, wrong=True)
    row["reason_drop_beyond"] = dropped.reason if dropped else "no discs left"
    return row


def summarise(rows: list[dict]) -> dict:
    n_true = sum(r["discs_true"] for r in rows)
    out = {"views": len(rows), "discs_true": n_true}
    for cond in CONDITIONS:
        out[f"identities_{cond}"] = sum(r[cond] for r in rows) / n_true if n_true else None
        out[f"wrong_{cond}"] = sum(r.get(f"wrong_{cond}", 0) for r in rows) / n_true if n_true else None
    for key in ("false_above", "false_below", "false_inside", "missed"):
        out[key] = sum(r[key] for r in rows)
    out["views_with_false_beyond_extremes"] = sum(r["false_above"] + r["false_below"] > 0 for r in rows)
    return out


def main(argv=None) -> int:
    from bids_app.bundle import load_bundle
    from bids_app.training.view_eval import VIEW_SEED, held_out_views

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="spine-coarse", help="spine bundle (name or folder)")
    parser.add_argument("--pam50", default=None, help="PAM50 template folder (default: phantom only)")
    parser.add_argument("--n", type=int, default=3, help="views per region (default: %(default)s)")
    parser.add_argument("--seed0", type=int, default=VIEW_SEED,
                        help="first seed (default: the bundles' held-out views, %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows and summary as JSON")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.model)
    outputs = list(bundle.metadata.get("outputs", ["cord"]))
    if "discs" not in outputs:
        parser.error(f"{args.model} has no disc output ({outputs})")
    predict = bundle.predict_fn()
    rows = []
    t0 = time.time()
    # the same views as view_eval.evaluate_views (the bundles' whole_views metadata)
    for region, seed, source, sample in held_out_views(spacing=bundle.spacing, pam50_dir=args.pam50,
                                                       n_per_region=args.n, seed0=args.seed0):
        row = {"seed": seed, "source": source, **diagnose_view(predict, sample, outputs, bundle.patch_size)}
        rows.append(row)
        print(f"{region:13s} {seed} true {row['discs_true']:2d} det {row['discs_detected']:2d} "
              f"false above/below/inside {row['false_above']}/{row['false_below']}/{row['false_inside']} "
              f"missed {row['missed']}  hits model {row['model']} oracle {row['oracle_anchors']} "
              f"oracle+drop {row['oracle_anchors_drop_beyond']}", flush=True)
    summary = summarise(rows)
    print(json.dumps(summary, indent=1))
    print(f"({time.time() - t0:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "sha256": bundle.sha256, "summary": summary,
                                        "rows": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
