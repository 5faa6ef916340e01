"""Vertebral levels along the cord, disc labels and the cervicothoracic / lumbosacral split.

Pure numpy/scipy (nibabel only to read a label file). Everything here works in scanner
millimetres (RAS) plus the affine of whatever voxel grid a mask or label image lives on.

Disc label convention (SCT / PAM50): value ``n`` marks the disc just above vertebra ``n``
(C1=1 ... C7=7, T1=8 ... T12=19, L1=20 ... L5=24, S1=25), so 3 = C2-C3, 17 = T9-T10,
21 = L1-L2 and 25 = L5-S1. Value 1 marks the top of C1 (the occiput-C1 junction, "C0-C1")
and 2 the C1-C2 junction. Value 60 marks the conus medullaris / cauda equina; it is not a
disc and never takes part in level computations.

A *continuous disc coordinate* ``c`` is used internally: ``c = n`` exactly at disc ``n`` and it
grows inferiorly, so a point with ``n <= c < n + 1`` lies in vertebra ``n``. Between two known
discs, ``c`` is interpolated in proportion to the typical vertebral heights of
``TYPICAL_DISC_SPACING_MM``; outside the labelled range it is unknown (NaN): levels are never
guessed silently.

Centerlines are ``(N, 3)`` arrays of scanner-mm points ordered inferior -> superior, or any
object with a ``points_mm`` attribute (``bids_app.centerline.Centerline``). A centerline with
fewer than 2 points (cord not found) gives unknown levels and no split, never an exception. Arc-length
positions along the cord are measured in mm from the first (most inferior) point and grow
superiorly.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.special import gammaincc, ndtr

from bids_app.errors import BadDataError, InputMissingError, UsageError

# --------------------------------------------------------------------------------------
# Label conventions
# --------------------------------------------------------------------------------------

CONUS_VALUE = 60
FIRST_DISC = 1  # top of C1
LAST_DISC = 25  # L5-S1
DISC_VALUES = tuple(range(FIRST_DISC, LAST_DISC + 1))
KNOWN_LABEL_VALUES = frozenset(DISC_VALUES) | {CONUS_VALUE}
DEFAULT_SPLIT_VALUE = 17  # T9-T10: where the lumbar enlargement begins

REGION_NAMES = {1: "cervicothoracic", 2: "lumbosacral"}

_REGIONS = (("C", 1, 7), ("T", 8, 19), ("L", 20, 24), ("S", 25, 25))

# Typical distance (mm, along the cord) from disc v to disc v + 1, i.e. the height of
# vertebra v plus half of the two discs around it.
# v = 1..20 were measured once from the straightened PAM50 template
# (PAM50_label_disc.nii.gz, 0.5 mm isotropic: difference of the z indices of the single-voxel
# disc labels v and v + 1, times 0.5 mm). PAM50 stops at L1-L2 (v = 21), so v = 21..24
# (L2..L5) are approximate adult values from the literature (lumbar vertebral body height
# about 26-28 mm, mid-disc height about 9-12 mm; e.g. Zhou et al., Eur Spine J 2000),
# scaled by 0.96 so that L1 matches PAM50's 33.5 mm. Individual spines differ by an overall
# scale (about +-15 %) and by a few per cent per level; identify_discs models both.
TYPICAL_DISC_SPACING_MM: dict[int, float] = {
    1: 23.0, 2: 15.5, 3: 18.5, 4: 18.5, 5: 16.5, 6: 15.5, 7: 17.0,  # C1..C7
    8: 21.5, 9: 23.0, 10: 23.0, 11: 24.5, 12: 25.5, 13: 25.5,  # T1..T6
    14: 26.5, 15: 27.0, 16: 26.5, 17: 29.0, 18: 31.5, 19: 31.5,  # T7..T12
    20: 33.5,  # L1 (PAM50)
    21: 35.0, 22: 36.5, 23: 37.0, 24: 36.0,  # L2..L5 (literature, see above)
}

# Template position (mm below disc 1) of every disc value 1..25.
_TEMPLATE_POS = np.concatenate(
    [[0.0], np.cumsum([TYPICAL_DISC_SPACING_MM[v] for v in range(FIRST_DISC, LAST_DISC)])]
)
_TEMPLATE_VALUES = np.arange(FIRST_DISC, LAST_DISC + 1, dtype=float)


def vertebra_name(n: int) -> str:
    """Name of vertebra ``n`` (1 -> "C1", 8 -> "T1", 20 -> "L1", 24 -> "L5", 25 -> "S1")."""
    n = _as_int(n, "vertebra number")
    for prefix, first, last in _REGIONS:
        if first <= n <= last:
            return f"{prefix}{n - first + 1}"
    raise UsageError(f"vertebra number {n} is outside 1..{LAST_DISC} (C1..S1)")


def _vertebra_number(name: str) -> int:
    """Inverse of :func:`vertebra_name` (accepts "C0" for the occiput)."""
    m = re.fullmatch(r"([CTLS])(\d{1,2})", name.strip().upper())
    if m is None:
        raise UsageError(f"cannot read a vertebra name from {name!r}")
    prefix, k = m.group(1), int(m.group(2))
    if prefix == "C" and k == 0:
        return 0
    for p, first, last in _REGIONS:
        if p == prefix and 1 <= k <= last - first + 1:
            return first + k - 1
    raise UsageError(f"no vertebra {name!r}")


def disc_name(value: int) -> str:
    """Name of an SCT/PAM50 disc label: 3 -> "C2-C3", 17 -> "T9-T10", 25 -> "L5-S1", 60 -> "conus".

    Raises UsageError for values that are not part of the convention.
    """
    value = _as_int(value, "disc value")
    if value == CONUS_VALUE:
        return "conus"
    if value == FIRST_DISC:
        return "C0-C1"
    if FIRST_DISC < value <= LAST_DISC:
        return f"{vertebra_name(value - 1)}-{vertebra_name(value)}"
    raise UsageError(f"{value} is not a disc label value (1..{LAST_DISC}, or {CONUS_VALUE})")


def disc_value(name: str | int) -> int:
    """SCT/PAM50 value of a disc given by name or number.

    Accepts "T9-T10", "t9/t10", "T9T10", "T12-L1", "L5-S1", "C2-C3", "conus", an int or a
    numeric string ("17"). The two vertebrae must be adjacent. Raises UsageError otherwise
    (this parses ``--split-level``).
    """
    if isinstance(name, (int, np.integer)):
        value = int(name)
    else:
        text = str(name).strip()
        if text.lower() == "conus":
            return CONUS_VALUE
        if re.fullmatch(r"\d+", text):
            value = int(text)
        else:
            m = re.fullmatch(r"([A-Za-z]\d{1,2})\s*[-/_ ]?\s*([A-Za-z]\d{1,2})", text)
            if m is None:
                raise UsageError(f"cannot read a disc from {name!r} (expected e.g. T9-T10 or 17)")
            upper, lower = _vertebra_number(m.group(1)), _vertebra_number(m.group(2))
            if lower != upper + 1:
                raise UsageError(f"{name!r} is not a disc: {m.group(1)} and {m.group(2)} are not adjacent")
            value = lower
    if value not in KNOWN_LABEL_VALUES:
        raise UsageError(f"{value} is not a disc label value (1..{LAST_DISC}, or {CONUS_VALUE})")
    return value


def _as_int(value: object, what: str) -> int:
    try:
        as_float = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be an integer, got {value!r}") from None
    if not math.isfinite(as_float) or as_float != int(as_float):
        raise UsageError(f"{what} must be an integer, got {value!r}")
    return int(as_float)


# --------------------------------------------------------------------------------------
# Disc labels: reading, writing, tables
# --------------------------------------------------------------------------------------


class DiscLabelWarning(UserWarning):
    """Something in a disc label set was ignored or corrected (reported, never fatal)."""


@dataclass(frozen=True)
class DiscLabel:
    """One labelled disc: SCT value, voxel coordinates on its grid, scanner mm (RAS)."""

    value: int
    voxel: tuple[float, float, float]
    mm: tuple[float, float, float]

    @property
    def name(self) -> str:
        return disc_name(self.value)


def _warn(message: str) -> None:
    warnings.warn(message, DiscLabelWarning, stacklevel=3)


def read_disc_labels(
    source: str | Path | np.ndarray, affine: np.ndarray | None = None, *, max_spread_mm: float = 5.0
) -> list[DiscLabel]:
    """Disc labels from a label image (``_label-discs_dlabel``, older ``_labels-disc-manual``).

    ``source`` is a NIfTI path (its affine follows nibabel's rule: sform if its code > 0, else
    qform) or a 3-D array with ``affine`` given. Labels are normally single voxels; small blobs
    are tolerated (the centroid of all voxels of a value is used, with a warning when they
    spread over more than ``max_spread_mm``). Unknown values are ignored with a
    :class:`DiscLabelWarning`. Any subset of discs may be present, including none.
    The result is sorted by value (superior first); the conus marker 60 is kept.
    """
    data, affine = _load_label_array(source, affine)
    coords = np.argwhere(data != 0)  # label images are sparse: only these voxels become float
    raw = data[tuple(coords.T)].astype(float)
    finite = np.isfinite(raw)
    if not finite.all():
        _warn(f"{int((~finite).sum())} non-finite voxels in the disc labels were ignored")
        coords, raw = coords[finite], raw[finite]
    values = np.rint(raw).astype(np.int64)
    if np.any(np.abs(raw - values) > 0.01):
        _warn("non-integer disc label values were rounded to the nearest integer")
    unknown = sorted({int(v) for v in values if int(v) not in KNOWN_LABEL_VALUES and v != 0})
    if unknown:
        _warn(f"unknown disc label values ignored: {unknown}")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    labels = []
    for value in sorted({int(v) for v in values if int(v) in KNOWN_LABEL_VALUES}):
        vox = coords[values == value].astype(float)
        centre = vox.mean(axis=0)
        spread = float(np.max(np.linalg.norm((vox - centre) * zooms, axis=1)))
        if spread > max_spread_mm:
            _warn(
                f"disc label {value} ({disc_name(value)}) covers {len(vox)} voxels spread over "
                f"{spread:.1f} mm; their centroid is used"
            )
        mm = affine[:3, :3] @ centre + affine[:3, 3]
        labels.append(DiscLabel(value, _triple(centre), _triple(mm)))
    return labels


def _load_label_array(source, affine) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(source, np.ndarray):
        if affine is None:
            raise UsageError("read_disc_labels: an array needs its affine")
        data = np.asarray(source)
        affine = np.asarray(affine, dtype=float)
    else:
        import nibabel as nib

        path = Path(source)
        if not path.exists():
            raise InputMissingError("disc label file not found", path=path)
        try:
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)  # native dtype: no float copy of the whole image
        except Exception as exc:  # nibabel raises many types for broken files
            raise BadDataError(f"cannot read disc labels: {exc}", path=path) from exc
        affine = np.asarray(img.affine, dtype=float) if affine is None else np.asarray(affine, float)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadDataError(f"disc labels must be a 3-D image, got shape {data.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BadDataError("disc labels have an unusable affine")
    return data, affine


def _triple(v) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def _as_value_points(discs: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """(values (K,), mm (K, 3)) from DiscLabel objects or ``(value, xyz_mm)`` pairs."""
    values, points = [], []
    for disc in discs:
        if isinstance(disc, DiscLabel):
            values.append(disc.value)
            points.append(disc.mm)
        else:
            value, mm = disc
            values.append(int(value))
            points.append(np.asarray(mm, dtype=float).reshape(3))
    return np.asarray(values, dtype=int), np.asarray(points, dtype=float).reshape(-1, 3)


def make_disc_labels(values: Sequence[int], points_mm: np.ndarray, affine: np.ndarray) -> list[DiscLabel]:
    """DiscLabel objects for identified points (e.g. the output of :func:`identify_discs`)."""
    points_mm = np.asarray(points_mm, dtype=float).reshape(-1, 3)
    if len(values) != len(points_mm):
        raise UsageError(f"{len(values)} disc values for {len(points_mm)} points")
    inv = np.linalg.inv(np.asarray(affine, dtype=float))
    labels = []
    for value, mm in zip(values, points_mm, strict=True):
        value = disc_value(int(value))
        vox = inv[:3, :3] @ mm + inv[:3, 3]
        labels.append(DiscLabel(value, _triple(vox), _triple(mm)))
    return sorted(labels, key=lambda d: d.value)


def discs_to_label_image(discs: Iterable, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """Single-voxel disc label image (uint8, SCT convention) on the grid ``(shape, affine)``.

    Each disc's mm position is rounded to the nearest voxel; discs outside the grid are left
    out with a warning, and two discs falling into one voxel keep the later one (warning).
    """
    values, points = _as_value_points(discs)
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.uint8)
    if len(values) == 0:
        return out
    inv = np.linalg.inv(np.asarray(affine, dtype=float))
    vox = np.rint(points @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    for value, v in zip(values, vox, strict=True):
        value = disc_value(int(value))
        if np.any(v < 0) or np.any(v >= out.shape):
            _warn(f"disc {disc_name(value)} lies outside the image grid and was not written")
            continue
        if out[tuple(v)]:
            _warn(f"discs {disc_name(int(out[tuple(v)]))} and {disc_name(value)} fall into one voxel")
        out[tuple(v)] = value
    return out


def discs_tsv_rows(discs: Iterable, centerline=None) -> list[dict]:
    """Rows for a discs TSV, superior first: value, name, x_mm, y_mm, z_mm[, cord_position_mm].

    ``cord_position_mm`` (arc length from the inferior end of the centerline, extrapolated past
    its ends) is added when a usable centerline is given.
    """
    values, points = _as_value_points(discs)
    order = np.argsort(values, kind="stable")
    arcs = None
    if centerline is not None and len(values) and _has_centerline(centerline):
        arcs = project_on_centerline(points, centerline, extrapolate=True)
    rows = []
    for i in order:
        row = {
            "value": int(values[i]),
            "name": disc_name(int(values[i])),
            "x_mm": round(float(points[i, 0]), 3),
            "y_mm": round(float(points[i, 1]), 3),
            "z_mm": round(float(points[i, 2]), 3),
        }
        if arcs is not None:
            row["cord_position_mm"] = round(float(arcs[i]), 3)
        rows.append(row)
    return rows


def dseg_tsv_rows() -> list[dict]:
    """Rows (index, name) of the ``_dseg.tsv`` that goes with :func:`split_mask`'s output."""
    return [{"index": index, "name": name} for index, name in REGION_NAMES.items()]


