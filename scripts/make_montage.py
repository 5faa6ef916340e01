"""Montage of synthetic training images: what conus's models learn from.

Writes a grid of mid-sagittal and axial slices across contrasts (rows: T2w, T1w, T2*w
from PAM50, random contrast from the phantom) and regions / acquisitions (columns), with the cord outline in red and the conus
tip marked.  Usage::

    python scripts/make_montage.py --pam50 DIR --out docs/images/synthetic_examples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

COLUMNS = (
    # (title, region, acquisition, plane)
    ("whole spine, sagittal", "whole", "sagittal", "sag"),
    ("cervical, sagittal", "cervical", "sagittal", "sag"),
    ("thoracolumbar, sagittal", "thoracolumbar", "sagittal", "sag"),
    ("lumbosacral, sagittal", "lumbosacral", "sagittal", "sag"),
    ("lumbosacral, axial at the conus", "lumbosacral", "iso", "ax_conus"),
    ("below the conus, axial (cauda equina)", "below_conus", "axial", "ax_mid"),
    ("cervical, axial", "cervical", "axial", "ax_mid"),
)
ROWS = (("T2w", "pam50"), ("T1w", "pam50"), ("T2starw", "pam50"), ("random", "phantom"))


def _panel(ax, sample, plane: str) -> None:
    img, cord = sample.image, sample.cord
    sp = sample.spacing
    if plane == "sag":
        x = int(np.argmax(cord.sum(axis=(1, 2)))) if cord.any() else img.shape[0] // 2
        sl, cs, aspect = img[x].T, cord[x].T, sp[2] / sp[1]
    else:
        if plane == "ax_conus" and sample.conus_tip_mm is not None:
            vox = np.linalg.inv(sample.affine) @ np.append(sample.conus_tip_mm, 1.0)
            k = int(np.clip(round(vox[2]) + int(8 / sp[2]), 0, img.shape[2] - 1))
        elif cord.any():
            k = int(np.median(np.nonzero(cord.any(axis=(0, 1)))[0]))
        else:
            k = img.shape[2] // 2
        sl, cs, aspect = img[:, :, k].T, cord[:, :, k].T, sp[1] / sp[0]
    ax.imshow(sl, cmap="gray", origin="lower", aspect=aspect, interpolation="bilinear")
    if cs.any():
        ax.contour(cs, levels=[0.5], colors="red", linewidths=0.6)
    if plane == "sag" and sample.conus_tip_mm is not None:
        vox = np.linalg.inv(sample.affine) @ np.append(sample.conus_tip_mm, 1.0)
        ax.plot(vox[1], vox[2], "+", color="yellow", ms=6)
    ax.set_xticks([])
    ax.set_yticks([])


def main(argv: list[str] | None = None) -> int:
    """Build the montage; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pam50", type=Path, default=None, help="PAM50 template folder (else the phantom)")
    parser.add_argument("--out", type=Path, default=Path("docs/images/synthetic_examples.png"))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bids_app.synth import generate_sample

    fig, axes = plt.subplots(len(ROWS), len(COLUMNS), figsize=(2.6 * len(COLUMNS), 4.2 * len(ROWS)))
    for r, (contrast, source) in enumerate(ROWS):
        source = source if args.pam50 else "phantom"
        for c, (title, region, acq, plane) in enumerate(COLUMNS):
            seed = args.seed * 1000 + r * 37 + c
            s = generate_sample(seed, source=source, pam50_dir=args.pam50, region=region, contrast=contrast,
                                acquisition=acq)
            _panel(axes[r, c], s, plane)
            vox = "x".join(f"{v:.1f}" for v in s.spacing)
            axes[r, c].set_title(f"{title}\n{contrast} {s.meta['source']} {vox} mm", fontsize=7)
    fig.suptitle("conus synthetic training data (red: cord truth, yellow +: conus tip)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
