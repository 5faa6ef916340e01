"""Accuracy of automatic vertebral levels (issue #7): disc positions, identities, split point.

Two parts, each optional:

- ``--synthetic``: held-out whole synthetic views (seeds 4,000,000+, disjoint from training),
  the coarse spine model run as in the pipeline (:mod:`bids_app.training.view_eval`): disc
  position error, detection recall, identities (a skipped identification counts as a
  failure), T9-T10 split point, centerline and conus tip errors, per field-of-view type;
- ``--bids DIR``: every image of a BIDS dataset that has reference disc labels
  (``_label-discs_dlabel`` / ``_labels-disc-manual``): each reference disc is matched to the
  nearest detected disc (error in mm) and its identity checked when identities were given.
  ``--reference-kind bodies`` reads the same files as mid-vertebral-body labels (SCT's
  ``PAM50_label_body`` convention, value n = the centre of vertebra n): each reference body is
  compared with the midpoint of the two detected discs that bracket it, and those discs should be
  n (above) and n + 1 (below). Some datasets ship body labels under a disc name
  (``docs/results/levels_real_reference.md``).

    python evaluation/eval_levels.py --model models/spine-coarse --synthetic --pam50 PAM50_DIR \\
        --bids ../shared/data/bids-cervical --out levels.json

Real datasets given here are development data: report their numbers as such.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spine-coarse", help="spine bundle name or folder")
    parser.add_argument("--synthetic", action="store_true", help="evaluate on held-out synthetic whole views")
    parser.add_argument("--pam50", type=Path, default=None, help="PAM50 template folder (else phantom only)")
    parser.add_argument("--n-per-region", type=int, default=6, help="synthetic views per field-of-view type")
    parser.add_argument("--strength", type=float, default=1.0, help="synthetic deformation/size range")
    parser.add_argument("--bids", type=Path, default=None, help="BIDS dataset with reference disc labels")
    parser.add_argument("--reference-kind", choices=("discs", "bodies"), default="discs",
                        help="what the reference labels mark: discs (default) or vertebral body centres")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for all numbers")
    return parser.parse_args(argv)


def match_body_labels(body_mm: np.ndarray, body_values: np.ndarray, discs_mm: np.ndarray,
                      disc_values: np.ndarray | None) -> list[dict]:
    """Compare mid-vertebral-body reference labels with a detected disc chain.

    The discs are ordered along the chain's main direction (superior first, by world z in
    RAS+). A body lies between two consecutive discs: its error is the distance (mm) from the
    reference point to their midpoint, ``fraction`` is where it falls between them along the
    chain (0 = upper disc, 1 = lower, ideally 0.5), and ``identity_ok`` says whether the upper
    and lower discs were named n and n + 1 (None when no identities were given). A body with no
    detected disc on one side gets ``error_mm`` None.
    """
    body_mm = np.atleast_2d(np.asarray(body_mm, dtype=float))
    discs_mm = np.atleast_2d(np.asarray(discs_mm, dtype=float)) if len(discs_mm) else np.zeros((0, 3))
    rows = []
    if len(discs_mm) >= 2:
        axis = discs_mm[np.argmax(discs_mm[:, 2])] - discs_mm[np.argmin(discs_mm[:, 2])]
        axis = axis / (np.linalg.norm(axis) or 1.0)            # points superior
        order = np.argsort(-(discs_mm @ axis))                  # superior first
        along = discs_mm[order] @ axis
    for point, value in zip(body_mm, np.asarray(body_values).astype(int), strict=True):
        row = {"value": int(value), "error_mm": None, "fraction": None, "identity_ok": None}
        if len(discs_mm) >= 2:
            t = float(point @ axis)
            above = np.flatnonzero(along >= t)
            below = np.flatnonzero(along < t)
            if len(above) and len(below):
                i, j = order[above[-1]], order[below[0]]
                mid = (discs_mm[i] + discs_mm[j]) / 2
                row["error_mm"] = float(np.linalg.norm(point - mid))
                row["fraction"] = float((along[above[-1]] - t) / (along[above[-1]] - along[below[0]]))
                if disc_values is not None:
                    row["identity_ok"] = bool(disc_values[i] == value and disc_values[j] == value + 1)
        rows.append(row)
    return rows


def evaluate_real(bids_dir: Path, model: str, reference_kind: str = "discs") -> list[dict]:
    """Detected vs reference discs for every image with reference disc labels."""
    from bids_app import levels as lv
    from bids_app.bids_io import find_runs
    from bids_app.config import ParticipantConfig
    from bids_app.image_io import load_image
    from bids_app.inference import InferenceOptions, Models, segment_image

    cfg = ParticipantConfig(bids_dir=bids_dir, output_dir=Path("/nonexistent"), analysis_level="participant")
    # as the pipeline runs --levels auto: the default centerline model, discs from ``model``
    options = InferenceOptions(levels_model=model, disc_heatmaps=True)
    models = Models(options)
    rows = []
    for run in find_runs(cfg):
        if run.disc_labels is None:
            continue
        start = time.perf_counter()
        result = segment_image(load_image(run.path), options, models=models)
        heat = result.coarse_heatmaps
        if heat is None:
            raise ValueError(f"{model} predicts no discs: give a spine bundle (outputs cord, discs, anchors)")
        centre = result.centerline if result.centerline.found else None
        auto = lv.discs_from_heatmaps(heat["discs"], heat["anchors"], heat["affine"], centerline=centre,
                                      conus_tip_mm=result.conus_tip_mm)
        reference = [d for d in lv.read_disc_labels(run.disc_labels) if 3 <= d.value <= 25]
        values = auto.identification.values
        row = {"run": run.run_id, "seconds": round(time.perf_counter() - start, 1),
               "discs_detected": int(len(auto.points_mm)), "detected_mm": np.round(auto.points_mm, 1).tolist(),
               "identified": values is not None, "reason": auto.identification.reason,
               "reference_kind": reference_kind}
        if reference_kind == "bodies":
            matched = match_body_labels(np.array([d.mm for d in reference]), np.array([d.value for d in reference]),
                                        auto.points_mm, None if values is None else np.asarray(values))
            for entry, ref in zip(matched, reference, strict=True):
                entry["name"] = lv.vertebra_name(ref.value)
            rows.append({**row, "reference": matched})
            continue
        per_disc = []
        for ref in reference:
            entry = {"value": ref.value, "name": ref.name, "error_mm": None, "identity": None}
            if len(auto.points_mm):
                d = np.linalg.norm(auto.points_mm - np.asarray(ref.mm), axis=1)
                i = int(np.argmin(d))
                entry["error_mm"] = float(d[i])
                entry["identity"] = None if values is None else int(values[i])
            per_disc.append(entry)
        rows.append({**row, "reference": per_disc})
    return rows


def _body_text(entry: dict) -> str:
    if entry["error_mm"] is None:
        return f"{entry['name']} body: no detected disc on one side"
    return (f"{entry['name']} body: {entry['error_mm']:.1f} mm from the midpoint of its discs "
            f"(at {entry['fraction']:.2f} of the way down)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.synthetic and args.bids is None:
        print("nothing to do: give --synthetic and/or --bids DIR")
        return 2
    out: dict = {"model": args.model}
    if args.synthetic:
        from bids_app.bundle import load_bundle
        from bids_app.training.view_eval import evaluate_views

        bundle = load_bundle(args.model)
        start = time.perf_counter()
        views = evaluate_views(bundle.predict_fn(), outputs=bundle.outputs, spacing=bundle.spacing,
                               patch_size=bundle.patch_size, pam50_dir=str(args.pam50) if args.pam50 else None,
                               n_per_region=args.n_per_region, strength=args.strength)
        views["seconds"] = round(time.perf_counter() - start, 1)
        out["synthetic"] = views
        print("## synthetic whole views (held out)")
        print("| field of view | n | cord found | centerline mm | conus tip mm (median) | disc error mm (median) "
              "| discs within 3 mm | identities correct | split within 3 mm |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, s in [*views["by_region"].items(), ("all", views["all"])]:
            def f(key, s=s):
                v = s.get(key)
                return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
            print(f"| {name} | {s['n_views']} | {f('cord_found_rate')} | {f('centerline_mean_mm')} | "
                  f"{f('conus_tip_error_mm_median')} | {f('disc_error_mm_median')} | {f('disc_within_3mm')} | "
                  f"{f('identities_correct_rate')} | {f('split_point_within_3mm')} |")
    if args.bids is not None:
        rows = evaluate_real(args.bids, args.model, args.reference_kind)
        out["real"] = rows
        print(f"## real images with reference {args.reference_kind} labels (development data)")
        for row in rows:
            if args.reference_kind == "bodies":
                discs = ", ".join(_body_text(d) for d in row["reference"])
            else:
                discs = ", ".join(f"{d['name']}: {'-' if d['error_mm'] is None else round(d['error_mm'], 1)} mm"
                                  f"{'' if d['identity'] is None else ' (as ' + str(d['identity']) + ')'}"
                                  for d in row["reference"])
            print(f"- {row['run']}: {row['discs_detected']} discs detected; {discs}; {row['reason']}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