# --------------------------------------------------------------------------------------
# Centerline geometry
# --------------------------------------------------------------------------------------


def _centerline_mm(centerline) -> np.ndarray:
    points = np.asarray(getattr(centerline, "points_mm", centerline), dtype=float)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) < 2 or not np.all(np.isfinite(points)):
        raise BadDataError("a centerline needs at least 2 finite (x, y, z) mm points")
    keep = np.r_[True, np.linalg.norm(np.diff(points, axis=0), axis=1) > 1e-9]
    points = points[keep]
    if len(points) < 2:
        raise BadDataError("the centerline has zero length")
    return points


def _has_centerline(centerline) -> bool:
    """Whether a centerline is usable (a Centerline with found=False has no points)."""
    try:
        _centerline_mm(centerline)
    except BadDataError:
        return False
    return True


def _arc_lengths(points: np.ndarray) -> np.ndarray:
    return np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))]


def _closest_on_polyline(points_mm: np.ndarray, line: np.ndarray, extrapolate: bool):
    """Arc position, distance and closest point of each point on the polyline ``line``."""
    points_mm = np.asarray(points_mm, dtype=float).reshape(-1, 3)
    start, seg = line[:-1], np.diff(line, axis=0)
    seg_len = np.linalg.norm(seg, axis=1)
    arc0 = _arc_lengths(line)[:-1]
    rel = points_mm[:, None, :] - start[None, :, :]
    t = np.einsum("psk,sk->ps", rel, seg) / (seg_len**2)[None, :]
    lo = np.zeros(len(seg))
    hi = np.ones(len(seg))
    if extrapolate:
        lo[0], hi[-1] = -np.inf, np.inf
    t = np.clip(t, lo[None, :], hi[None, :])
    closest = start[None, :, :] + t[..., None] * seg[None, :, :]
    dist = np.linalg.norm(points_mm[:, None, :] - closest, axis=2)
    best = np.argmin(dist, axis=1)
    rows = np.arange(len(points_mm))
    arc = arc0[best] + t[rows, best] * seg_len[best]
    return arc, dist[rows, best], closest[rows, best]


