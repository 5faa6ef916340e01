"""Voxel-grid geometry: reorientation to RAS, resampling, crop/uncrop (pure numpy/scipy/nibabel).

Conventions (docs/ARCHITECTURE.md): the working orientation is RAS+ (axis 0 Left->Right,
axis 1 Posterior->Anterior, axis 2 Inferior->Superior). Reorientation only permutes and flips
axes, so it is exact and never reslices an oblique image; resampling is a separate step.
Spacings are in mm in array-axis order.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel.orientations as nio
import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------------------------
# reorientation


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) of the three array axes of a 4x4 affine (column norms)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((linear**2).sum(axis=0)))  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class Reorientation:
    """Exact permutation + flips from the native voxel axes to the RAS working axes.

    ``ornt`` is nibabel's orientation array (native -> RAS, from ``io_orientation``);
    ``working_affine`` maps working voxel indices to the same scanner mm as ``native_affine``
    maps the corresponding native indices. An oblique image stays oblique: its working
    affine is the closest axis assignment, not a reslice.
    """

    native_shape: tuple[int, int, int]
    ornt: np.ndarray
    working_affine: np.ndarray
    native_affine: np.ndarray

    @property
    def working_shape(self) -> tuple[int, int, int]:
        """Array shape in the working orientation."""
        return tuple(int(self.native_shape[int(ax)]) for ax in np.argsort(self.ornt[:, 0]))  # type: ignore[return-value]

    @property
    def working_spacing(self) -> tuple[float, float, float]:
        """Voxel sizes (mm) of the working axes (x, y, z)."""
        return voxel_sizes(self.working_affine)

    @property
    def is_identity(self) -> bool:
        """True when the native grid already is RAS (no permutation, no flip)."""
        return bool(np.array_equal(self.ornt, [[0, 1], [1, 1], [2, 1]]))

    @property
    def working_to_native_vox(self) -> np.ndarray:
        """4x4 matrix mapping working voxel coordinates to native voxel coordinates."""
        return np.linalg.solve(self.native_affine, self.working_affine)

    def to_working(self, arr: np.ndarray) -> np.ndarray:
        """Native array (3-D, or with trailing extra axes) -> working RAS array (a copy)."""
        arr = np.asarray(arr)
        if tuple(arr.shape[:3]) != tuple(self.native_shape):
            raise ValueError(f"array shape {arr.shape} does not match the native shape {self.native_shape}")
        return np.ascontiguousarray(nio.apply_orientation(arr, self.ornt))

    def to_native(self, arr: np.ndarray) -> np.ndarray:
        """Working array -> native array (a copy); the exact inverse of :meth:`to_working`."""
        arr = np.asarray(arr)
        if tuple(arr.shape[:3]) != self.working_shape:
            raise ValueError(f"array shape {arr.shape} does not match the working shape {self.working_shape}")
        inverse = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), self.ornt)
        return np.ascontiguousarray(nio.apply_orientation(arr, inverse))

    def points_to_native_vox(self, points_vox: np.ndarray) -> np.ndarray:
        """(N, 3) working voxel coordinates -> (N, 3) native voxel coordinates."""
        return apply_affine(self.working_to_native_vox, points_vox)


def reorientation_for(affine: np.ndarray, shape) -> Reorientation:
    """The permutation/flip taking a native grid (``affine``, 3-D ``shape``) to RAS working axes."""
    affine = np.asarray(affine, dtype=np.float64)
    shape3 = tuple(int(n) for n in tuple(shape)[:3])
    ornt = nio.io_orientation(affine)
    if np.any(np.isnan(ornt)):
        raise ValueError(f"cannot orient a degenerate affine:\n{affine}")
    working_affine = affine @ nio.inv_ornt_aff(ornt, shape3)
    return Reorientation(
        native_shape=shape3, ornt=ornt, working_affine=working_affine, native_affine=affine.copy()
    )


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to (N, 3) points (or a single (3,) point)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


# --------------------------------------------------------------------------------------------
# resampling


def grid_for_spacing(shape, affine: np.ndarray, new_spacing) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a grid with ``new_spacing`` covering the field of view of (shape, affine).

    Same axis directions (an oblique grid stays oblique), ``round(n * s / t)`` voxels per axis
    (at least 1), centred on the same point, so the field of view matches to within one voxel.
    """
    shape = np.asarray(tuple(shape)[:3], dtype=np.float64)
    old = np.asarray(voxel_sizes(affine))
    new = np.asarray(new_spacing, dtype=np.float64)
    if new.shape != (3,) or np.any(~np.isfinite(new)) or np.any(new <= 0):
        raise ValueError(f"new_spacing must be 3 positive numbers, got {new_spacing}")
    new_shape = np.maximum(1, np.round(shape * old / new)).astype(int)
    ratio = new / old
    centre_old = (shape - 1) / 2.0
    centre_new = (new_shape - 1) / 2.0
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(ratio)
    index_map[:3, 3] = centre_old - centre_new * ratio
    return tuple(int(n) for n in new_shape), np.asarray(affine, dtype=np.float64) @ index_map  # type: ignore[return-value]


