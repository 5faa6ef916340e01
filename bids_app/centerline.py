"""Spinal cord centerline: global fit of a cord heatmap, reference/file modes, conus tip.

Pure numpy/scipy. All arrays live on the RAS *working grid* (see docs/ARCHITECTURE.md):
axis 0 = x (L->R), axis 1 = y (P->A), axis 2 = z (I->S), axial plane ``vol[:, :, k]``.

Geometry is done in "grid millimetres" (voxel index times spacing), so that distances and
slopes are physical; points are converted to scanner millimetres with the working affine.

Assumption (documented, as in SCT's OptiC and most spine tools): on the working grid the cord
runs mostly inferior->superior, i.e. the centerline is a function ``(x, y) = f(z)`` with an
in-plane slope of at most ``max_slope`` mm per mm of z (56 degrees from the S-I axis by
default). Lordosis/kyphosis in spine scans stays well within that; a cord lying almost in an
axial plane is not supported.

Automatic mode (:func:`fit_centerline`):

1. per axial slice, candidates = connected components of ``heatmap >= min_prob``, each with
   its probability-weighted centroid and its *mass* (sum of probabilities times pixel area,
   in mm^2, capped at a physiological cross-section; blobs far larger than any cord, such as
   an organ, are not candidates);
2. the cord's cross-sectional level ``M`` = a high percentile of the per-slice best mass; a
   candidate's evidence is ``min(mass / M, 1)``, so thin weak structures (cauda equina roots,
   filum terminale, noise) have little evidence;
3. dynamic programming (best-scoring contiguous segment, Smith-Waterman style) across slices:
   each slice on the path gains ``evidence - tau`` (skipped slices of a short gap gain
   ``-tau``), each step pays ``jump_weight * slope^2`` per slice and is forbidden above
   ``max_slope``. The best segment is the cord's S-I extent, chosen globally, so the path
   neither jumps to bright blobs off the cord nor runs on into the cauda equina;
4. second pass: each chosen slice's centroid is recomputed from the heatmap above half the
   cord level within a disc around the first fit (ignores roots and touching blobs), then a
   penalised cubic smoothing spline ``x(z), y(z)``;
5. both ends are refined along the curve (extrapolated along its end direction, at most
   ``max_end_extension_mm`` beyond the path) to where the in-plane max-filtered heatmap falls
   below half the local cord level and stays below it; the slices gained (the conus taper)
   join the fit, and the ends are refined again. The inferior end is the conus tip unless the
   heatmap is still high at the image edge (the cord leaves the view);
6. resampling at ~1 mm arc length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.interpolate import make_interp_spline, make_smoothing_spline

from bids_app.errors import BadDataError, InputMissingError

__all__ = [
    "Centerline",
    "CenterlineError",
    "centerline_error_mm",
    "centerline_from_file",
    "centerline_from_mask",
    "centerline_to_grid",
    "centerline_to_mask",
    "centerline_to_tsv",
    "fit_centerline",
]

# Physiological bounds of the cord's cross-section (mm^2), used to make the evidence scale robust.
_MIN_CORD_AREA_MM2 = 8.0
_MAX_CORD_AREA_MM2 = 150.0


def _spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) from the columns of a 4x4 affine."""
    z = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    return float(z[0]), float(z[1]), float(z[2])


def _vox_to_mm(affine: np.ndarray, vox: np.ndarray) -> np.ndarray:
    """(N, 3) voxel coordinates -> (N, 3) scanner mm."""
    vox = np.asarray(vox, float).reshape(-1, 3)
    return vox @ affine[:3, :3].T + affine[:3, 3]


def _mm_to_vox(affine: np.ndarray, mm: np.ndarray) -> np.ndarray:
    """(N, 3) scanner mm -> (N, 3) continuous voxel coordinates."""
    inv = np.linalg.inv(np.asarray(affine, float))
    mm = np.asarray(mm, float).reshape(-1, 3)
    return mm @ inv[:3, :3].T + inv[:3, 3]