def project_on_centerline(points_mm, centerline, *, extrapolate: bool = False) -> np.ndarray:
    """Arc-length position (mm from the inferior end) of the closest centerline point.

    ``points_mm`` is ``(3,)`` or ``(K, 3)``. With ``extrapolate=True`` the first and last
    segments are extended indefinitely, so points beyond the ends get negative positions or
    positions past the cord length (used for discs below the conus).
    """
    arc, _, _ = _closest_on_polyline(points_mm, _centerline_mm(centerline), extrapolate)
    return arc


def _point_at_arc(line: np.ndarray, arcs: np.ndarray, s: float) -> np.ndarray:
    """Point of the polyline at arc position ``s`` (linear extrapolation past the ends)."""
    i = int(np.clip(np.searchsorted(arcs, s) - 1, 0, len(line) - 2))
    f = (s - arcs[i]) / (arcs[i + 1] - arcs[i])
    return line[i] + f * (line[i + 1] - line[i])


def _tangent_at_arc(line: np.ndarray, arcs: np.ndarray, s: float, half_window_mm: float) -> np.ndarray:
    """Unit tangent (pointing superiorly) averaged over ``s +- half_window_mm``."""
    lo = max(s - half_window_mm, arcs[0])
    hi = min(s + half_window_mm, arcs[-1])
    if hi - lo < 1e-6:  # s beyond an end: use the end segment
        lo, hi = (arcs[0], arcs[1]) if s <= arcs[0] else (arcs[-2], arcs[-1])
    d = _point_at_arc(line, arcs, hi) - _point_at_arc(line, arcs, lo)
    return d / np.linalg.norm(d)


# --------------------------------------------------------------------------------------
# Levels along the cord
# --------------------------------------------------------------------------------------


def _known_disc_positions(centerline, discs) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Values (ascending = superior first) and their arc positions; a problem string if unusable."""
    values, points = _as_value_points(discs)
    is_disc = (values >= FIRST_DISC) & (values <= LAST_DISC)
    values, points = values[is_disc], points[is_disc]
    if len(values) == 0:
        return values, np.zeros(0), "no disc labels"
    if len(np.unique(values)) != len(values):
        return values, np.zeros(0), "a disc value appears more than once"
    arcs = project_on_centerline(points, centerline, extrapolate=True)
    order = np.argsort(values)
    values, arcs = values[order], arcs[order]
    if np.any(np.diff(arcs) >= 0):
        return values, arcs, "disc labels are not in anatomical order along the cord"
    return values, arcs, None


def _disc_coordinate(arc: np.ndarray, values: np.ndarray, arcs: np.ndarray) -> np.ndarray:
    """Continuous disc coordinate at arc positions; NaN outside the known discs' range."""
    arc = np.asarray(arc, dtype=float)
    out = np.full(arc.shape, np.nan)
    if len(values) == 0:
        return out
    template = _TEMPLATE_POS[values - FIRST_DISC]
    inside = (arc <= arcs[0]) & (arc >= arcs[-1])
    # np.interp needs increasing x: arcs decrease with value, so flip both.
    pos = np.interp(arc[inside], arcs[::-1], template[::-1])
    out[inside] = np.interp(pos, _TEMPLATE_POS, _TEMPLATE_VALUES)
    return out


def levels_along_cord(centerline, discs) -> np.ndarray:
    """Vertebral level (vertebra number, float) at every centerline point; NaN where unknown.

    Between disc n and disc n + 1 the level is vertebra n. Between two known discs that are
    not adjacent (e.g. only 3 and 5), the missing discs are placed in proportion to typical
    vertebral heights. Outside the labelled range the level is NaN: nothing is extrapolated.
    Disc labels out of anatomical order give all-NaN with a :class:`DiscLabelWarning`.
    """
    line = np.asarray(getattr(centerline, "points_mm", centerline), dtype=float).reshape(-1, 3)
    if not _has_centerline(centerline):
        return np.full(len(line), np.nan)
    values, arcs, problem = _known_disc_positions(centerline, discs)
    if problem is not None:
        if problem != "no disc labels":
            _warn(f"vertebral levels unknown: {problem}")
        return np.full(len(line), np.nan)
    coord = _disc_coordinate(_arc_lengths(line), values, arcs)
    return np.floor(coord)


def slice_levels(points_vox: np.ndarray, point_levels: np.ndarray, n_slices: int) -> np.ndarray:
    """Per axial slice (working grid, axis 2) level: that of the centerline point closest in z.

    Slices the centerline does not reach get NaN.
    """
    points_vox = np.asarray(points_vox, dtype=float).reshape(-1, 3)
    point_levels = np.asarray(point_levels, dtype=float)
    out = np.full(int(n_slices), np.nan)
    if len(points_vox) == 0:
        return out
    z = points_vox[:, 2]
    for k in range(int(n_slices)):
        if z.min() - 0.5 <= k <= z.max() + 0.5:
            out[k] = point_levels[int(np.argmin(np.abs(z - k)))]
    return out


def levels_tsv_rows(levels: np.ndarray) -> list[dict]:
    """Rows (slice, vertebra, level_value) for the per-slice levels TSV ("n/a" when unknown)."""
    rows = []
    for k, level in enumerate(np.asarray(levels, dtype=float)):
        known = bool(np.isfinite(level))
        rows.append(
            {
                "slice": k,
                "vertebra": vertebra_name(int(level)) if known else "n/a",
                "level_value": int(level) if known else "n/a",
            }
        )
    return rows


