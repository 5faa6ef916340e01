"""Training targets derived from a synthetic sample, one channel each (pure numpy).

The coarse "spine" model predicts several maps at once from one whole field of view:

- ``cord``: the cord mask (centerline and conus tip come from it);
- ``discs``: the intervertebral disc tissue (annulus and nucleus labels), a volume the network
  learns like any segmentation (small balls around the SCT disc points were tried first and
  did not start to learn in 150 steps, so they were removed); :func:`bids_app.levels.disc_points_from_probability`
  turns its blobs into SCT-convention points on the cord;
- ``anchors``: the bone that fixes disc identities when it is in view: the top of the spine
  (C2 with C1 above it, the bone above the highest disc, C2-C3) and the sacrum (below the
  lowest, L5-S1). Which one a blob is follows from its position relative to the detected discs.
  The top anchor is the whole block above C2-C3, not C2 alone: no disc separates C1 from C2, so
  a C2-only target ended at a plane through uniform bone that no image shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bids_app.synth.labels import LABELS

TARGETS: tuple[str, ...] = ("cord", "discs", "anchors")
FIRST_VISIBLE_DISC = 3      # C2-C3
LAST_DISC = 25              # L5-S1
C2_RADIUS_MM = 35.0         # lateral reach of the top anchor around the canal axis (C1 is wide)


def _zooms(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


def _to_vox(affine: np.ndarray, pts_mm: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(np.asarray(affine, float))
    return np.asarray(pts_mm, float).reshape(-1, 3) @ inv[:3, :3].T + inv[:3, 3]


def _local_axis(centerline_mm: np.ndarray, near: np.ndarray) -> np.ndarray:
    """Unit superior direction of the centerline near ``near`` (scanner +z when unknown)."""
    line = np.asarray(centerline_mm, float).reshape(-1, 3)
    if len(line) < 2:
        return np.array([0.0, 0.0, 1.0])
    i = int(np.argmin(np.linalg.norm(line - near, axis=1)))
    a, b = line[max(i - 10, 0)], line[min(i + 10, len(line) - 1)]
    d = b - a
    if np.linalg.norm(d) < 1e-6:
        return np.array([0.0, 0.0, 1.0])
    d = d / np.linalg.norm(d)
    return d if d[2] >= 0 else -d


def c2_target(labels: np.ndarray, affine: np.ndarray, discs, centerline_mm: np.ndarray) -> np.ndarray:
    """Bone voxels (body + posterior elements) of the top of the spine: C2 and C1, everything above
    the C2-C3 disc point (within :data:`C2_RADIUS_MM` of the canal axis).

    Empty when the C2-C3 disc is not in view. C1 is included because nothing in the image
    separates it from C2 (there is no C1-C2 disc: the two form one block of bone), so a
    target cut at the C1-C2 point could not be learnt from the image.
    """
    by_value = {int(v): np.asarray(p, float) for v, p in discs}
    if FIRST_VISIBLE_DISC not in by_value:
        return np.zeros(labels.shape, dtype=np.uint8)
    bottom = by_value[FIRST_VISIBLE_DISC]
    axis = _local_axis(centerline_mm, bottom)
    bone = np.isin(labels, (LABELS["vertebral_body"], LABELS["posterior_elements"]))
    idx = np.argwhere(bone)
    out = np.zeros(labels.shape, dtype=np.uint8)
    if len(idx) == 0:
        return out
    aff = np.asarray(affine, float)
    mm = idx @ aff[:3, :3].T + aff[:3, 3] - bottom
    along = mm @ axis
    lateral = np.linalg.norm(mm - np.outer(along, axis), axis=1)
    keep = (along >= 0) & (lateral <= C2_RADIUS_MM)
    out[tuple(idx[keep].T)] = 1
    return out


def anchor_target(labels: np.ndarray, affine: np.ndarray, discs, centerline_mm: np.ndarray) -> np.ndarray:
    """The top of the spine (C2 with C1) and the sacrum, one binary channel."""
    sacrum = (labels == LABELS["sacrum"]).astype(np.uint8)
    return sacrum | c2_target(labels, affine, discs, centerline_mm)


def disc_tissue_target(labels: np.ndarray) -> np.ndarray:
    """Intervertebral disc tissue (annulus + nucleus) as a binary uint8 volume."""
    return np.isin(labels, (LABELS["disc_annulus"], LABELS["disc_nucleus"])).astype(np.uint8)


def target_channels(sample, targets: Sequence[str] = TARGETS) -> np.ndarray:
    """(X, Y, Z, C) uint8 targets of a :class:`~bids_app.synth.generator.SynthSample`."""
    chans = []
    for name in targets:
        if name == "cord":
            chans.append(np.asarray(sample.cord, np.uint8))
        elif name == "discs":
            chans.append(disc_tissue_target(sample.labels))
        elif name == "anchors":
            chans.append(anchor_target(sample.labels, sample.affine, sample.discs, sample.centerline_mm))
        else:
            raise ValueError(f"unknown training target {name!r}; expected one of {TARGETS}")
    return np.stack(chans, axis=-1)
