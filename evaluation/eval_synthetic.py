"""Dice of model bundles on held-out synthetic crops, per region and contrast (prints a table).

Usage::

    python evaluation/eval_synthetic.py models/seg-general [models/other ...] \
        --pam50 ../shared/data/PAM50 --n 16 [--strength 1.6] [--source phantom] [--seed-base 4000000]

Crops come from ``bids_app.synth.generate_crop`` at each bundle's spacing and patch size, with seeds
from ``--seed-base`` (default 4,000,000: disjoint from training seeds < 1,000,000 and from the
sets recorded in the bundles' metadata) and from ``--engine`` (default ``full``: every realism feature
on, the yardstick all recorded numbers were measured on, even after the default engine dropped the
scanner artefacts). The whole crop is one network input (no sliding
window), so this measures the network itself; the full pipeline is evaluated by
``evaluation/evaluate_bids.py``. Runs on CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REGIONS = ("cervical", "thoracic", "lumbosacral")


def evaluate(bundle_path: str, pam50: str | None, n: int, strength: float, source: str | None, seed_base: int,
             regions=REGIONS, engine: str = "full") -> dict:
    """{region: {"dice_mean", "dice_median", "n_with_cord", "by_contrast": {...}}} for one bundle."""
    from bids_app.bundle import load_bundle
    from bids_app.metrics import dice
    from bids_app.synth import generate_crop
    from bids_app.synth.features import features_named

    features = features_named(engine)
    bundle = load_bundle(bundle_path)
    predict = bundle.predict_fn()
    out = {}
    for ri, region in enumerate(regions):
        scores, contrasts = [], []
        for i in range(n):
            s = generate_crop(seed_base + 10_000 * ri + i, patch_size=bundle.patch_size, spacing=bundle.spacing,
                              pam50_dir=pam50, region=region, source=source, strength=strength,
                              features=features)
            if not s.cord.any():
                continue
            prob = predict(s.image[None, ..., None].astype(np.float32))[0, ..., 0]
            scores.append(dice(prob >= bundle.threshold, s.cord > 0))
            contrasts.append(s.contrast)
        by_contrast = {c: float(np.mean([d for d, cc in zip(scores, contrasts, strict=True) if cc == c]))
                       for c in sorted(set(contrasts))}
        out[region] = {"dice_mean": float(np.mean(scores)) if scores else float("nan"),
                       "dice_median": float(np.median(scores)) if scores else float("nan"),
                       "n_with_cord": len(scores), "by_contrast": by_contrast}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", help="bundle folders or shipped model names")
    parser.add_argument("--pam50", default=None, help="PAM50 template folder (default: phantom only)")
    parser.add_argument("--n", type=int, default=16, help="crops per region (default: %(default)s)")
    parser.add_argument("--strength", type=float, default=1.0,
                        help="deformation/size range; >1 lies outside the training ranges")
    parser.add_argument("--source", choices=("pam50", "phantom"), default=None)
    parser.add_argument("--seed-base", type=int, default=4_000_000)
    parser.add_argument("--regions", nargs="+", default=list(REGIONS))
    parser.add_argument("--engine", default="full", help="synthetic engine variant of the crops (default: %(default)s)")
    args = parser.parse_args(argv)
    print(f"{'bundle':28s} {'region':12s} {'n':>3s} {'Dice mean':>9s} {'median':>7s}  by contrast")
    for path in args.bundles:
        t0 = time.time()
        res = evaluate(path, args.pam50, args.n, args.strength, args.source, args.seed_base, tuple(args.regions),
                       args.engine)
        for region, r in res.items():
            contrast = ", ".join(f"{c} {v:.3f}" for c, v in r["by_contrast"].items())
            print(f"{Path(path).name:28s} {region:12s} {r['n_with_cord']:3d} {r['dice_mean']:9.4f} "
                  f"{r['dice_median']:7.4f}  {contrast}")
        print(f"{Path(path).name:28s} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