def conus_level(conus_tip_mm, centerline, discs) -> str | None:
    """Vertebra (e.g. "L1") in which the conus tip lies; None unless it lies between known discs.

    Without ``conus_tip_mm``, the conus marker (value 60) among ``discs`` is used when present.
    """
    if conus_tip_mm is None:
        values, points = _as_value_points(discs)
        if np.count_nonzero(values == CONUS_VALUE) != 1:
            return None
        conus_tip_mm = points[values == CONUS_VALUE][0]
    if not _has_centerline(centerline):
        return None
    values, arcs, problem = _known_disc_positions(centerline, discs)
    if problem is not None:
        return None
    arc = project_on_centerline(np.asarray(conus_tip_mm, dtype=float), centerline, extrapolate=True)
    coord = float(_disc_coordinate(arc, values, arcs)[0])
    if not np.isfinite(coord):
        return None
    return vertebra_name(int(min(np.floor(coord), LAST_DISC)))


# --------------------------------------------------------------------------------------
# Cervicothoracic / lumbosacral split
# --------------------------------------------------------------------------------------


class SplitResult(NamedTuple):
    """``dseg`` (uint8, 1 = cervicothoracic, 2 = lumbosacral) or None, and why."""

    dseg: np.ndarray | None
    reason: str


class SplitPlane(NamedTuple):
    point_mm: np.ndarray  # the split disc's projection on the centerline
    normal_mm: np.ndarray  # unit tangent of the centerline there, pointing superiorly
    arc_mm: float  # arc position of point_mm along the centerline


def split_plane(
    centerline, discs, split_value: int | str = DEFAULT_SPLIT_VALUE, *,
    tangent_half_window_mm: float = 5.0, max_disc_distance_mm: float = 50.0,
) -> SplitPlane | str:
    """The split plane through a disc's projection, perpendicular to the centerline.

    Returns a :class:`SplitPlane`, or a reason (str) when the split disc is not available.
    """
    split_value = disc_value(split_value)
    if split_value not in DISC_VALUES:
        raise UsageError(f"cannot split at {disc_name(split_value)}: choose a disc")
    line = _centerline_mm(centerline)
    values, points = _as_value_points(discs)
    chosen = points[values == split_value]
    name = disc_name(split_value)
    if len(chosen) == 0:
        return f"split disc {name} ({split_value}) is not among the disc labels"
    if len(chosen) > 1:
        return f"split disc {name} ({split_value}) is labelled more than once"
    arc, dist, point = _closest_on_polyline(chosen, line, extrapolate=True)
    if dist[0] > max_disc_distance_mm:
        return f"split disc {name} lies {dist[0]:.0f} mm from the cord centerline"
    arcs = _arc_lengths(line)
    normal = _tangent_at_arc(line, arcs, float(arc[0]), tangent_half_window_mm)
    return SplitPlane(point[0], normal, float(arc[0]))


def signed_split_distance(coords_mm: np.ndarray, centerline, plane: SplitPlane, zone_mm: float = 20.0) -> np.ndarray:
    """Position of each point (N, 3 scanner mm) relative to the split, in mm (> 0 superior).

    Near the split (nearest centerline position within ``zone_mm`` of it) it is the signed
    distance to the plane; farther away, the arc length from the split to the nearest centerline
    position, so that a curved cord is never cut where the extended plane happens to cross it
    again. Both agree on the cord's axis, so the value runs smoothly along the cord.
    """
    line = _centerline_mm(centerline)
    arcs = _arc_lengths(line)
    step = 0.5
    dense_arc = np.arange(arcs[0], arcs[-1] + step, step)
    dense = np.stack([np.interp(dense_arc, arcs, line[:, k]) for k in range(3)], axis=1)
    coords_mm = np.asarray(coords_mm, float).reshape(-1, 3)
    _, nearest = cKDTree(dense).query(coords_mm)
    signed = dense_arc[nearest] - plane.arc_mm
    zone = np.abs(signed) <= zone_mm
    signed[zone] = (coords_mm[zone] - plane.point_mm) @ plane.normal_mm
    return signed


def _region_labels(coords_mm: np.ndarray, line: np.ndarray, plane: SplitPlane, zone_mm: float) -> np.ndarray:
    """1 (superior) or 2 (inferior) for each point (see :func:`signed_split_distance`)."""
    return np.where(signed_split_distance(coords_mm, line, plane, zone_mm) >= 0, 1, 2).astype(np.uint8)


def split_mask(
    mask: np.ndarray, affine: np.ndarray, centerline, discs,
    split_value: int | str = DEFAULT_SPLIT_VALUE, *, zone_mm: float = 20.0,
) -> SplitResult:
    """Split a cord mask into 1 = cervicothoracic and 2 = lumbosacral at a disc (default T9-T10).

    ``mask`` lives on the grid ``affine`` (working or native: only mm matter); ``centerline``
    is in scanner mm. The boundary is the plane through the split disc's projection on the
    centerline, perpendicular to the centerline's local tangent. When the split disc is not
    available (or the labels are unusable) the result is ``SplitResult(None, reason)``: the
    caller reports the reason; nothing is raised.
    """
    try:
        plane = split_plane(centerline, discs, split_value)
    except (BadDataError, UsageError) as exc:
        return SplitResult(None, f"no split: {exc}")
    if isinstance(plane, str):
        return SplitResult(None, f"no split: {plane}")
    _, _, problem = _known_disc_positions(centerline, discs)
    if problem is not None and problem != "no disc labels":
        return SplitResult(None, f"no split: {problem}")
    mask = np.asarray(mask) > 0
    dseg = np.zeros(mask.shape, dtype=np.uint8)
    vox = np.argwhere(mask)
    name = disc_name(disc_value(split_value))
    if len(vox):
        affine = np.asarray(affine, dtype=float)
        coords = vox @ affine[:3, :3].T + affine[:3, 3]
        dseg[tuple(vox.T)] = _region_labels(coords, _centerline_mm(centerline), plane, zone_mm)
    return SplitResult(dseg, f"split at the {name} disc")


def region_masks(
    mask: np.ndarray, affine: np.ndarray, centerline, discs,
    split_value: int | str = DEFAULT_SPLIT_VALUE,
) -> tuple[dict[str, np.ndarray] | None, str]:
    """``({"cervicothoracic": uint8 mask, "lumbosacral": uint8 mask}, reason)`` or ``(None, reason)``.

    The region of a voxel depends only on its position, so splitting a prediction and a
    reference separately with the same centerline and discs gives per-region Dice directly.
    """
    dseg, reason = split_mask(mask, affine, centerline, discs, split_value)
    if dseg is None:
        return None, reason
    return {name: (dseg == index).astype(np.uint8) for index, name in REGION_NAMES.items()}, reason


# --------------------------------------------------------------------------------------
# Automatic discs: peaks of a disc heatmap, then identities
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentifyConfig:
    """Priors of :func:`identify_discs` (all spacings relative to TYPICAL_DISC_SPACING_MM)."""

    top_value: int = 3  # the most superior disc a detector finds when the top is in view (C2-C3)
    bottom_value: int = LAST_DISC  # the most inferior one when the sacrum is in view (L5-S1)
    spacing_rel_sd: float = 0.08  # per-level variation of vertebral heights after scaling
    position_sd_mm: float = 1.5  # detection error of one disc position
    scale_sd: float = 0.15  # log-sd of the overall spine size
    miss_prob: float = 0.05  # chance that the detector misses a disc
    conus_mean: float = 20.8  # conus tip, continuous disc coordinate (21 = the L1-L2 disc)
    conus_sd: float = 0.6  # puts 95 % of conus tips between mid-T12 and L2
    min_confidence: float = 0.9
    max_residual_sd: float = 3.5  # worst single-gap misfit (in sd) still accepted
    min_fit_p: float = 1e-3  # chi-square goodness of fit of the best labelling (gaps + scale)
    edge_margin_mm: float = 10.0  # a disc this close to the field of view's edge may go undetected
    edge_sd_mm: float = 5.0  # uncertainty of where the edge cuts (curvature, extrapolation)
    closed_prob: float = 0.9  # an end counts as closed (sacrum / C2 seen) above this visibility
    anchor_lr: float = 20.0  # weight of an anchor flag for L5-S1 / C2-C3 at its end (math.inf: fixed)