def _frozen(arr: np.ndarray | None) -> np.ndarray | None:
    if arr is None:
        return None
    out = np.array(arr, dtype=float, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class Centerline:
    """A cord centerline on the working grid.

    Attributes:
        points_vox: (N, 3) working-grid voxel coordinates, ordered inferior -> superior,
            about 1 mm apart along the curve (empty (0, 3) when ``found`` is False).
        points_mm: (N, 3) scanner RAS mm (``affine`` applied to ``points_vox``).
        affine: 4x4 working-grid affine.
        spacing: working-grid voxel sizes (sx, sy, sz) in mm.
        found: whether a cord was found.
        conus_tip_vox / conus_tip_mm: the cord's inferior end when it lies inside the field of
            view, else None.
        confidence: (N,) heatmap evidence in [0, 1] at each point (1 for reference/file modes,
            0 for extrapolated points).
        inferior_end_at_edge / superior_end_at_edge: the cord leaves the field of view there.
        source: "auto", "reference" or "file".
    """

    points_vox: np.ndarray
    points_mm: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    found: bool
    conus_tip_vox: np.ndarray | None = None
    conus_tip_mm: np.ndarray | None = None
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))
    inferior_end_at_edge: bool = False
    superior_end_at_edge: bool = False
    source: str = "auto"

    def __post_init__(self) -> None:
        for name in ("points_vox", "points_mm", "affine", "conus_tip_vox", "conus_tip_mm", "confidence"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))

    @classmethod
    def empty(cls, affine: np.ndarray, spacing=None, source: str = "auto") -> Centerline:
        """A 'no cord in view' centerline."""
        spacing = _spacing_from_affine(affine) if spacing is None else spacing
        return cls(np.zeros((0, 3)), np.zeros((0, 3)), np.asarray(affine, float), spacing, False,
                   confidence=np.zeros(0), source=source)

    @property
    def length_mm(self) -> float:
        """Length of the curve in scanner mm."""
        if len(self.points_mm) < 2:
            return 0.0
        return float(np.linalg.norm(np.diff(self.points_mm, axis=0), axis=1).sum())

    @property
    def mean_confidence(self) -> float:
        """Overall confidence: mean of the per-point confidence (0 when not found)."""
        return float(self.confidence.mean()) if len(self.confidence) else 0.0


# --------------------------------------------------------------------------------------------
# curve fitting helpers
# --------------------------------------------------------------------------------------------


