"""Conus tip error and Dice of segmentation bundles on held-out synthetic crops that contain the tip.

Usage::

    python evaluation/eval_conus_tip.py seg-general [runs/other-bundle ...] --pam50 ../shared/data/PAM50 \
        [--n 48] [--seed-base 4500000] [--strength 1.0] [--out results.json]

Lumbosacral crops (``bids_app.synth.generate_crop``, each bundle's spacing and patch size) are drawn
from ``--seed-base`` on (default 4,500,000: disjoint from training seeds < 1,000,000 and from the
sets recorded in bundle metadata) until ``--n`` of them hold the reference conus tip, i.e. the
cord ends inside the crop rather than leaving through its bottom. The bundle metadata reports the
tip on the 16 fixed lumbosacral crops, of which only about 5 hold it; this script measures it on
more. The whole crop is one network input, as in the bundle validation. The tip of a mask is the
inferior end of its centerline (:func:`bids_app.centerline.centerline_from_mask`), computed the
same way for the reference and the prediction; a prediction with no cord counts as a miss.
Prints a table; ``--out`` also writes the numbers as JSON. Runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def tip_crops(pam50: str | None, n: int, seed_base: int, patch_size, spacing, strength: float,
              max_tries: int = 2000, engine: str = "full") -> list:
    """The first ``n`` lumbosacral crops (from ``seed_base`` on) whose reference cord ends inside,
    from engine variant ``engine`` (default ``full``: the yardstick the recorded numbers used)."""
    from bids_app.synth import generate_crop
    from bids_app.synth.features import features_named

    features = features_named(engine)
    out = []
    for seed in range(seed_base, seed_base + max_tries):
        s = generate_crop(seed, patch_size=patch_size, spacing=spacing, pam50_dir=pam50, region="lumbosacral",
                          strength=strength, features=features)
        if s.cord.any() and not s.cord[:, :, 0].any():
            out.append((seed, s))
        if len(out) == n:
            break
    return out


def evaluate(bundle, crops: list) -> dict:
    """Tip errors (mm), Dice and the sub-3-mm share of one loaded bundle on the tip ``crops``
    (from :func:`tip_crops` at the bundle's patch size and spacing)."""
    from bids_app import centerline as cl
    from bids_app.metrics import dice

    predict = bundle.predict_fn()
    affine = np.diag([*map(float, bundle.spacing), 1.0])
    errors, signed, dices, contrasts, missed = [], [], [], [], 0
    extent, past, empty = [], 0, 0
    for _, s in crops:
        prob = predict(s.image[None, ..., None].astype(np.float32))[0, ..., 0]
        pred = (prob >= bundle.threshold).astype(np.uint8)
        dices.append(float(dice(pred, s.cord)))
        contrasts.append(s.contrast)
        # inferior extent along the crop's z (always defined; a prediction that reaches the crop's
        # bottom runs past the conus, and its error is then a lower bound)
        ref_z = np.nonzero(s.cord.any(axis=(0, 1)))[0]
        pred_z = np.nonzero(pred.any(axis=(0, 1)))[0]
        if pred_z.size == 0:
            empty += 1
        else:
            past += int(pred_z[0] == 0)
            extent.append(float((pred_z[0] - ref_z[0]) * bundle.spacing[2]))
        ref_tip = cl.centerline_from_mask(s.cord, affine).conus_tip_mm
        got = cl.centerline_from_mask(pred, affine)
        if not got.found or got.conus_tip_mm is None:
            missed += 1
            continue
        errors.append(float(np.linalg.norm(np.asarray(got.conus_tip_mm) - np.asarray(ref_tip))))
        # + : the prediction stops above the reference tip (too short); - : it runs past it
        signed.append(float(got.conus_tip_mm[2] - ref_tip[2]))
    n_crops = len(crops)
    ext = np.abs(extent)
    return {
        "bundle": str(bundle.path), "n_crops": n_crops,
        "inferior_extent_error_mm_median": float(np.median(ext)) if extent else None,
        "inferior_extent_within_3mm": float((ext <= 3.0).sum() / n_crops) if n_crops else None,
        "inferior_extent_signed_mm_median": float(np.median(extent)) if extent else None,
        "ran_to_crop_bottom": past, "no_cord_predicted": empty,
        "missed": missed,
        "seeds": [crops[0][0], crops[-1][0]] if crops else None,
        "tip_error_mm_median": float(np.median(errors)) if errors else None,
        "tip_error_mm_mean": float(np.mean(errors)) if errors else None,
        "tip_signed_z_mm_median": float(np.median(signed)) if signed else None,
        "within_3mm": sum(e <= 3.0 for e in errors) / n_crops if n_crops else None,
        "within_5mm": sum(e <= 5.0 for e in errors) / n_crops if n_crops else None,
        "note": "centerline tip: a prediction with no cord or reaching the crop bottom counts as missed",
        "dice_mean": float(np.mean(dices)) if dices else None,
        "dice_median": float(np.median(dices)) if dices else None,
        "dice_by_contrast": {c: float(np.mean([d for d, k in zip(dices, contrasts, strict=True) if k == c]))
                             for c in sorted(set(contrasts))},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", help="bundle folders or shipped model names")
    parser.add_argument("--pam50", default=None, help="PAM50 template folder (default: phantom only)")
    parser.add_argument("--n", type=int, default=48, help="crops holding the tip (default: %(default)s)")
    parser.add_argument("--seed-base", type=int, default=4_500_000)
    parser.add_argument("--strength", type=float, default=1.0, help="deformation/size range (1 = training)")
    parser.add_argument("--engine", default="full", help="synthetic engine variant of the crops (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    from bids_app.bundle import load_bundle

    results = []
    crops_by_grid: dict[tuple, list] = {}   # bundles on the same grid share one set of crops
    for b in args.bundles:
        t = time.perf_counter()
        bundle = load_bundle(b)
        grid = (tuple(bundle.patch_size), tuple(bundle.spacing))
        if grid not in crops_by_grid:
            crops_by_grid[grid] = tip_crops(args.pam50, args.n, args.seed_base, *grid, args.strength,
                                              engine=args.engine)
        r = evaluate(bundle, crops_by_grid[grid])
        r["seconds"] = round(time.perf_counter() - t, 1)
        results.append(r)
        print(f"{b}: inferior extent error median {r['inferior_extent_error_mm_median']:.1f} mm "
              f"(signed {r['inferior_extent_signed_mm_median']:+.1f}; - = runs past the tip), within 3 mm "
              f"{r['inferior_extent_within_3mm']:.2f}, ran to the crop bottom {r['ran_to_crop_bottom']}, no cord "
              f"{r['no_cord_predicted']}, of {r['n_crops']}")
        print(f"  centerline tip median {r['tip_error_mm_median']:.1f} mm (mean {r['tip_error_mm_mean']:.1f}, "
              f"signed z median {r['tip_signed_z_mm_median']:+.1f}), within 3 mm {r['within_3mm']:.2f}, "
              f"within 5 mm {r['within_5mm']:.2f}, missed {r['missed']}/{r['n_crops']}; Dice mean "
              f"{r['dice_mean']:.3f} median {r['dice_median']:.3f} {r['dice_by_contrast']}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"argv": sys.argv if argv is None else argv, "pam50": args.pam50, "strength": args.strength,
                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
