"""Cord morphometry per axial slice along the centerline (pure numpy).

For each axial plane ``mask[:, :, k]`` of the working RAS grid that holds cord voxels:

* ``angle_deg``: angle between the centerline tangent and the S axis at that slice;
* ``csa_mm2``: angle-corrected cross-sectional area = axial area x cos(angle) (as SCT does);
* ``rl_diameter_mm`` (width) and ``ap_diameter_mm`` (thickness): the voxel centres of the slice
  are projected along the tangent onto the plane perpendicular to the centerline, and the second
  moments of that section (with each voxel's own extent) give the diameters of the ellipse with
  the same moments along the plane's right-left axis ``u`` (R projected on the plane) and its
  anterior-posterior axis ``v = t x u``: ``diameter = 4 sqrt(variance)`` (exact for an ellipse);
* ``major_axis_mm``/``minor_axis_mm`` and ``eccentricity`` = sqrt(1 - (minor/major)^2) from the
  principal moments.

Centerline points are (N, 3) working voxel coordinates ordered inferior -> superior; without a
centerline, the per-slice centroids of the mask are used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

#: Half length (mm along S) of the window used to estimate the centerline tangent at a slice.
TANGENT_HALF_WINDOW_MM = 5.0


def centerline_length_mm(points_vox: np.ndarray, spacing) -> float:
    """Length (mm) of the polyline through the centerline points."""
    pts = np.asarray(points_vox, dtype=np.float64).reshape(-1, 3) * np.asarray(spacing, dtype=np.float64)
    if len(pts) < 2:
        return 0.0
    return float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum())


def centroids_by_slice(mask_work: np.ndarray) -> np.ndarray:
    """(M, 3) voxel centroids of the non-empty axial slices, inferior -> superior."""
    m = np.asarray(mask_work) != 0
    rows = []
    for k in np.nonzero(m.any(axis=(0, 1)))[0]:
        xs, ys = np.nonzero(m[:, :, k])
        rows.append((xs.mean(), ys.mean(), float(k)))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def centerline_at_slices(
    points_vox: np.ndarray, spacing, slices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Centerline position (voxels) and unit tangent (mm space) at the given axial slice indices.

    Positions are interpolated linearly in z (clamped at the ends). The tangent is the slope of a
    least-squares line x(z), y(z) over the points within +/- 5 mm of the slice (at least the
    two nearest points), so that voxel-step noise does not tilt it.
    """
    pts = np.asarray(points_vox, dtype=np.float64).reshape(-1, 3)
    spacing = np.asarray(spacing, dtype=np.float64)
    order = np.argsort(pts[:, 2], kind="stable")
    pts = pts[order]
    z_mm = pts[:, 2] * spacing[2]
    pos = np.zeros((len(slices), 3))
    tangents = np.zeros((len(slices), 3))
    for i, k in enumerate(np.asarray(slices, dtype=np.float64)):
        pos[i] = [np.interp(k, pts[:, 2], pts[:, 0]), np.interp(k, pts[:, 2], pts[:, 1]), k]
        tangents[i] = _tangent_near(pts * spacing, z_mm, k * spacing[2])
    return pos, tangents


def _tangent_near(pts_mm: np.ndarray, z_mm: np.ndarray, z0: float) -> np.ndarray:
    """Unit tangent (pointing superior) of the curve near height ``z0`` (mm)."""
    if len(pts_mm) < 2:
        return np.array([0.0, 0.0, 1.0])
    near = np.abs(z_mm - z0) <= TANGENT_HALF_WINDOW_MM
    if near.sum() < 2 or np.ptp(z_mm[near]) == 0:  # sparse points or beyond the ends: 3 nearest points
        near = np.zeros(len(z_mm), bool)
        near[np.argsort(np.abs(z_mm - z0), kind="stable")[:3]] = True
    zs = z_mm[near]
    if np.ptp(zs) == 0:
        return np.array([0.0, 0.0, 1.0])
    dx = np.polyfit(zs, pts_mm[near, 0], 1)[0]
    dy = np.polyfit(zs, pts_mm[near, 1], 1)[0]
    t = np.array([dx, dy, 1.0])
    return t / np.linalg.norm(t)


