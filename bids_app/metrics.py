"""Segmentation metrics (pure numpy/scipy): overlap, volumes, surface distances, cord extents.

Conventions
-----------
* Masks are any arrays; non-zero means inside. ``pred`` and ``ref`` must share one grid.
* Distances and volumes use the grid's affine (native grid) or spacing (working grid): voxel
  volume is ``|det(affine[:3, :3])|``, distance transforms use the voxel sizes (column norms).
* Empty masks (chosen so that agreeing on "no cord" is a perfect score and anything undefined is NaN):

  ==========================  ==========  ===============  ===============
  metric                      both empty  only ref empty   only pred empty
  ==========================  ==========  ===============  ===============
  dice                        1.0         0.0              0.0
  precision                   1.0         0.0              NaN
  recall                      1.0         NaN              0.0
  rel_volume_diff             0.0         NaN              -1.0
  hd95_mm                     0.0         NaN              NaN
  extent errors               NaN         NaN              NaN
  ==========================  ==========  ===============  ===============

* HD95 is the symmetric 95 % Hausdorff distance: the larger of the two directed 95th percentiles
  of surface-to-surface distances (surface = voxels of the mask with a 6-neighbour outside it).
* Extent errors are signed, ``pred - ref`` along the superior (S) direction in mm, measured on
  voxel centres: ``inferior_extent_error_mm > 0`` means the prediction stops above the true
  lower end of the cord (it misses the conus); ``superior_extent_error_mm < 0`` means it stops
  below the true upper end.

NaN values are not valid JSON; :func:`json_safe` turns them into ``None``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

_SIX = ndimage.generate_binary_structure(3, 1)


def _bool(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask) != 0


def _check_same_shape(pred: np.ndarray, ref: np.ndarray) -> None:
    if np.shape(pred) != np.shape(ref):
        raise ValueError(f"pred {np.shape(pred)} and ref {np.shape(ref)} are not on the same grid")


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel (mm^3) of a grid with this 4x4 affine."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) of the three array axes (column norms of the affine)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((linear**2).sum(axis=0)))  # type: ignore[return-value]


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient 2|P&R| / (|P| + |R|); 1.0 when both are empty."""
    _check_same_shape(pred, ref)
    p, r = _bool(pred), _bool(ref)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / total


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """|P&R| / |P|; 1.0 when both are empty, NaN when only the prediction is empty."""
    _check_same_shape(pred, ref)
    p, r = _bool(pred), _bool(ref)
    n_pred = int(p.sum())
    if n_pred == 0:
        return 1.0 if not r.any() else math.nan
    return int(np.logical_and(p, r).sum()) / n_pred


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """|P&R| / |R| (sensitivity); 1.0 when both are empty, NaN when only the reference is empty."""
    _check_same_shape(pred, ref)
    p, r = _bool(pred), _bool(ref)
    n_ref = int(r.sum())
    if n_ref == 0:
        return 1.0 if not p.any() else math.nan
    return int(np.logical_and(p, r).sum()) / n_ref


def volume_mm3(mask: np.ndarray, affine_or_spacing) -> float:
    """Volume of the mask in mm^3; accepts a 4x4 affine or a spacing triple."""
    arr = np.asarray(affine_or_spacing, dtype=np.float64)
    unit = voxel_volume_mm3(arr) if arr.shape == (4, 4) else float(np.prod(arr))
    return int(_bool(mask).sum()) * unit


def relative_volume_difference(vol_pred: float, vol_ref: float) -> float:
    """(V_pred - V_ref) / V_ref; 0.0 when both are 0, NaN when only the reference is empty."""
    if vol_ref == 0:
        return 0.0 if vol_pred == 0 else math.nan
    return (vol_pred - vol_ref) / vol_ref


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: inside voxels with at least one 6-neighbour outside (array edges count as outside)."""
    m = _bool(mask)
    if m.ndim == 2:
        structure = ndimage.generate_binary_structure(2, 1)
    else:
        structure = _SIX
    return m & ~ndimage.binary_erosion(m, structure=structure, border_value=0)


def directed_surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from every surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    surf_a, surf_b = surface(a), surface(b)
    dist_to_b = ndimage.distance_transform_edt(~surf_b, sampling=spacing)
    return dist_to_b[surf_a]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """Symmetric 95 % Hausdorff distance (mm); 0.0 when both are empty, NaN when one is."""
    _check_same_shape(pred, ref)
    p, r = _bool(pred), _bool(ref)
    if not p.any() and not r.any():
        return 0.0
    if not p.any() or not r.any():
        return math.nan
    spacing = tuple(float(s) for s in spacing)
    d_pr = directed_surface_distances(p, r, spacing)
    d_rp = directed_surface_distances(r, p, spacing)
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def si_coordinates_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Scanner S coordinate (mm) of every voxel centre inside the mask."""
    idx = np.nonzero(_bool(mask))
    row = np.asarray(affine, dtype=np.float64)[2]
    return row[0] * idx[0] + row[1] * idx[1] + row[2] * idx[2] + row[3]


