"""Post-processing of cord probabilities/masks on the working RAS grid (pure numpy/scipy).

Order used by the pipeline: :func:`binarise` -> :func:`keep_cord_components` ->
:func:`fill_holes_axial` -> :func:`trim_below`. Axis 2 is inferior -> superior.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_FULL = ndimage.generate_binary_structure(3, 3)  # 26-connectivity


def binarise(prob: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 0/1 mask of ``prob > threshold``."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    return (np.asarray(prob) > threshold).astype(np.uint8)


@dataclass(frozen=True)
class _Component:
    label: int
    size: int
    zmin: int
    zmax: int


def _components(mask: np.ndarray) -> tuple[np.ndarray, list[_Component]]:
    labels, n = ndimage.label(mask, structure=_FULL)
    if n == 0:
        return labels, []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    comps = []
    for label, sl in enumerate(ndimage.find_objects(labels), start=1):
        comps.append(_Component(label, int(sizes[label]), int(sl[2].start), int(sl[2].stop - 1)))
    return labels, comps


def _footprint(labels: np.ndarray, wanted: np.ndarray, k: int) -> np.ndarray:
    """In-plane footprint (2-D boolean) of the voxels whose label is in ``wanted`` at slice k."""
    return np.isin(labels[:, :, k], wanted)


def _touches(a: np.ndarray, b: np.ndarray, margin_vox: tuple[int, int]) -> bool:
    """True when footprint ``b`` overlaps footprint ``a`` dilated by ``margin_vox`` (x, y)."""
    if not a.any() or not b.any():
        return False
    rx, ry = margin_vox
    structure = np.ones((2 * rx + 1, 2 * ry + 1), bool)
    return bool(np.logical_and(ndimage.binary_dilation(a, structure=structure), b).any())


def keep_cord_components(
    mask: np.ndarray, spacing, gap_tolerance_mm: float = 15.0, inplane_margin_mm: float = 3.0
) -> np.ndarray:
    """Keep the cord: the largest 26-connected component plus the components that continue it.

    A component is added (repeatedly, largest first) when it extends the kept set beyond its
    superior or inferior end, starts within ``gap_tolerance_mm`` of that end along S (an overlap
    of up to the same amount is accepted), and its facing end slice overlaps the kept set's end
    slice in-plane once that is dilated by ``inplane_margin_mm``. Everything else (blobs beside
    the cord, fragments inside its S-I range, far-away false positives) is removed.
    """
    m = np.asarray(mask) != 0
    labels, comps = _components(m)
    if len(comps) <= 1:
        return m.astype(np.uint8)
    sx, sy, sz = (float(s) for s in spacing)
    gap_vox = gap_tolerance_mm / sz
    margin = (int(np.ceil(inplane_margin_mm / sx)), int(np.ceil(inplane_margin_mm / sy)))
    comps.sort(key=lambda c: c.size, reverse=True)
    kept = [comps[0]]
    candidates = comps[1:]
    changed = True
    while changed:
        changed = False
        top = max(c.zmax for c in kept)
        bottom = min(c.zmin for c in kept)
        kept_labels = np.array([c.label for c in kept])
        for comp in candidates:
            above = comp.zmax > top and -gap_vox <= comp.zmin - top - 1 <= gap_vox
            below = comp.zmin < bottom and -gap_vox <= bottom - comp.zmax - 1 <= gap_vox
            if above:
                ok = _touches(
                    _footprint(labels, kept_labels, top), labels[:, :, comp.zmin] == comp.label, margin
                )
            elif below:
                ok = _touches(
                    _footprint(labels, kept_labels, bottom), labels[:, :, comp.zmax] == comp.label, margin
                )
            else:
                ok = False
            if ok:
                kept.append(comp)
                candidates = [c for c in candidates if c.label != comp.label]
                changed = True
                break
    return np.isin(labels, [c.label for c in kept]).astype(np.uint8)


def fill_holes_axial(mask: np.ndarray) -> np.ndarray:
    """Fill holes in each axial plane ``[:, :, k]`` (2-D, so the cord's open ends are not a problem)."""
    m = np.asarray(mask) != 0
    out = np.zeros_like(m)
    for k in np.nonzero(m.any(axis=(0, 1)))[0]:
        out[:, :, k] = ndimage.binary_fill_holes(m[:, :, k])
    return out.astype(np.uint8)


def trim_below(mask: np.ndarray, conus_tip_vox, spacing, margin_mm: float = 10.0) -> np.ndarray:
    """Remove what lies more than ``margin_mm`` below the conus tip along S (working grid).

    Slices ``k`` with ``(tip_z - k) * sz > margin_mm`` are cleared. With no tip (None), the mask
    is returned unchanged.
    """
    m = (np.asarray(mask) != 0).astype(np.uint8)
    if conus_tip_vox is None:
        return m
    tip_z = float(np.asarray(conus_tip_vox, dtype=np.float64)[2])
    sz = float(spacing[2])
    ks = np.arange(m.shape[2])
    below = (tip_z - ks) * sz > margin_mm + 1e-9
    m[:, :, below] = 0
    return m