class DiscIdentification(NamedTuple):
    """``values`` (inferior first, same order as the points) or None, confidence, reason, and whether
    the count was anchored at the sacrum (L5-S1) / the top of the spine (C2-C3)."""

    values: tuple[int, ...] | None
    confidence: float
    reason: str
    sacrum_anchored: bool = False
    top_anchored: bool = False


def identify_discs(
    disc_points_mm: np.ndarray, sacrum_in_view: bool, top_in_view: bool,
    conus_tip_mm: np.ndarray | None = None, *, room_mm: tuple[float, float] | None = None,
    config: IdentifyConfig = IdentifyConfig(),
) -> DiscIdentification:
    """Give detected discs their SCT values, with a confidence; skip when not trustworthy.

    ``disc_points_mm`` are the detected discs ordered inferior -> superior along the cord.
    A chain model scores every labelling with strictly decreasing values: each gap between
    consecutive detections must match the typical spacing of the vertebrae it spans (times
    one overall spine scale), a gap spanning several vertebrae costs a missed detection, and
    the conus tip, when given, prefers to lie near the L1-L2 disc. When the sacrum is in view
    (``sacrum_in_view``, from an anchor output) the lowest detection is L5-S1 (counting up) with a
    likelihood ratio of ``config.anchor_lr`` against every other value; the same for the top of
    the spine and C2-C3 (counting down). So an anchor that fires at the wrong place (a spine model
    whose anchor output also fires along the thoracic spine) is outweighed by the spacings and the
    conus instead of forcing a confident wrong count. Without anchors only the spacing priors and
    the conus speak.
    ``room_mm = (below, above)``, the distance (mm) from the lowest / highest detection to the
    field of view's edge along the chain (:func:`fov_room_mm`), makes the ends of the chain
    evidence too: a labelling that puts real discs (C2-C3 to L5-S1) inside that room, more than
    ``config.edge_margin_mm`` from the edge, counts each as a missed detection. So a long
    disc-free stretch below the lowest disc (the sacrum) favours L5-S1 and one above the highest
    (C2, C1 and the skull base) favours C2-C3; when the next disc beyond would have been seen
    with probability >= ``config.closed_prob``, that end counts as an anchor.
    The confidence is the smallest posterior probability among the chosen identities; below
    ``config.min_confidence``, when the best labelling still misfits the spacings, or when it
    needs undetected discs while neither the sacrum nor C2 is in view, the values are None and
    the reason says why.
    """
    points = np.asarray(disc_points_mm, dtype=float).reshape(-1, 3)
    n = len(points)
    if n == 0:
        return DiscIdentification(None, 0.0, "no discs detected")
    lowest, highest = config.bottom_value, config.top_value
    if n > lowest - highest + 1:
        span = f"{disc_name(highest)} to {disc_name(lowest)}"
        return DiscIdentification(None, 0.0, f"{n} discs detected, more than exist from {span}")
    room = None if room_mm is None else (float(room_mm[0]), float(room_mm[1]))
    how = _how(sacrum_in_view, top_in_view, conus_tip_mm is not None, lowest, highest)

    states = np.arange(highest, lowest + 1)  # candidate values
    gaps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    if np.any(gaps < 1e-6):
        return DiscIdentification(None, 0.0, "two detected discs coincide")
    chain_pos = _arc_lengths(points)
    conus_pos = None
    if conus_tip_mm is not None:
        conus = np.asarray(conus_tip_mm, dtype=float).reshape(3)
        if n > 1:
            conus_pos = float(_closest_on_polyline(conus, points, extrapolate=True)[0][0])
        else:  # one disc: the conus is above or below it (scanner z is superior in RAS)
            conus_pos = float(np.sign(conus[2] - points[0, 2]) * np.linalg.norm(conus - points[0]))

    against = -math.log(config.anchor_lr)  # an anchor flag's weight against the other values
    first = np.where(states == lowest, 0.0, against) if sacrum_in_view else np.zeros(len(states))
    last = np.where(states == highest, 0.0, against) if top_in_view else np.zeros(len(states))

    miss = math.log(config.miss_prob)
    log_scales = np.linspace(-3 * config.scale_sd, 3 * config.scale_sd, 31)
    best = (-np.inf, None)
    log_evidence = []
    marginals = []
    for log_s in log_scales:
        scale = math.exp(log_s)
        unary = [np.zeros(len(states)) for _ in range(n)]
        unary[0] = unary[0] + first
        unary[-1] = unary[-1] + last
        if room is not None:
            unary[0] = unary[0] + miss * _visible_beyond(states, room[0], scale, config, below=True)
            unary[-1] = unary[-1] + miss * _visible_beyond(states, room[1], scale, config, below=False)
        pair = [_pair_log_potential(states, gaps[i], scale, config) for i in range(n - 1)]
        if conus_pos is not None:
            _add_conus_term(unary, pair, states, chain_pos, conus_pos, scale, config)
        prior = -0.5 * (log_s / config.scale_sd) ** 2
        log_z, marg = _forward_backward(unary, pair)
        log_evidence.append(log_z + prior)
        marginals.append(marg)
        score, path = _viterbi(unary, pair)
        if score + prior > best[0]:
            best = (score + prior, (path, scale))
    log_evidence = np.array(log_evidence)
    if not np.any(np.isfinite(log_evidence)) or best[1] is None:
        return DiscIdentification(None, 0.0, f"{how}: no labelling fits the detected discs")
    weights = np.exp(log_evidence - np.max(log_evidence))
    weights /= weights.sum()
    marginal = sum(w * m for w, m in zip(weights, marginals, strict=True))
    path, scale = best[1]
    values = tuple(int(states[k]) for k in path)
    confidence = float(min(marginal[i, k] for i, k in enumerate(path)))

    residuals = _spacing_residuals(values, gaps, scale, config)
    misfit = float(np.sum(residuals**2) + (math.log(scale) / config.scale_sd) ** 2)
    p_fit = float(gammaincc((len(residuals) + 1) / 2, misfit / 2))  # chi-square survival
    skipped = "identities not trustworthy, split and levels skipped"
    if len(residuals) and np.max(np.abs(residuals)) > config.max_residual_sd or p_fit < config.min_fit_p:
        why = f"disc spacing misfits the best labelling (chi-square p = {p_fit:.1e})"
        return DiscIdentification(None, confidence, f"{how}: {why}; {skipped}")
    # an end labelled L5-S1 / C2-C3 is anchored by the anchor flag or by a disc-free room beyond it
    # in which the next disc would have been seen
    flags = sacrum_in_view, top_in_view
    if room is not None:
        sacrum_in_view = sacrum_in_view or bool(_visible_beyond(
            np.array([lowest - 1]), room[0], scale, config, below=True)[0] >= config.closed_prob)
        top_in_view = top_in_view or bool(_visible_beyond(
            np.array([highest + 1]), room[1], scale, config, below=False)[0] >= config.closed_prob)
    sacrum_in_view = sacrum_in_view and values[0] == lowest
    top_in_view = top_in_view and values[-1] == highest
    how = _how(sacrum_in_view, top_in_view, conus_tip_mm is not None, lowest, highest, room)
    overruled = [name for name, flag, kept in (("sacrum", flags[0], sacrum_in_view), ("top", flags[1], top_in_view))
                 if flag and not kept]
    if overruled:
        how += f" (anchor output's {' and '.join(overruled)} outweighed by spacing and conus)"
    missed = sum(a - b - 1 for a, b in zip(values[:-1], values[1:], strict=True))
    if missed and not (sacrum_in_view or top_in_view):
        # without an anchor, a missed detection is where an off-by-one count hides (seen on
        # held-out synthetic views: confidence 1.00, every identity one level off)
        why = f"{missed} undetected disc(s) would have to be inferred without the sacrum or C2 in view"
        return DiscIdentification(None, confidence, f"{how}: {why}; {skipped}")
    if confidence < config.min_confidence:
        why = f"confidence {confidence:.2f} < {config.min_confidence:.2f}"
        return DiscIdentification(None, confidence, f"{how}: {why}; {skipped}")
    note = f", {missed} undetected disc(s) inferred" if missed else ""
    found = f"{disc_name(values[0])} to {disc_name(values[-1])}{note}"
    return DiscIdentification(values, confidence, f"{how}: {found}, confidence {confidence:.2f}",
                              bool(sacrum_in_view), bool(top_in_view))