def _section_moments(xy_mm: np.ndarray, tangent: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """2x2 covariance (mm^2) of the slice's voxels projected on the plane perpendicular to the tangent,
    in the basis (u = R projected, v = t x u), and that basis as a (2, 3) array."""
    t = tangent / np.linalg.norm(tangent)
    u = np.array([1.0, 0.0, 0.0]) - t[0] * t
    u /= np.linalg.norm(u)
    v = np.cross(t, u)
    basis = np.stack([u, v])
    points = np.column_stack([xy_mm, np.zeros(len(xy_mm))])
    centred = points - points.mean(axis=0)
    # projecting along t onto the plane = dropping the t component; coordinates in (u, v)
    coords = centred @ basis.T
    cov = np.cov(coords.T, bias=True) if len(coords) > 1 else np.zeros((2, 2))
    # each voxel is a sx x sy rectangle in the axial plane, not a point: add its own second moment
    sx, sy = float(spacing[0]), float(spacing[1])
    voxel_cov_3d = np.diag([sx**2 / 12.0, sy**2 / 12.0, 0.0])
    cov = cov + basis @ voxel_cov_3d @ basis.T
    return cov, basis


def slice_morphometry(section: np.ndarray, spacing, tangent: np.ndarray) -> dict:
    """Morphometry of one axial section (2-D boolean) given the centerline tangent there (mm space)."""
    sx, sy = float(spacing[0]), float(spacing[1])
    xs, ys = np.nonzero(section)
    xy_mm = np.column_stack([xs * sx, ys * sy]).astype(np.float64)
    t = np.asarray(tangent, dtype=np.float64)
    cos_angle = abs(t[2]) / np.linalg.norm(t)
    cov, _ = _section_moments(xy_mm, t, spacing)
    eig = np.sort(np.linalg.eigvalsh(cov))[::-1]
    major, minor = 4.0 * math.sqrt(max(eig[0], 0.0)), 4.0 * math.sqrt(max(eig[1], 0.0))
    area_axial = len(xs) * sx * sy
    return {
        "angle_deg": float(np.degrees(np.arccos(np.clip(cos_angle, -1.0, 1.0)))),
        "area_axial_mm2": float(area_axial),
        "csa_mm2": float(area_axial * cos_angle),
        "rl_diameter_mm": float(4.0 * math.sqrt(max(cov[0, 0], 0.0))),
        "ap_diameter_mm": float(4.0 * math.sqrt(max(cov[1, 1], 0.0))),
        "major_axis_mm": float(major),
        "minor_axis_mm": float(minor),
        "eccentricity": float(math.sqrt(max(0.0, 1.0 - (minor / major) ** 2))) if major > 0 else math.nan,
    }


def cord_morphometry(
    mask_work: np.ndarray, spacing, centerline_points_vox: np.ndarray | None = None
) -> list[dict]:
    """Per-slice morphometry of the cord mask on the working grid (one row per non-empty axial slice).

    Row keys: slice, x_vox, y_vox (centerline position), distance_mm (arc length along the
    centerline from the lowest measured slice), angle_deg, area_axial_mm2, csa_mm2,
    rl_diameter_mm, ap_diameter_mm, major_axis_mm, minor_axis_mm, eccentricity.
    """
    m = np.asarray(mask_work) != 0
    spacing = np.asarray(spacing, dtype=np.float64)
    slices = np.nonzero(m.any(axis=(0, 1)))[0]
    if slices.size == 0:
        return []
    points = centroids_by_slice(m) if centerline_points_vox is None else np.asarray(centerline_points_vox)
    if len(points) == 0:
        points = centroids_by_slice(m)
    pos, tangents = centerline_at_slices(points, spacing, slices)
    steps = np.linalg.norm(np.diff(pos * spacing, axis=0), axis=1)
    distance = np.concatenate([[0.0], np.cumsum(steps)])
    rows = []
    for i, k in enumerate(slices):
        row = {
            "slice": int(k),
            "x_vox": float(pos[i, 0]),
            "y_vox": float(pos[i, 1]),
            "distance_mm": float(distance[i]),
        }
        row.update(slice_morphometry(m[:, :, k], spacing, tangents[i]))
        rows.append(row)
    return rows


SUMMARY_KEYS = ("csa_mm2", "ap_diameter_mm", "rl_diameter_mm", "eccentricity", "angle_deg")


def summarise_by_level(
    rows: list[dict], levels: Mapping[int, str | None] | Sequence[str | None]
) -> list[dict]:
    """Aggregate per-slice rows by vertebral level.

    ``levels`` gives the level name of each working axial slice, either as a mapping
    ``slice -> name`` or a sequence indexed by slice (None = unknown, skipped). Returns one row
    per level in the order met from inferior to superior: level, n_slices, slice_min, slice_max,
    length_mm (distance along the centerline between the level's first and last slice centres),
    and mean/std of
    csa_mm2, ap_diameter_mm, rl_diameter_mm, eccentricity and angle_deg.
    """

    def level_of(k: int) -> str | None:
        if isinstance(levels, Mapping):
            return levels.get(k)
        return levels[k] if 0 <= k < len(levels) else None

    groups: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["slice"]):
        name = level_of(int(row["slice"]))
        if name is not None:
            groups.setdefault(str(name), []).append(row)
    summary = []
    for name, group in groups.items():
        out = {
            "level": name,
            "n_slices": len(group),
            "slice_min": min(r["slice"] for r in group),
            "slice_max": max(r["slice"] for r in group),
            "length_mm": float(group[-1]["distance_mm"] - group[0]["distance_mm"]),
        }
        for key in SUMMARY_KEYS:
            values = np.array([r[key] for r in group], dtype=np.float64)
            out[f"{key}_mean"] = float(np.nanmean(values)) if np.any(np.isfinite(values)) else math.nan
            out[f"{key}_std"] = float(np.nanstd(values)) if np.any(np.isfinite(values)) else math.nan
        summary.append(out)
    return summary
