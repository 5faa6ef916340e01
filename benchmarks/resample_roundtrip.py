"""Ceiling of the resampling round trip: Dice of a phantom cord after native -> model spacing -> native.

The pipeline segments on the model's grid (0.5 x 0.5 x 1 mm by default) and brings probabilities
back to the native grid before thresholding. Even a perfect segmentation on the model grid loses
what this round trip loses, so these numbers are the ceiling of native-grid Dice per acquisition.

The phantom is an elliptic cord (RL 10 mm x AP 7 mm, tilted 20 degrees in the sagittal plane)
rasterised on the native grid of each acquisition; voxels are rotated with respect to the scanner
for the oblique case. Both a linear (probability-like) and a nearest-neighbour round trip are shown,
and the Dice of a perfect segmentation made on the model grid once brought back to the native grid.

Usage: python benchmarks/resample_roundtrip.py [--model-spacing 0.5 0.5 1.0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bids_app.geometry import apply_affine, grid_for_spacing, reorientation_for, resample, resample_to_grid

# name: (native zooms, native field of view in mm, axis codes of the native array, oblique degrees)
ACQUISITIONS = {
    "iso 1.0 mm (RAS)": ((1.0, 1.0, 1.0), (40, 40, 80), "RAS", 0.0),
    "sagittal 1x1 in-plane, 3.5 mm thick (PSR)": ((3.5, 1.0, 1.0), (40, 40, 80), "PSR", 0.0),
    "sagittal 0.8 mm iso (PSR)": ((0.8, 0.8, 0.8), (40, 40, 80), "PSR", 0.0),
    "axial 0.5x0.5 in-plane, 7.5 mm thick": ((0.5, 0.5, 7.5), (40, 40, 90), "RAS", 0.0),
    "axial 0.3x0.3 in-plane, 3 mm thick": ((0.3, 0.3, 3.0), (30, 30, 60), "RAS", 0.0),
    "oblique 15 deg, 0.9x0.9x0.9 mm": ((0.9, 0.9, 0.9), (40, 40, 80), "RAS", 15.0),
    "coarse 2 mm iso": ((2.0, 2.0, 2.0), (40, 40, 80), "RAS", 0.0),
}

AXIS_VECTORS = {
    "R": (1, 0, 0),
    "L": (-1, 0, 0),
    "A": (0, 1, 0),
    "P": (0, -1, 0),
    "S": (0, 0, 1),
    "I": (0, 0, -1),
}


def native_grid(zooms_ras, fov_mm, codes: str, oblique_deg: float):
    """Shape and affine of a native grid whose array axes follow ``codes``; zooms given in R, A, S order."""
    directions = np.array(
        [AXIS_VECTORS[c] for c in codes], dtype=float
    ).T  # columns: world direction per axis
    world_axis = [int(np.argmax(np.abs(directions[:, i]))) for i in range(3)]
    zooms = np.array([zooms_ras[a] for a in world_axis])
    shape = tuple(int(round(fov_mm[a] / z)) for a, z in zip(world_axis, zooms, strict=True))
    theta = np.deg2rad(oblique_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ directions @ np.diag(zooms)
    affine[:3, 3] = -apply_affine(affine, (np.asarray(shape) - 1) / 2.0)  # field of view centred on 0
    return shape, affine


def cord_phantom(shape, affine, tilt_deg: float = 20.0) -> np.ndarray:
    """Elliptic tube (semi-axes 5 mm RL, 3.5 mm AP) through the origin, tilted in the y-z plane."""
    mm = apply_affine(affine, np.indices(shape).reshape(3, -1).T)
    t = np.deg2rad(tilt_deg)
    axis = np.array([0.0, np.sin(t), np.cos(t)])
    along = mm @ axis
    radial = mm - along[:, None] * axis
    ap_dir = np.array([0.0, np.cos(t), -np.sin(t)])
    x, y = radial[:, 0], radial @ ap_dir
    return ((x / 5.0) ** 2 + (y / 3.5) ** 2 <= 1.0).reshape(shape).astype(np.uint8)


def round_trip(mask, affine, model_spacing, order: int) -> np.ndarray:
    """native -> RAS -> model spacing -> RAS -> native -> threshold 0.5."""
    reo = reorientation_for(affine, mask.shape)
    work = reo.to_working(mask.astype(np.float32))
    model, model_aff = resample(work, reo.working_affine, model_spacing, order=order)
    back = resample_to_grid(model, model_aff, reo.working_shape, reo.working_affine, order=order)
    return (reo.to_native(back) > 0.5).astype(np.uint8)


def perfect_model_grid_mask(mask, affine, model_spacing) -> np.ndarray:
    """The phantom rasterised directly on the model grid (a perfect segmentation there), brought
    back to the native grid with linear interpolation and thresholded: the pipeline's true ceiling."""
    reo = reorientation_for(affine, mask.shape)
    model_shape, model_aff = grid_for_spacing(reo.working_shape, reo.working_affine, model_spacing)
    truth_on_model = cord_phantom(model_shape, model_aff).astype(np.float32)
    back = resample_to_grid(truth_on_model, model_aff, reo.working_shape, reo.working_affine, order=1)
    return (reo.to_native(back) > 0.5).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(1, int(a.sum()) + int(b.sum())))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-spacing", type=float, nargs=3, default=(0.5, 0.5, 1.0))
    args = parser.parse_args(argv)
    print(f"model spacing {tuple(args.model_spacing)} mm; Dice after native -> model -> native")
    print("columns: round trip of the native mask (linear, nearest); a perfect mask drawn on the model grid")
    print("brought to the native grid (perfect); seconds for the two round trips")
    print(
        f"{'acquisition':45s} {'shape':>14s} {'linear':>8s} {'nearest':>8s} {'perfect':>8s} {'seconds':>8s}"
    )
    for name, (zooms, fov, codes, oblique) in ACQUISITIONS.items():
        shape, affine = native_grid(zooms, fov, codes, oblique)
        mask = cord_phantom(shape, affine)
        start = time.perf_counter()
        linear = dice(mask, round_trip(mask, affine, args.model_spacing, order=1))
        nearest = dice(mask, round_trip(mask, affine, args.model_spacing, order=0))
        seconds = time.perf_counter() - start
        perfect = dice(mask, perfect_model_grid_mask(mask, affine, args.model_spacing))
        print(f"{name:45s} {str(shape):>14s} {linear:8.4f} {nearest:8.4f} {perfect:8.4f} {seconds:8.2f}")


if __name__ == "__main__":
    main()