def extent_errors_mm(pred: np.ndarray, ref: np.ndarray, affine: np.ndarray) -> tuple[float, float]:
    """(superior, inferior) extent errors in mm, signed ``pred - ref`` along S; NaN if either is empty."""
    _check_same_shape(pred, ref)
    zp, zr = si_coordinates_mm(pred, affine), si_coordinates_mm(ref, affine)
    if zp.size == 0 or zr.size == 0:
        return math.nan, math.nan
    return float(zp.max() - zr.max()), float(zp.min() - zr.min())


def point_distance_mm(a_mm, b_mm) -> float:
    """Euclidean distance (mm) between two points; NaN when either is None."""
    if a_mm is None or b_mm is None:
        return math.nan
    return float(np.linalg.norm(np.asarray(a_mm, dtype=np.float64) - np.asarray(b_mm, dtype=np.float64)))


def dice_in_region(pred: np.ndarray, ref: np.ndarray, region: np.ndarray) -> float:
    """Dice restricted to a region mask (e.g. the lumbosacral cord); 1.0 when both are empty there."""
    _check_same_shape(pred, region)
    reg = _bool(region)
    return dice(_bool(pred) & reg, _bool(ref) & reg)


def compute_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    affine: np.ndarray,
    conus_tip_pred_mm=None,
    conus_tip_ref_mm=None,
    region_masks: dict[str, np.ndarray] | None = None,
) -> dict:
    """All run-level metrics of ``pred`` against ``ref`` on one grid (the native grid and its affine).

    Keys: dice, precision, recall, volume_pred_mm3, volume_ref_mm3, rel_volume_diff, hd95_mm,
    superior_extent_error_mm, inferior_extent_error_mm, conus_tip_error_mm, n_voxels_pred,
    n_voxels_ref, and ``dice_<name>`` for each region mask. See the module docstring for
    empty-mask conventions and signs.
    """
    _check_same_shape(pred, ref)
    p, r = _bool(pred), _bool(ref)
    v_pred, v_ref = volume_mm3(p, affine), volume_mm3(r, affine)
    sup_err, inf_err = extent_errors_mm(p, r, affine)
    out = {
        "dice": dice(p, r),
        "precision": precision(p, r),
        "recall": recall(p, r),
        "volume_pred_mm3": v_pred,
        "volume_ref_mm3": v_ref,
        "rel_volume_diff": relative_volume_difference(v_pred, v_ref),
        "hd95_mm": hd95(p, r, spacing_from_affine(affine)),
        "superior_extent_error_mm": sup_err,
        "inferior_extent_error_mm": inf_err,
        "conus_tip_error_mm": point_distance_mm(conus_tip_pred_mm, conus_tip_ref_mm),
        "n_voxels_pred": int(p.sum()),
        "n_voxels_ref": int(r.sum()),
    }
    for name, region in (region_masks or {}).items():
        out[f"dice_{name}"] = dice_in_region(p, r, region)
    return out


def per_slice_metrics(pred_work: np.ndarray, ref_work: np.ndarray, spacing) -> list[dict]:
    """Metrics per axial plane ``[:, :, k]`` of the working (RAS) grid, inferior to superior.

    Only planes where the prediction or the reference is non-empty are listed. Keys: slice,
    z_mm (k * sz, from the bottom of the working grid), dice, precision, recall, area_pred_mm2,
    area_ref_mm2.
    """
    _check_same_shape(pred_work, ref_work)
    p, r = _bool(pred_work), _bool(ref_work)
    sx, sy, sz = (float(s) for s in spacing)
    n_pred = p.sum(axis=(0, 1))
    n_ref = r.sum(axis=(0, 1))
    n_both = np.logical_and(p, r).sum(axis=(0, 1))
    rows = []
    for k in np.nonzero((n_pred + n_ref) > 0)[0]:
        tp, npred, nref = int(n_both[k]), int(n_pred[k]), int(n_ref[k])
        rows.append(
            {
                "slice": int(k),
                "z_mm": float(k * sz),
                "dice": 2.0 * tp / (npred + nref),
                "precision": tp / npred if npred else math.nan,
                "recall": tp / nref if nref else math.nan,
                "area_pred_mm2": npred * sx * sy,
                "area_ref_mm2": nref * sx * sy,
            }
        )
    return rows


def json_safe(value):
    """Recursively replace NaN/inf floats with None and numpy scalars with Python ones (for JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