def resample(data: np.ndarray, affine: np.ndarray, new_spacing, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``data`` to ``new_spacing`` over the same field of view; returns (data, affine).

    Uses :func:`grid_for_spacing` and :func:`resample_to_grid` (spline ``order``; 0 = nearest,
    1 = linear). No anti-aliasing is applied when downsampling.
    """
    new_shape, new_affine = grid_for_spacing(np.shape(data), affine, new_spacing)
    return resample_to_grid(data, affine, new_shape, new_affine, order=order), new_affine


_FOV_TOL = 1e-6


def _is_diagonal(linear: np.ndarray) -> bool:
    return bool(np.allclose(linear, np.diag(np.diag(linear)), atol=1e-9))


def _destination_bounds(src_shape, matrix: np.ndarray, dst_shape) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive destination index range that can see the source field of view, or None if none can.

    ``matrix`` maps destination indices to source indices. The source field of view is the box
    of voxel edges [-0.5, n - 0.5]; its 8 corners are mapped into destination index space.
    """
    edges = [[-0.5 - _FOV_TOL, n - 0.5 + _FOV_TOL] for n in src_shape[:3]]
    corners = np.array(np.meshgrid(*edges, indexing="ij")).reshape(3, -1).T
    dst = apply_affine(np.linalg.inv(matrix), corners)
    lo = np.maximum(np.ceil(dst.min(axis=0) - _FOV_TOL), 0).astype(int)
    hi = np.minimum(np.floor(dst.max(axis=0) + _FOV_TOL), np.asarray(dst_shape) - 1).astype(int)
    if np.any(hi < lo):
        return None
    return lo, hi


def _outside_fov(src_shape, matrix: np.ndarray, dst_shape) -> np.ndarray | None:
    """Boolean mask of destination voxels whose source coordinate lies outside the source's
    field of view (voxel edges at -0.5 and n - 0.5), or None when every voxel lies inside."""
    upper = np.asarray(src_shape[:3], dtype=np.float64) - 0.5 + _FOV_TOL
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in dst_shape], indexing="ij")).reshape(3, -1).T
    src = apply_affine(matrix, corners)
    if np.all(src >= -0.5 - _FOV_TOL) and np.all(src <= upper):
        return None  # the field of view is convex: all corners inside -> everything inside
    grids = [np.arange(n, dtype=np.float64) for n in dst_shape]
    if _is_diagonal(matrix[:3, :3]):  # separable: one 1-D test per axis
        inside = [
            (c >= -0.5 - _FOV_TOL) & (c <= upper[a])
            for a, c in enumerate(matrix[a, a] * grids[a] + matrix[a, 3] for a in range(3))
        ]
        return ~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])
    outside = np.zeros(tuple(dst_shape), dtype=bool)
    for i in range(dst_shape[0]):  # one slab at a time keeps memory at one plane of float64
        for axis in range(3):
            coord = (
                matrix[axis, 0] * i
                + matrix[axis, 1] * grids[1][:, None]
                + matrix[axis, 2] * grids[2][None, :]
                + matrix[axis, 3]
            )
            outside[i] |= (coord < -0.5 - _FOV_TOL) | (coord > upper[axis])
    return outside