def _how(sacrum: bool, top: bool, conus: bool, lowest: int, highest: int,
         room: tuple[float, float] | None = None) -> str:
    """How the identities were anchored, for the report."""
    anchors = []
    if sacrum:
        seen = "sacrum in view" if room is None else f"sacrum in view: no disc in the {room[0]:.0f} mm below"
        anchors.append(f"counted up from {disc_name(lowest)} ({seen})")
    if top:
        seen = ("top of the spine in view" if room is None
                else f"top of the spine in view: no disc in the {room[1]:.0f} mm above")
        anchors.append(f"counted down from {disc_name(highest)} ({seen})")
    if not anchors:
        anchors.append("spacing priors" + (" and the conus" if conus else " only"))
    return "; ".join(anchors)


def _visible_beyond(states: np.ndarray, room: float, scale: float, config: IdentifyConfig, *,
                    below: bool) -> np.ndarray:
    """Expected number of real discs (C2-C3 .. L5-S1) beyond a chain end labelled ``states`` that lie
    inside the field of view: ``room`` mm beyond it, less ``config.edge_margin_mm``."""
    pos = _TEMPLATE_POS[states - FIRST_DISC]
    others = np.arange(config.top_value, config.bottom_value + 1)
    opos = _TEMPLATE_POS[others - FIRST_DISC]
    dist = scale * ((opos[None, :] - pos[:, None]) if below else (pos[:, None] - opos[None, :]))
    sd = np.sqrt((config.spacing_rel_sd * dist) ** 2 + config.edge_sd_mm**2)
    seen = ndtr((room - config.edge_margin_mm - dist) / sd)
    return np.sum(np.where(dist > 0, seen, 0.0), axis=1)


def _expected_gap(states: np.ndarray, scale: float) -> np.ndarray:
    """Expected distance between disc a (rows, inferior) and disc b (columns) at ``scale``."""
    pos = _TEMPLATE_POS[states - FIRST_DISC]
    return scale * (pos[:, None] - pos[None, :])


def _gap_sd(expected: np.ndarray, config: IdentifyConfig) -> np.ndarray:
    """sd of log(gap / expected): relative anatomical variation plus detection error."""
    safe = np.maximum(expected, 1e-6)
    return np.sqrt(config.spacing_rel_sd**2 + 2 * (config.position_sd_mm / safe) ** 2)


def _pair_log_potential(states: np.ndarray, gap: float, scale: float, config: IdentifyConfig) -> np.ndarray:
    expected = _expected_gap(states, scale)
    valid = states[:, None] > states[None, :]
    sd = _gap_sd(expected, config)
    z = np.log(gap / np.maximum(expected, 1e-6)) / sd
    skipped = states[:, None] - states[None, :] - 1
    out = -0.5 * z**2 - np.log(sd) + skipped * math.log(config.miss_prob)
    return np.where(valid, out, -np.inf)


def _add_conus_term(unary, pair, states, chain_pos, conus_pos, scale, config) -> None:
    """Add log p(conus position | labelling) to the factor that covers the conus."""
    pos = _TEMPLATE_POS[states - FIRST_DISC]

    def log_prior(template_pos):
        coord = _template_to_coordinate(template_pos)
        return -0.5 * ((coord - config.conus_mean) / config.conus_sd) ** 2

    if conus_pos <= chain_pos[0]:  # below the lowest detection
        unary[0] += log_prior(pos + (chain_pos[0] - conus_pos) / scale)
    elif conus_pos >= chain_pos[-1]:  # above the highest detection
        unary[-1] += log_prior(pos - (conus_pos - chain_pos[-1]) / scale)
    else:
        i = int(np.searchsorted(chain_pos, conus_pos) - 1)
        f = (conus_pos - chain_pos[i]) / (chain_pos[i + 1] - chain_pos[i])
        between = pos[:, None] - f * (pos[:, None] - pos[None, :])
        pair[i] = pair[i] + log_prior(between)


def _template_to_coordinate(template_pos: np.ndarray) -> np.ndarray:
    """Continuous disc coordinate of a template position, linearly extrapolated past the ends."""
    t = np.asarray(template_pos, dtype=float)
    inside = np.interp(t, _TEMPLATE_POS, _TEMPLATE_VALUES)
    first_step = _TEMPLATE_POS[1] - _TEMPLATE_POS[0]
    last_step = _TEMPLATE_POS[-1] - _TEMPLATE_POS[-2]
    below = _TEMPLATE_VALUES[-1] + (t - _TEMPLATE_POS[-1]) / last_step
    above = _TEMPLATE_VALUES[0] + (t - _TEMPLATE_POS[0]) / first_step
    return np.where(t > _TEMPLATE_POS[-1], below, np.where(t < _TEMPLATE_POS[0], above, inside))


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - m_safe), axis=axis, keepdims=True)) + m_safe
    return np.squeeze(out, axis=axis)


def _forward_backward(unary, pair) -> tuple[float, np.ndarray]:
    """log partition function and (n, states) posterior marginals of the chain."""
    n = len(unary)
    alpha = [unary[0]]
    for i in range(n - 1):
        alpha.append(_logsumexp(alpha[-1][:, None] + pair[i], axis=0) + unary[i + 1])
    beta = [np.zeros_like(unary[-1])]
    for i in range(n - 2, -1, -1):
        beta.insert(0, _logsumexp(pair[i] + (unary[i + 1] + beta[0])[None, :], axis=1))
    log_z = float(_logsumexp(alpha[-1], axis=0))
    if not np.isfinite(log_z):
        return log_z, np.zeros((n, len(unary[0])))
    marg = np.exp(np.array(alpha) + np.array(beta) - log_z)
    return log_z, marg