class _Curve:
    """Smoothing spline ``(x, y) = f(z)`` in grid mm, extrapolated linearly outside its data.

    A penalised cubic smoothing spline (``scipy.interpolate.make_smoothing_spline``) whose
    regularisation is set from ``smoothing``: the wavelength (mm along z) at which the fit
    passes half of a sinusoidal wiggle. Shorter wiggles (noise) are removed, longer ones
    (lordosis, scoliosis) are kept. With fewer than 5 distinct heights the points are
    interpolated (cubic, quadratic or linear).
    """

    def __init__(self, z: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray | None,
                 smoothing: float):
        z, x, y = (np.asarray(a, float) for a in (z, x, y))
        w = np.ones_like(z) if w is None else np.asarray(w, float)
        # merge points that share a height (the spline needs strictly increasing abscissae)
        zu, inv = np.unique(np.round(z, 6), return_inverse=True)
        wsum = np.bincount(inv, weights=w)
        xy = np.stack([np.bincount(inv, weights=w * x) / wsum, np.bincount(inv, weights=w * y) / wsum], 1)
        wu = wsum / np.bincount(inv)
        wu = wu / wu.mean()
        self.z0, self.z1 = float(zu[0]), float(zu[-1])
        n = len(zu)
        if n == 1:
            self._f = None
            self._const = xy[0]
            self._d0 = self._d1 = np.zeros(2)
            return
        if n >= 5 and smoothing > 0:
            dz = (self.z1 - self.z0) / (n - 1)          # mean distance between data heights
            lam = (smoothing / (2 * np.pi)) ** 4 / dz    # half-power cut-off at that wavelength
            self._f = make_smoothing_spline(zu, xy, w=wu, lam=lam)
        else:
            self._f = make_interp_spline(zu, xy, k=3 if n >= 4 else 1)
        self._d0 = self._end_slope(self.z0, +1.0)
        self._d1 = self._end_slope(self.z1, -1.0)

    def _end_slope(self, z_end: float, inward: float) -> np.ndarray:
        """Mean in-plane slope (mm per mm of z) over the last 10 mm of data."""
        span = min(10.0, self.z1 - self.z0)
        za, zb = sorted((z_end, z_end + inward * span))
        return (self._f(zb) - self._f(za)) / (zb - za)

    def __call__(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = np.atleast_1d(np.asarray(z, float))
        if self._f is None:
            return np.full_like(z, self._const[0]), np.full_like(z, self._const[1])
        xy = np.asarray(self._f(np.clip(z, self.z0, self.z1)), float).reshape(-1, 2).copy()
        lo, hi = z < self.z0, z > self.z1
        xy[lo] += (z[lo] - self.z0)[:, None] * self._d0[None]
        xy[hi] += (z[hi] - self.z1)[:, None] * self._d1[None]
        return xy[:, 0], xy[:, 1]


def _resample_curve(curve: _Curve, z_lo: float, z_hi: float, step_mm: float) -> np.ndarray:
    """Points (grid mm) every ~``step_mm`` of arc length from z_lo to z_hi (inferior first)."""
    if z_hi - z_lo < 1e-6:
        x, y = curve(np.array([z_lo]))
        return np.array([[x[0], y[0], z_lo]])
    zd = np.linspace(z_lo, z_hi, max(2, int(np.ceil((z_hi - z_lo) / 0.1)) + 1))
    xd, yd = curve(zd)
    pts = np.stack([xd, yd, zd], axis=1)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    n = max(2, int(round(arc[-1] / step_mm)) + 1)
    s = np.linspace(0.0, arc[-1], n)
    return np.stack([np.interp(s, arc, pts[:, i]) for i in range(3)], axis=1)


def _make_centerline(curve: _Curve, z_lo: float, z_hi: float, affine: np.ndarray,
                     spacing: tuple[float, float, float], *, inferior_at_edge: bool,
                     superior_at_edge: bool, source: str, step_mm: float,
                     confidence_map: np.ndarray | None = None) -> Centerline:
    """Resample a fitted curve and package it as a :class:`Centerline`."""
    sp = np.asarray(spacing, float)
    grid = _resample_curve(curve, z_lo, z_hi, step_mm)
    vox = grid / sp
    mm = _vox_to_mm(affine, vox)
    if confidence_map is None:
        conf = np.ones(len(vox))
    else:
        conf = np.clip(ndimage.map_coordinates(confidence_map, vox.T, order=1, mode="nearest"), 0, 1)
    tip_vox = None if inferior_at_edge else vox[0]
    tip_mm = None if inferior_at_edge else mm[0]
    return Centerline(vox, mm, np.asarray(affine, float), tuple(sp), True, tip_vox, tip_mm, conf,
                      inferior_at_edge, superior_at_edge, source)


# --------------------------------------------------------------------------------------------
# automatic mode
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidates:
    """Per-slice blob candidates (flat arrays, grid mm)."""

    k: np.ndarray      # slice index
    x: np.ndarray
    y: np.ndarray
    mass: np.ndarray   # sum(prob) * pixel area, mm^2, capped
    peak: np.ndarray


def _slice_candidates(heatmap: np.ndarray, spacing, min_prob: float, max_per_slice: int) -> _Candidates:
    """Connected components of ``heatmap >= min_prob`` in every axial slice.

    Blobs much larger than any cord cross-section (over ``2 * _MAX_CORD_AREA_MM2``) are not
    candidates: such a slice becomes a gap that the path may bridge.
    """
    sx, sy, _ = spacing
    ks, xs, ys, ms, ps = [], [], [], [], []
    above = heatmap >= min_prob
    struct = ndimage.generate_binary_structure(2, 2)
    for k in np.flatnonzero(above.any(axis=(0, 1))):
        sl = heatmap[:, :, k]
        lab, n = ndimage.label(above[:, :, k], structure=struct)
        idx = np.arange(1, n + 1)
        w = ndimage.sum_labels(sl, lab, idx)
        cx = ndimage.sum_labels(sl * np.arange(sl.shape[0])[:, None], lab, idx) / w
        cy = ndimage.sum_labels(sl * np.arange(sl.shape[1])[None, :], lab, idx) / w
        peak = ndimage.maximum(sl, lab, idx)
        area = np.bincount(lab.ravel(), minlength=n + 1)[1:] * sx * sy
        mass = np.minimum(w * sx * sy, _MAX_CORD_AREA_MM2)
        order = np.argsort(-mass, kind="stable")
        keep = order[area[order] <= 2 * _MAX_CORD_AREA_MM2][:max_per_slice]
        ks.append(np.full(len(keep), k))
        xs.append(cx[keep] * sx)
        ys.append(cy[keep] * sy)
        ms.append(mass[keep])
        ps.append(np.asarray(peak)[keep])
    if not ks:
        e = np.zeros(0)
        return _Candidates(e.astype(int), e, e, e, e)
    return _Candidates(np.concatenate(ks), np.concatenate(xs), np.concatenate(ys),
                       np.concatenate(ms), np.concatenate(ps))


def _best_segment(c: _Candidates, evidence: np.ndarray, sz: float, *, tau: float, jump_weight: float,
                  max_slope: float, max_gap_slices: int) -> tuple[np.ndarray, float]:
    """Dynamic programming: best-scoring chain of candidates over contiguous slices.

    Returns (indices into the candidate arrays ordered inferior -> superior, score).
    """
    n = len(c.k)
    score = np.full(n, -np.inf)
    pred = np.full(n, -1)
    gain = evidence - tau
    slices = {int(k): np.flatnonzero(c.k == k) for k in np.unique(c.k)}
    for k, cur in slices.items():
        best = gain[cur].copy()          # starting a new segment here
        arg = np.full(len(cur), -1)
        for kp in range(k - 1, k - 2 - max_gap_slices, -1):
            prev = slices.get(kp)
            if prev is None:
                continue
            steps = k - kp
            d = np.hypot(c.x[cur][:, None] - c.x[prev][None, :], c.y[cur][:, None] - c.y[prev][None, :])
            slope = d / (steps * sz)
            val = (score[prev][None, :] - tau * (steps - 1) - jump_weight * slope**2 * steps)
            val = np.where(slope <= max_slope, val, -np.inf)
            j = np.argmax(val, axis=1)
            v = val[np.arange(len(cur)), j] + gain[cur]
            better = v > best
            best = np.where(better, v, best)
            arg = np.where(better, prev[j], arg)
        score[cur] = best
        pred[cur] = arg
    if n == 0:
        return np.zeros(0, int), 0.0
    end = int(np.argmax(score))
    chain = [end]
    while pred[chain[-1]] >= 0:
        chain.append(int(pred[chain[-1]]))
    return np.array(chain[::-1]), float(score[end])


def _disc_centroids(heatmap: np.ndarray, spacing, ks: np.ndarray, curve: _Curve, radius_mm: float,
                    floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroid of ``heatmap - floor`` (positive part) within a disc around the curve, per slice.

    Subtracting half the cord level ignores weak structures next to the cord (roots, noise).
    Slices without any such signal are dropped. Returns (k, x, y) with x, y in grid mm.
    """
    sx, sy, sz = spacing
    gx = np.arange(heatmap.shape[0])[:, None] * sx
    gy = np.arange(heatmap.shape[1])[None, :] * sy
    px, py = curve(ks * sz)
    out_k, out_x, out_y = [], [], []
    for k, cx, cy in zip(ks, px, py, strict=True):
        w = np.where((gx - cx) ** 2 + (gy - cy) ** 2 <= radius_mm**2, heatmap[:, :, k] - floor, 0.0)
        w = np.maximum(w, 0.0)
        tot = w.sum()
        if tot <= 0:
            continue
        out_k.append(k)
        out_x.append(float((w * gx).sum() / tot))
        out_y.append(float((w * gy).sum() / tot))
    return np.array(out_k, int), np.array(out_x), np.array(out_y)


def _refine_end(curve: _Curve, profile_map: np.ndarray, spacing, z_end: float, z_in: float,
                z_limit: float, level: float, persist_mm: float, max_ext_mm: float) -> tuple[float, bool]:
    """Walk along the curve from ``z_in`` (inside the cord) outwards, past the path's end
    ``z_end`` by at most ``max_ext_mm`` and never past ``z_limit`` (the image edge).

    Returns (z where the profile falls below ``level`` and stays below it for ``persist_mm``,
    whether the cord reaches the image edge instead).
    """
    sp = np.asarray(spacing, float)
    direction = np.sign(z_limit - z_in) or 1.0
    z_stop = z_limit if abs(z_limit - z_end) <= max_ext_mm else z_end + direction * max_ext_mm
    n = max(2, int(np.ceil(abs(z_stop - z_in) / 0.25)) + 1)
    z = np.linspace(z_in, z_stop, n)
    x, y = curve(z)
    vals = ndimage.map_coordinates(profile_map, (np.stack([x, y, z], 1) / sp).T, order=1, mode="nearest")
    high = vals >= level
    if not high.any():
        return z_end, False
    first = int(np.argmax(high))
    step = abs(z[1] - z[0])
    run = max(1, int(np.ceil(persist_mm / step)))
    for i in range(first + 1, n):
        if not high[i] and not high[i:i + run].any():
            t = (vals[i - 1] - level) / max(vals[i - 1] - vals[i], 1e-9)
            return float(z[i - 1] + t * (z[i] - z[i - 1])), False
    return float(z_stop), bool(z_stop == z_limit)


def fit_centerline(heatmap: np.ndarray, affine: np.ndarray, spacing=None, *, min_prob: float = 0.25,
                   tau: float = 0.25, max_slope: float = 1.5, jump_weight: float = 0.2,
                   max_gap_mm: float = 12.0, min_length_mm: float = 15.0, smoothing: float = 20.0,
                   max_end_extension_mm: float = 8.0, step_mm: float = 1.0,
                   max_per_slice: int = 6) -> Centerline:
    """Fit the cord centerline to a cord probability heatmap on the working grid (global fit).

    Args:
        heatmap: 3-D float array in [0, 1] on the RAS working grid (axis 2 inferior->superior).
        affine: the working grid's 4x4 affine (voxel -> scanner mm).
        spacing: (sx, sy, sz) mm; default: from ``affine``.
        min_prob: probability above which pixels form per-slice candidate blobs.
        tau: evidence (fraction of the cord's typical cross-sectional mass) below which a slice
            does not count as cord; also the cost of each slice skipped in a gap.
        max_slope: largest in-plane displacement (mm) per mm of z between path points.
        jump_weight: penalty per slice on the squared in-plane slope.
        max_gap_mm: longest run of slices without evidence the path may bridge.
        min_length_mm: shorter evidence runs are not a cord (``found`` is False).
        smoothing: wavelength (mm along z) below which wiggles of the per-slice centroids are
            smoothed out (half-power cut-off of the smoothing spline).
        max_end_extension_mm: how far the end refinement may go beyond the dynamic-programming
            path (the conus taper, whose small cross-section the path's evidence misses);
            a thin structure still above half the cord level (filum, cauda equina) cannot drag
            the tip further than this.
        step_mm: spacing of the output points along the curve.
        max_per_slice: number of candidate blobs kept per slice (largest first).

    Returns:
        A :class:`Centerline` (``found`` False when no cord-like structure is in view).
    """
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.ndim != 3:
        raise BadDataError(f"centerline heatmap must be 3-D, got shape {hm.shape}")
    hm = np.where(np.isfinite(hm), np.clip(hm, 0.0, 1.0), 0.0).astype(np.float32)
    affine = np.asarray(affine, float)
    spacing = _spacing_from_affine(affine) if spacing is None else tuple(float(s) for s in spacing)
    sx, sy, sz = spacing
    nz = hm.shape[2]

    cands = _slice_candidates(hm, spacing, min_prob, max_per_slice)
    if len(cands.k) == 0:
        return Centerline.empty(affine, spacing)
    best_mass = np.zeros(nz)
    np.maximum.at(best_mass, cands.k, cands.mass)
    ref_mass = float(np.clip(np.percentile(best_mass[best_mass > 0], 90),
                             _MIN_CORD_AREA_MM2, _MAX_CORD_AREA_MM2))
    evidence = np.minimum(cands.mass / ref_mass, 1.0)
    chain, score = _best_segment(cands, evidence, sz, tau=tau, jump_weight=jump_weight, max_slope=max_slope,
                                 max_gap_slices=int(np.floor(max_gap_mm / sz)))
    ks = cands.k[chain]
    if score <= 0 or (ks[-1] - ks[0]) * sz < min_length_mm:
        return Centerline.empty(affine, spacing)

    # first fit through the chosen blob centroids, then re-centre each slice on the cord's core
    # (above half the cord level, within a disc around the fit): robust to touching blobs
    curve = _Curve(ks * sz, cands.x[chain], cands.y[chain], None, smoothing)
    radius = 1.5 * np.sqrt(ref_mass / np.pi) + max(sx, sy)
    floor = 0.5 * float(np.median(cands.peak[chain]))
    k2, x2, y2 = _disc_centroids(hm, spacing, ks, curve, radius, floor)
    if len(k2) >= 2:
        curve = _Curve(k2 * sz, x2, y2, None, smoothing)

    # refine both ends along the curve (where the in-plane max-filtered heatmap falls below half
    # of the local cord level and stays below it), add the slices gained or lost there (the
    # conus taper, where the mass evidence is low) to the fit, and refine once more
    profile = ndimage.maximum_filter(hm, size=(3, 3, 1))
    z_lo, z_hi = ks[0] * sz, ks[-1] * sz
    levels = _end_levels(curve, profile, spacing, z_lo, z_hi)
    z_inf, z_sup, inf_edge, sup_edge = _refine_ends(curve, profile, spacing, z_lo, z_hi, levels, nz,
                                                    max_end_extension_mm)
    k_ext = np.arange(int(np.ceil(z_inf / sz - 1e-6)), int(np.floor(z_sup / sz + 1e-6)) + 1)
    k_ext = np.union1d(ks, k_ext[(k_ext < ks[0]) | (k_ext > ks[-1])])   # gaps are not re-read
    k3, x3, y3 = _disc_centroids(hm, spacing, k_ext, curve, radius, floor)
    if len(k3) >= 2:
        curve = _Curve(k3 * sz, x3, y3, None, smoothing)
        z_inf, z_sup, inf_edge, sup_edge = _refine_ends(curve, profile, spacing, z_lo, z_hi, levels, nz,
                                                    max_end_extension_mm)
    if z_sup - z_inf < min_length_mm:
        return Centerline.empty(affine, spacing)
    return _make_centerline(curve, z_inf, z_sup, affine, spacing, inferior_at_edge=inf_edge,
                            superior_at_edge=sup_edge, source="auto", step_mm=step_mm,
                            confidence_map=profile)


def _end_levels(curve: _Curve, profile: np.ndarray, spacing, z_lo: float, z_hi: float) -> tuple[float, float]:
    """Cord level (median heatmap along the curve) over the 40 mm next to each end."""
    sz = spacing[2]
    pts = np.arange(z_lo, z_hi + 1e-9, min(sz, 1.0))
    px, py = curve(pts)
    along = ndimage.map_coordinates(profile, (np.stack([px, py, pts], 1) / np.array(spacing)).T,
                                    order=1, mode="nearest")
    return float(np.median(along[pts <= z_lo + 40.0])), float(np.median(along[pts >= z_hi - 40.0]))


def _refine_ends(curve: _Curve, profile: np.ndarray, spacing, z_lo: float, z_hi: float,
                 levels: tuple[float, float], nz: int, max_ext_mm: float) -> tuple[float, float, bool, bool]:
    """Both ends of the cord along the curve: (z_inf, z_sup, inferior_at_edge, superior_at_edge)."""
    sz = spacing[2]
    inner = min(20.0, 0.5 * (z_hi - z_lo))
    persist = max(5.0, 2 * sz)
    z_inf, inf_edge = _refine_end(curve, profile, spacing, z_lo, z_lo + inner, 0.0, 0.5 * levels[0],
                                  persist, max_ext_mm)
    z_sup, sup_edge = _refine_end(curve, profile, spacing, z_hi, z_hi - inner, (nz - 1) * sz,
                                  0.5 * levels[1], persist, max_ext_mm)
    return z_inf, z_sup, inf_edge, sup_edge


# --------------------------------------------------------------------------------------------
# reference and file modes
# --------------------------------------------------------------------------------------------


def _from_slice_points(x_vox: np.ndarray, y_vox: np.ndarray, w: np.ndarray,
                       z_vox: np.ndarray, shape, affine, spacing, smoothing: float, step_mm: float,
                       source: str) -> Centerline:
    """Centerline through per-slice points (voxel coordinates), clipped to the image's z range."""
    sp = np.asarray(spacing, float)
    nz = shape[2]
    curve = _Curve(z_vox * sp[2], x_vox * sp[0], y_vox * sp[1], w, smoothing)
    z_lo, z_hi = float(z_vox.min()), float(z_vox.max())
    inf_edge = z_lo <= 0.5
    sup_edge = z_hi >= nz - 1.5
    z_lo, z_hi = max(z_lo, 0.0), min(z_hi, nz - 1.0)
    if z_hi < z_lo:
        raise BadDataError("the centerline does not overlap the image's field of view")
    return _make_centerline(curve, z_lo * sp[2], z_hi * sp[2], affine, tuple(sp), inferior_at_edge=inf_edge,
                            superior_at_edge=sup_edge, source=source, step_mm=step_mm)


def centerline_from_mask(mask: np.ndarray, affine: np.ndarray, spacing=None, *, smoothing: float = 15.0,
                         step_mm: float = 1.0) -> Centerline:
    """Reference mode: centroid of the (non-zero) mask in every axial slice + smoothing spline.

    The extent is that of the mask: the inferior end (the conus tip unless the mask touches
    the bottom slice) is the centroid of its lowest slice.
    """
    m = np.asarray(mask)
    if m.ndim != 3:
        raise BadDataError(f"mask must be 3-D, got shape {m.shape}")
    m = (np.nan_to_num(m.astype(float)) > 0).astype(float)
    affine = np.asarray(affine, float)
    spacing = _spacing_from_affine(affine) if spacing is None else tuple(float(s) for s in spacing)
    area = m.sum(axis=(0, 1))
    ks = np.flatnonzero(area > 0)
    if len(ks) == 0:
        return Centerline.empty(affine, spacing, source="reference")
    xs = (m * np.arange(m.shape[0])[:, None, None]).sum(axis=(0, 1))[ks] / area[ks]
    ys = (m * np.arange(m.shape[1])[None, :, None]).sum(axis=(0, 1))[ks] / area[ks]
    return _from_slice_points(xs, ys, np.ones(len(ks)), ks.astype(float), m.shape, affine, spacing,
                              smoothing, step_mm, "reference")


def _read_points_table(path: Path) -> np.ndarray:
    """Read x, y, z (mm) from a TSV/CSV/whitespace table; a header row is optional.

    With a header, columns named x/y/z (or x_mm/y_mm/z_mm) are used; without one, the
    table must have exactly three columns.
    """
    rows = []
    header = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tokens = [t for t in re.split(r"[,\t; ]+", line) if t]
        try:
            rows.append([float(t) for t in tokens])
        except ValueError:
            if header is not None or rows:
                raise BadDataError(f"non-numeric row in centerline table: {line!r}", path=path) from None
            header = [t.strip().strip('"').lower() for t in tokens]
    if not rows:
        raise BadDataError("centerline table has no points", path=path)
    if len({len(r) for r in rows}) != 1:
        raise BadDataError("centerline table rows have different numbers of columns", path=path)
    data = np.array(rows, float)
    if header is not None:
        cols = []
        for axis in ("x", "y", "z"):
            names = [axis, f"{axis}_mm", f"{axis}mm"]
            hit = [i for i, h in enumerate(header) if h in names]
            if not hit:
                raise BadDataError(f"centerline table header {header} has no '{axis}' column", path=path)
            cols.append(hit[0])
        if len(header) != data.shape[1]:
            raise BadDataError("centerline table header and rows differ in length", path=path)
        return data[:, cols]
    if data.shape[1] != 3:
        raise BadDataError(f"centerline table without header must have 3 columns (x y z mm), "
                           f"found {data.shape[1]}", path=path)
    return data


def centerline_from_file(path, shape, affine: np.ndarray, spacing=None, *, smoothing: float = 15.0,
                         step_mm: float = 1.0) -> Centerline:
    """A user's centerline, converted to the working grid (``shape``, ``affine``).

    ``path`` is either a NIfTI image (any non-zero voxels: a centerline or a cord mask, on any
    grid; its voxels are mapped through both affines, then averaged per working axial slice)
    or a text table of points in scanner RAS mm (``.tsv``/``.csv``/``.txt``: x, y, z columns,
    header optional). Raises InputMissingError / BadDataError.
    """
    path = Path(path)
    if not path.is_file():
        raise InputMissingError("centerline file not found", path=path)
    affine = np.asarray(affine, float)
    spacing = _spacing_from_affine(affine) if spacing is None else tuple(float(s) for s in spacing)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
        except Exception as exc:  # nibabel raises several types for broken files
            raise BadDataError(f"cannot read centerline image: {exc}", path=path) from exc
        data = np.squeeze(data)
        if data.ndim != 3:
            raise BadDataError(f"centerline image must be 3-D, got shape {data.shape}", path=path)
        ijk = np.argwhere(np.nan_to_num(np.asarray(data, float)) != 0)
        if len(ijk) == 0:
            raise BadDataError("centerline image has no non-zero voxels", path=path)
        vox = _mm_to_vox(affine, _vox_to_mm(img.affine, ijk))
        kz = np.rint(vox[:, 2]).astype(int)
        uk, inv = np.unique(kz, return_inverse=True)
        cnt = np.bincount(inv).astype(float)
        mean = np.stack([np.bincount(inv, weights=vox[:, i]) / cnt for i in range(3)], axis=1)
        return _from_slice_points(mean[:, 0], mean[:, 1], cnt, mean[:, 2], shape, affine, spacing,
                                  smoothing, step_mm, "file")
    try:
        pts_mm = _read_points_table(path)
    except UnicodeDecodeError as exc:
        raise BadDataError("centerline file is neither NIfTI nor a text table", path=path) from exc
    if not np.isfinite(pts_mm).all():
        raise BadDataError("centerline table contains non-finite values", path=path)
    vox = _mm_to_vox(affine, pts_mm)
    if len(np.unique(np.round(vox[:, 2], 6))) < 2:
        raise BadDataError("centerline table needs at least two points at different heights", path=path)
    return _from_slice_points(vox[:, 0], vox[:, 1], np.ones(len(vox)),
                              vox[:, 2], shape, affine, spacing, smoothing, step_mm, "file")


# --------------------------------------------------------------------------------------------
# utilities
# --------------------------------------------------------------------------------------------


def centerline_to_mask(centerline: Centerline, shape) -> np.ndarray:
    """uint8 mask with one voxel per axial slice on the centerline (0/1, working grid)."""
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.uint8)
    pts = centerline.points_vox
    if not centerline.found or len(pts) == 0:
        return out
    order = np.argsort(pts[:, 2], kind="stable")
    z = pts[order, 2]
    k = np.arange(max(0, int(np.ceil(z[0] - 0.5))), min(out.shape[2] - 1, int(np.floor(z[-1] + 0.5))) + 1)
    if len(k) == 0:
        return out
    kz = np.clip(k, z[0], z[-1])
    x = np.rint(np.interp(kz, z, pts[order, 0])).astype(int)
    y = np.rint(np.interp(kz, z, pts[order, 1])).astype(int)
    ok = (x >= 0) & (x < out.shape[0]) & (y >= 0) & (y < out.shape[1])
    out[x[ok], y[ok], k[ok]] = 1
    return out


def centerline_to_grid(centerline: Centerline, affine: np.ndarray, spacing=None) -> Centerline:
    """The same centerline expressed on another working grid (e.g. the segmentation model's
    spacing after fitting on the coarse centerline grid): scanner mm are kept, voxel
    coordinates are recomputed with the new ``affine``."""
    affine = np.asarray(affine, float)
    spacing = _spacing_from_affine(affine) if spacing is None else tuple(float(s) for s in spacing)
    vox = _mm_to_vox(affine, centerline.points_mm) if len(centerline.points_mm) else np.zeros((0, 3))
    tip_vox = None if centerline.conus_tip_mm is None else _mm_to_vox(affine, centerline.conus_tip_mm)[0]
    return Centerline(vox, centerline.points_mm, affine, spacing, centerline.found, tip_vox,
                      centerline.conus_tip_mm, centerline.confidence, centerline.inferior_end_at_edge,
                      centerline.superior_end_at_edge, centerline.source)


def centerline_to_tsv(centerline: Centerline) -> str:
    """TSV text of the points in scanner mm (header ``x_mm y_mm z_mm``), readable by
    :func:`centerline_from_file`."""
    lines = ["x_mm\ty_mm\tz_mm"]
    lines += [f"{p[0]:.3f}\t{p[1]:.3f}\t{p[2]:.3f}" for p in centerline.points_mm]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class CenterlineError:
    """Distances (mm) between two centerlines over their common S-I range."""

    mean_mm: float
    max_mm: float
    overlap_mm: float


def _point_to_polyline(p: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Distance from each point of ``p`` (N, 3) to the polyline ``line`` (M, 3)."""
    if len(line) == 1:
        return np.linalg.norm(p - line[0], axis=1)
    a, b = line[:-1], line[1:]
    ab = b - a
    denom = np.maximum((ab**2).sum(1), 1e-12)
    t = np.clip(((p[:, None, :] - a[None]) * ab[None]).sum(-1) / denom[None], 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(p[:, None, :] - closest, axis=-1).min(axis=1)


def centerline_error_mm(a: Centerline, b: Centerline) -> CenterlineError:
    """Symmetric point-to-curve distance (scanner mm) over the common S-I range.

    The S-I coordinate is the scanner z (RAS). Points of each curve within the overlap are
    measured against the other curve; returns NaN distances when the curves do not overlap.
    """
    pa, pb = a.points_mm, b.points_mm
    if len(pa) == 0 or len(pb) == 0:
        return CenterlineError(float("nan"), float("nan"), 0.0)
    lo = max(pa[:, 2].min(), pb[:, 2].min())
    hi = min(pa[:, 2].max(), pb[:, 2].max())
    if hi < lo:
        return CenterlineError(float("nan"), float("nan"), 0.0)
    sa = pa[(pa[:, 2] >= lo) & (pa[:, 2] <= hi)]
    sb = pb[(pb[:, 2] >= lo) & (pb[:, 2] <= hi)]
    d = np.concatenate([_point_to_polyline(sa, pb), _point_to_polyline(sb, pa)])
    if len(d) == 0:
        return CenterlineError(float("nan"), float("nan"), float(hi - lo))
    return CenterlineError(float(d.mean()), float(d.max()), float(hi - lo))