def resample_to_grid(
    data: np.ndarray, src_affine: np.ndarray, dst_shape, dst_affine: np.ndarray, order: int, cval: float = 0.0
) -> np.ndarray:
    """Resample ``data`` (on ``src_affine``) onto the grid (``dst_shape``, ``dst_affine``).

    Destination voxels whose centre lies inside the source field of view (including the outer
    half voxel) are interpolated with edge extension; voxels outside it get ``cval``. Only the
    destination sub-box that overlaps the source is interpolated, so bringing a small crop back
    onto a large grid is cheap. Returns float32 (order > 0) or the input dtype (order 0).
    """
    data = np.asarray(data)
    dst_shape = tuple(int(n) for n in tuple(dst_shape)[:3])
    matrix = np.linalg.solve(
        np.asarray(src_affine, dtype=np.float64), np.asarray(dst_affine, dtype=np.float64)
    )
    out_dtype = data.dtype if order == 0 else np.dtype(np.float32)
    out = np.full(dst_shape, cval, dtype=out_dtype)
    bounds = _destination_bounds(data.shape, matrix, dst_shape)
    if bounds is None:
        return out
    lo, hi = bounds
    shift = np.eye(4)
    shift[:3, 3] = lo
    sub_matrix = matrix @ shift  # sub-box index -> source index
    sub_shape = tuple(int(n) for n in hi - lo + 1)
    src = data if order == 0 or data.dtype == np.float32 else data.astype(np.float32)
    linear = sub_matrix[:3, :3]
    sub = ndimage.affine_transform(
        src, np.diag(linear) if _is_diagonal(linear) else linear,  # diagonal: scipy's faster path
        offset=sub_matrix[:3, 3], output_shape=sub_shape, order=order, mode="nearest", output=out_dtype,
    )  # fmt: skip
    outside = _outside_fov(data.shape, sub_matrix, sub_shape)
    if outside is not None:
        sub[outside] = cval
    out[tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))] = sub
    return out


# --------------------------------------------------------------------------------------------
# crop / uncrop


@dataclass(frozen=True)
class CropBox:
    """Half-open voxel box ``[start, stop)`` per axis; it may extend beyond the array (padding)."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.start) != 3 or len(self.stop) != 3:
            raise ValueError("CropBox needs 3 start and 3 stop indices")
        if any(int(b) <= int(a) for a, b in zip(self.start, self.stop, strict=True)):
            raise ValueError(f"empty CropBox: start {self.start}, stop {self.stop}")
        object.__setattr__(self, "start", tuple(int(v) for v in self.start))
        object.__setattr__(self, "stop", tuple(int(v) for v in self.stop))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Size of the box per axis."""
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    def clipped(self, shape) -> CropBox:
        """The part of the box inside an array of ``shape`` (raises if they do not overlap)."""
        start = tuple(max(0, a) for a in self.start)
        stop = tuple(min(int(n), b) for n, b in zip(shape, self.stop, strict=False))
        return CropBox(start, stop)  # type: ignore[arg-type]