def _viterbi(unary, pair) -> tuple[float, list[int]]:
    n = len(unary)
    score = unary[0]
    back = []
    for i in range(n - 1):
        total = score[:, None] + pair[i]
        back.append(np.argmax(total, axis=0))
        score = np.max(total, axis=0) + unary[i + 1]
    k = int(np.argmax(score))
    best = float(score[k])
    path = [k]
    for i in range(n - 2, -1, -1):
        k = int(back[i][k])
        path.insert(0, k)
    return best, path


def _spacing_residuals(
    values: Sequence[int], gaps: np.ndarray, scale: float, config: IdentifyConfig
) -> np.ndarray:
    """Standardised log misfit of each detected gap under a labelling and scale."""
    pos = _TEMPLATE_POS[np.asarray(values) - FIRST_DISC]
    expected = scale * (pos[:-1] - pos[1:])
    return np.log(gaps / expected) / _gap_sd(expected, config)


# --------------------------------------------------------------------------------------
# From the coarse spine model's heatmaps to identified discs
# --------------------------------------------------------------------------------------


class AutoDiscs(NamedTuple):
    """Result of :func:`discs_from_heatmaps`: detected points (inferior first), their scores, the
    identification (values None when skipped) and what the anchor channel showed."""

    points_mm: np.ndarray
    scores: np.ndarray
    identification: DiscIdentification
    sacrum_in_view: bool
    top_in_view: bool

    def labels(self, affine: np.ndarray) -> list[DiscLabel]:
        """Identified discs as :class:`DiscLabel` on the grid of ``affine`` (empty when skipped)."""
        if self.identification.values is None:
            return []
        return make_disc_labels(self.identification.values, self.points_mm, affine)