def _overlap(box: CropBox, shape) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices (in the array, in the box) of the overlap between ``box`` and an array of ``shape``."""
    arr_sl, box_sl = [], []
    for a, b, n in zip(box.start, box.stop, tuple(shape)[:3], strict=True):
        lo, hi = max(a, 0), min(b, int(n))
        if hi <= lo:
            return None
        arr_sl.append(slice(lo, hi))
        box_sl.append(slice(lo - a, hi - a))
    return tuple(arr_sl), tuple(box_sl)


def crop(arr: np.ndarray, box: CropBox, pad_value=0) -> np.ndarray:
    """Extract ``box`` from ``arr`` (first 3 axes); parts outside the array are ``pad_value``."""
    arr = np.asarray(arr)
    out = np.full(box.shape + arr.shape[3:], pad_value, dtype=arr.dtype)
    overlap = _overlap(box, arr.shape)
    if overlap is not None:
        out[overlap[1]] = arr[overlap[0]]
    return out


def uncrop(arr: np.ndarray, box: CropBox, full_shape, fill=0) -> np.ndarray:
    """Place a cropped array back into a ``full_shape`` array filled with ``fill``.

    The exact inverse of :func:`crop` inside the box; parts of the box outside the array are dropped.
    """
    arr = np.asarray(arr)
    if tuple(arr.shape[:3]) != box.shape:
        raise ValueError(f"array shape {arr.shape} does not match the box shape {box.shape}")
    full_shape = tuple(int(n) for n in full_shape)
    out = np.full(full_shape[:3] + arr.shape[3:], fill, dtype=arr.dtype)
    overlap = _overlap(box, full_shape)
    if overlap is not None:
        out[overlap[0]] = arr[overlap[1]]
    return out


# --------------------------------------------------------------------------------------------
# crop around a centerline


def end_direction(points_vox: np.ndarray, spacing, at_start: bool, length_mm: float = 10.0) -> np.ndarray:
    """Unit direction (in mm) pointing outwards at one end of an ordered polyline.

    Estimated from the end point to the point ``length_mm`` (arc length) inside the curve, so a
    noisy last step does not dominate. Returns +/- z when the curve has a single point.
    """
    pts_mm = np.asarray(points_vox, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    if at_start:
        pts_mm = pts_mm[::-1]
    # pts_mm now runs from the inside towards the end we extend
    if len(pts_mm) < 2:
        return np.array([0.0, 0.0, -1.0 if at_start else 1.0])
    steps = np.linalg.norm(np.diff(pts_mm, axis=0), axis=1)
    dist_from_end = np.concatenate([np.cumsum(steps[::-1])[::-1], [0.0]])
    # innermost point within length_mm of the end (the end point itself always qualifies)
    inner = min(int(np.argmax(dist_from_end <= length_mm)), len(pts_mm) - 2)
    vec = pts_mm[-1] - pts_mm[inner]
    norm = float(np.linalg.norm(vec))
    if norm == 0.0:
        return np.array([0.0, 0.0, -1.0 if at_start else 1.0])
    return vec / norm


def extend_polyline(
    points_vox: np.ndarray, spacing, extend_mm: float, end_direction_mm: float = 10.0
) -> np.ndarray:
    """Append straight extensions of ``extend_mm`` beyond both ends, following each end's direction.

    ``points_vox`` (N, 3) are ordered (inferior -> superior for a centerline); the returned
    points keep that order: extension below, the original points, extension above. Points are
    spaced about one voxel apart along the extensions.
    """
    pts = np.asarray(points_vox, dtype=np.float64).reshape(-1, 3)
    if len(pts) == 0 or extend_mm <= 0:
        return pts.copy()
    spacing = np.asarray(spacing, dtype=np.float64)
    n_steps = max(1, int(np.ceil(extend_mm / float(spacing.min()))))
    ts = np.linspace(extend_mm / n_steps, extend_mm, n_steps)[:, None]
    lower = (
        pts[0] + ts[::-1] * end_direction(pts, spacing, at_start=True, length_mm=end_direction_mm) / spacing
    )
    upper = pts[-1] + ts * end_direction(pts, spacing, at_start=False, length_mm=end_direction_mm) / spacing
    return np.concatenate([lower, pts, upper], axis=0)


def box_around_points(
    points_vox: np.ndarray,
    half_size_xy,
    extend_mm: float,
    shape,
    *,
    spacing,
    end_direction_mm: float = 10.0,
    min_size=None,
) -> CropBox:
    """Crop box around a centerline, extended ``extend_mm`` beyond both ends along their direction.

    The box covers every (extended) point with ``half_size_xy`` voxels of margin in x and y and
    one voxel in z, is clipped to the array ``shape`` (nothing is gained by segmenting padding),
    then grown symmetrically to ``min_size`` (e.g. the model's patch size) where it is smaller;
    that growth may extend beyond the array, which :func:`crop` pads.
    """
    pts = extend_polyline(points_vox, spacing, extend_mm, end_direction_mm)
    if len(pts) == 0:
        raise ValueError("box_around_points needs at least one point")
    hx, hy = (float(v) for v in np.broadcast_to(np.asarray(half_size_xy, dtype=np.float64), (2,)))
    lo = np.floor(pts.min(axis=0) - [hx, hy, 1.0]).astype(int)
    hi = np.ceil(pts.max(axis=0) + [hx, hy, 1.0]).astype(int) + 1
    shape3 = np.asarray(tuple(shape)[:3], dtype=int)
    lo = np.clip(lo, 0, shape3 - 1)
    hi = np.clip(hi, lo + 1, shape3)
    if min_size is not None:
        need = np.maximum(np.asarray(min_size, dtype=int) - (hi - lo), 0)
        lo = lo - need // 2
        hi = hi + (need - need // 2)
    return CropBox(tuple(int(v) for v in lo), tuple(int(v) for v in hi))  # type: ignore[arg-type]