def fov_room_mm(points_mm: np.ndarray, shape: Sequence[int], affine: np.ndarray) -> tuple[float, float]:
    """``(below, above)``: distance (mm) from the lowest / highest of the discs ``points_mm`` (ordered
    inferior first) to the edge of the field of view (voxel grid ``shape``, ``affine``), going on
    along the chain (its end segment; straight down / up for a single disc)."""
    points = np.asarray(points_mm, dtype=float).reshape(-1, 3)
    if len(points) == 0:
        raise ValueError("fov_room_mm needs at least one disc")
    inv = np.linalg.inv(np.asarray(affine, dtype=float))
    upper = np.asarray(shape[:3], dtype=float) - 0.5
    room = []
    for end, neighbour, sign in ((0, 1, -1.0), (-1, -2, 1.0)):
        direction = points[end] - points[neighbour] if len(points) > 1 else np.array([0.0, 0.0, sign])
        direction = inv[:3, :3] @ (direction / np.linalg.norm(direction))  # voxels per mm
        origin = inv[:3, :3] @ points[end] + inv[:3, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            exits = np.where(direction > 0, (upper - origin) / direction, (-0.5 - origin) / direction)
        exits = exits[np.abs(direction) > 1e-12]
        room.append(float(max(0.0, exits.min())) if len(exits) else 0.0)
    return room[0], room[1]


def _blobs(mask: np.ndarray, affine: np.ndarray, min_volume_mm3: float):
    """Yield ``(voxel indices (K, 3), scanner mm (K, 3))`` of each connected blob of ``mask`` of
    at least ``min_volume_mm3``."""
    aff = np.asarray(affine, float)
    voxel_mm3 = float(abs(np.linalg.det(aff[:3, :3])))
    lab, _ = ndimage.label(mask)
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        idx = np.argwhere(lab[sl] == i) + [s.start for s in sl]
        if len(idx) * voxel_mm3 >= min_volume_mm3:
            yield idx, idx @ aff[:3, :3].T + aff[:3, 3]


def _anchor_blobs(anchor_heat: np.ndarray, affine: np.ndarray, threshold: float, min_volume_mm3: float,
                  max_points: int = 400) -> list[np.ndarray]:
    """Voxel positions (mm, at most ``max_points`` each) of the anchor heatmap's blobs above ``threshold``."""
    return [mm[:: max(1, len(mm) // max_points)]
            for _, mm in _blobs(np.asarray(anchor_heat) >= threshold, affine, min_volume_mm3)]


#: distance (mm) from a disc's posterior edge to the canal axis below the conus, measured on the
#: synthetic engine's label maps (PAM50 and phantom); above the conus the cord itself is used
EDGE_TO_CANAL_MM = 14.5


def _chain_tangents(points: np.ndarray) -> np.ndarray:
    """Unit tangents of the chain of disc centres (ordered inferior first); +z for a single disc."""
    n = len(points)
    if n < 2:
        return np.tile([0.0, 0.0, 1.0], (n, 1))
    t = np.gradient(points, axis=0)
    return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)


def _posterior(tangent: np.ndarray) -> np.ndarray:
    """The posterior direction (RAS -y) made perpendicular to ``tangent``."""
    back = np.array([0.0, -1.0, 0.0])
    u = back - np.dot(back, tangent) * tangent
    return u / max(float(np.linalg.norm(u)), 1e-9)


def _drop_crowded(along: np.ndarray, scores: np.ndarray, min_ratio: float) -> np.ndarray:
    """Indices (sorted) of a chain of positions ``along`` (ascending) after removing, while any
    gap is shorter than ``min_ratio`` x the median of the neighbouring gaps, the lower-scoring
    disc of the shortest such gap (a blob between two discs, or beside one, is not a disc)."""
    keep = list(range(len(along)))
    while len(keep) >= 4:
        pos = along[keep]
        gaps = np.diff(pos)
        local = np.array([np.median(np.delete(gaps[max(0, i - 2):i + 3], min(i, 2))) for i in range(len(gaps))])
        ratio = gaps / np.maximum(local, 1e-6)
        i = int(np.argmin(ratio))
        if ratio[i] >= min_ratio:
            break
        a, b = keep[i], keep[i + 1]
        keep.remove(a if scores[a] < scores[b] else b)
    return np.asarray(keep, dtype=int)


def disc_points_from_probability(
    prob: np.ndarray, affine: np.ndarray, centerline=None, *, threshold: float = 0.5,
    min_volume_mm3: float = 150.0, min_separation_mm: float = 8.0, max_cord_distance_mm: float = 45.0,
    max_line_distance_mm: float = 60.0, min_gap_ratio: float = 0.55, max_behind_mm: float = 10.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Disc points from a disc-tissue probability map: ``(points_mm (K, 3), scores (K,))``, inferior first.

    Each connected blob above ``threshold`` of at least ``min_volume_mm3`` is one disc (of two
    blobs closer than ``min_separation_mm`` along the spine, one disc split in two, the larger
    is kept); the score is its mean probability. With a centerline, blobs whose centre lies
    farther than ``max_line_distance_mm`` from it (extended straight beyond its ends), or more than
    ``max_behind_mm`` behind it (posterior elements, paraspinal fat: discs lie in front of the canal), are not
    discs of this spine. Discs are regularly spaced: while a gap between neighbours is shorter
    than ``min_gap_ratio`` x the median of the nearby gaps, the lower-scoring disc of that gap
    is dropped (at least four discs needed). The SCT convention puts disc labels on the canal
    axis, so each blob is moved there:

    - within the cord's extent: the centerline point closest to the blob's centre (blobs
      farther than ``max_cord_distance_mm`` from the cord are dropped);
    - beyond it (below the conus, where no cord marks the canal) and without a centerline:
      :data:`EDGE_TO_CANAL_MM` behind the blob's posterior edge (95th percentile along the
      posterior direction, made perpendicular to the chain of disc centres). The cord is not
      used to calibrate this: it may lie off the canal axis (supine scans).
    """
    prob = np.nan_to_num(np.asarray(prob, dtype=np.float32))
    if prob.ndim != 3:
        raise BadDataError(f"a disc probability map must be 3-D, got shape {prob.shape}")
    blobs, centres, scores = [], [], []
    for idx, mm in _blobs(prob >= threshold, affine, min_volume_mm3):
        w = prob[tuple(idx.T)].astype(float)
        blobs.append(mm)
        centres.append((mm * w[:, None]).sum(0) / w.sum())
        scores.append(float(w.mean()))
    if not blobs:
        return np.zeros((0, 3)), np.zeros(0)
    centres, scores = np.asarray(centres), np.asarray(scores)
    volume = np.array([len(b) for b in blobs], float)
    line = _centerline_mm(centerline) if centerline is not None else None
    if line is not None:
        key, dist, closest = _closest_on_polyline(centres, line, extrapolate=True)
        arcs = _arc_lengths(line)
        behind = np.array([np.dot(c - q, _posterior(_tangent_at_arc(line, arcs, s, 10.0)))
                           for c, q, s in zip(centres, closest, key, strict=True)])
        near = np.flatnonzero((dist <= max_line_distance_mm) & (behind <= max_behind_mm))
        centres, scores, volume, key = centres[near], scores[near], volume[near], key[near]
        blobs = [blobs[i] for i in near]
        if not blobs:
            return np.zeros((0, 3)), np.zeros(0)
    else:
        key = centres[:, 2]
    order = np.argsort(key, kind="stable")
    centres, scores, volume, blobs = centres[order], scores[order], volume[order], [blobs[i] for i in order]
    key = key[order]
    # one disc split in two: keep the larger blob
    along = key if line is not None else (_arc_lengths(centres) if len(centres) > 1 else np.zeros(1))
    kept: list[int] = []
    for i in np.argsort(-volume, kind="stable"):
        if all(abs(along[i] - along[j]) >= min_separation_mm for j in kept):
            kept.append(int(i))
    kept.sort()
    kept = [kept[i] for i in _drop_crowded(np.asarray(along[kept], float), scores[kept], min_gap_ratio)]
    centres, scores, blobs = centres[kept], scores[kept], [blobs[i] for i in kept]

    tangents = _chain_tangents(centres)
    edge = np.array([np.percentile((b - c) @ _posterior(t), 95) for b, c, t in zip(blobs, centres, tangents,
                                                                                   strict=True)])
    points = centres.copy()
    anchored = np.zeros(len(centres), dtype=bool)
    inside = np.zeros(len(centres), dtype=bool)
    if line is not None:
        position, dist, closest = _closest_on_polyline(centres, line, extrapolate=True)
        inside = (position >= arcs[0]) & (position <= arcs[-1])
        anchored = inside & (dist <= max_cord_distance_mm)
        points[anchored] = closest[anchored]
    for i in np.flatnonzero(~inside):
        points[i] = centres[i] + (edge[i] + EDGE_TO_CANAL_MM) * _posterior(tangents[i])
    ok = anchored | ~inside
    return points[ok].reshape(-1, 3), scores[ok]


def _outside_anchors(points: np.ndarray, blobs: list[np.ndarray], tol_mm: float) -> np.ndarray:
    """Mask of the detections (inferior first) that lie outside the anchors closing the chain.

    Each blob's extent is measured along the polyline through the detections (extended beyond
    its ends). A blob that reaches past the top of the chain from its upper half is C2/C1: every
    detection more than ``tol_mm`` above its lower edge is dropped; one that reaches past the
    bottom from its lower half is the sacrum: every detection more than ``tol_mm`` below its upper
    edge is dropped. The discs next to an anchor sit on its edge, within ``tol_mm``. Blobs inside
    the chain are ignored: no anchor lies there, so such a blob is the model's error, and it must
    not delete discs (seen with a spine model whose anchor output fired along the thoracic spine).
    """
    keep = np.ones(len(points), bool)
    if len(points) < 2 or not blobs:
        return keep
    arcs = _arc_lengths(points)
    middle = 0.5 * (arcs[0] + arcs[-1])
    for blob in blobs:
        pos = _closest_on_polyline(blob, points, extrapolate=True)[0]
        lo, hi = float(pos.min()), float(pos.max())
        if hi > arcs[-1] and lo > middle:        # closes the top of the chain
            keep &= ~(arcs > lo + tol_mm)
        if lo < arcs[0] and hi < middle:         # closes the bottom
            keep &= ~(arcs < hi - tol_mm)
    return keep


def discs_from_heatmaps(
    disc_heat: np.ndarray, anchor_heat: np.ndarray | None, affine: np.ndarray, centerline=None,
    conus_tip_mm: np.ndarray | None = None, *, threshold: float = 0.5, anchor_threshold: float = 0.5,
    min_anchor_mm3: float = 300.0, anchor_gap_mm: float = 15.0, inside_tol_mm: float = 3.0,
    fov_evidence: bool = True, config: IdentifyConfig = IdentifyConfig(),
) -> AutoDiscs:
    """Detected and identified discs from the disc-tissue and anchor maps (same grid, ``affine``).

    Discs are the blobs of ``disc_heat`` (:func:`disc_points_from_probability`). The anchors are
    bone where no disc can be: C2 with C1 (the top of the spine) and the sacrum. An anchor blob that
    closes an end of the chain of discs drops the detections more than ``inside_tol_mm`` inside or
    beyond it (:func:`_outside_anchors`): the coarse model sees disc-like gaps in the C1/C2 block
    and the sacrum (``docs/results/levels_identity_diagnosis.md``). Then an anchor
    blob of at least ``min_anchor_mm3`` that starts within ``anchor_gap_mm`` below the lowest disc
    (along the line through the discs) means the sacrum is in view; one that starts within that
    distance above the highest disc means the top of the spine (C2) is. Identities then come from
    :func:`identify_discs`, with ``fov_evidence`` the disc-free room between the chain's ends and
    the edge of the heatmaps' field of view (:func:`fov_room_mm`): no disc detected in a long
    stretch below the lowest disc is the sacrum's signature, above the highest one C2's.
    """
    points, scores = disc_points_from_probability(disc_heat, affine, centerline, threshold=threshold)
    sacrum = top = False
    if anchor_heat is not None and len(points):
        blobs = _anchor_blobs(anchor_heat, affine, anchor_threshold, min_anchor_mm3)
        keep = _outside_anchors(points, blobs, inside_tol_mm)
        points, scores = points[keep], scores[keep]
        if len(points):
            line = points if len(points) > 1 else np.vstack([points[0] - [0, 0, 1.0], points[0]])
            arcs = _arc_lengths(line)
            for blob in blobs:
                pos = _closest_on_polyline(blob, line, extrapolate=True)[0]
                if pos.max() < arcs[0] + 5.0 and arcs[0] - pos.max() <= anchor_gap_mm:
                    sacrum = True
                if pos.min() > arcs[-1] - 5.0 and pos.min() - arcs[-1] <= anchor_gap_mm:
                    top = True
    room = fov_room_mm(points, np.shape(disc_heat), affine) if fov_evidence and len(points) else None
    ident = identify_discs(points, sacrum, top, conus_tip_mm, room_mm=room, config=config)
    sacrum, top = sacrum or ident.sacrum_anchored, top or ident.top_anchored
    return AutoDiscs(points, scores, ident, bool(sacrum), bool(top))
