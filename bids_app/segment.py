"""Sliding-window inference with Gaussian-weighted blending and flip test-time augmentation.

Pure numpy: the network is hidden behind ``predict_fn(batch) -> probabilities`` where a batch is
``(B, X, Y, Z, 1)`` float32 and the probabilities ``(B, X, Y, Z, C)``: one channel (the cord) or
several (e.g. a "spine" model's cord, discs and anchors). Also holds the intensity normalisation
shared by training and inference (a model bundle names it in its metadata).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from bids_app.errors import UsageError

PredictFn = Callable[[np.ndarray], np.ndarray]

#: flips used by ``tta=True``: identity, then each spatial axis flipped alone.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (0,), (1,), (2,))

DEFAULT_NORMALISATION = {"method": "percentile_zscore", "percentiles": [0.5, 99.5], "scope": "patch"}


def normalise_intensity(volume: np.ndarray, spec: dict | None = None) -> np.ndarray:
    """Clip ``volume`` to its own percentiles, then z-score it (float32).

    ``spec`` is the bundle's ``normalisation`` entry; only ``percentile_zscore`` exists. A flat
    input (no contrast at all) maps to zeros rather than dividing by zero.
    """
    spec = DEFAULT_NORMALISATION if spec is None else spec
    if spec.get("method") != "percentile_zscore":
        raise UsageError(f"unknown intensity normalisation {spec.get('method')!r}")
    lo_p, hi_p = spec.get("percentiles", DEFAULT_NORMALISATION["percentiles"])
    vol = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(vol, [lo_p, hi_p])
    clipped = np.clip(vol, lo, hi)
    std = float(clipped.std())
    if std < 1e-8:
        return np.zeros_like(clipped, dtype=np.float32)
    return ((clipped - float(clipped.mean())) / std).astype(np.float32)


def normalise_batch(batch: np.ndarray, spec: dict | None = None) -> np.ndarray:
    """Apply :func:`normalise_intensity` to each patch of a ``(B, X, Y, Z, 1)`` batch."""
    out = np.empty(batch.shape, dtype=np.float32)
    for i in range(batch.shape[0]):
        out[i] = normalise_intensity(batch[i], spec)
    return out


def gaussian_weight(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Separable Gaussian importance map (max 1, strictly positive) for blending windows.

    Centre voxels of a window are trusted more than its border, where the network sees less
    context (as in nnU-Net, sigma = ``sigma_scale`` x patch size per axis).
    """
    weight = np.ones(tuple(int(p) for p in patch_size), dtype=np.float64)
    for axis, n in enumerate(patch_size):
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sigma = max(sigma_scale * n, 1e-6)
        g = np.exp(-0.5 * (x / sigma) ** 2)
        shape = [1, 1, 1]
        shape[axis] = n
        weight = weight * g.reshape(shape)
    weight /= weight.max()
    return np.maximum(weight, 1e-6)


def window_starts(length: int, patch: int, overlap: int) -> list[int]:
    """Start indices of windows of size ``patch`` covering ``[0, length)`` with >= ``overlap`` voxels.

    Windows are spread evenly; the first starts at 0 and the last ends exactly at ``length``
    (so edges are covered without padding). ``length <= patch`` gives a single window at 0.
    """
    if patch <= 0:
        raise UsageError(f"patch size must be positive, got {patch}")
    if not 0 <= overlap < patch:
        raise UsageError(f"overlap must be in [0, patch) voxels, got {overlap} for patch {patch}")
    if length <= patch:
        return [0]
    step = patch - overlap
    n = math.ceil((length - patch) / step) + 1
    return [round(i * (length - patch) / (n - 1)) for i in range(n)]


def overlap_voxels(overlap: float | int, patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Overlap per axis in voxels: an int is voxels, a float in [0, 1) a fraction of the patch."""
    if isinstance(overlap, bool):
        raise UsageError("overlap must be a number, not a boolean")
    if isinstance(overlap, int | np.integer):
        return tuple(int(overlap) for _ in patch_size)
    frac = float(overlap)
    if not 0.0 <= frac < 1.0:
        raise UsageError(f"fractional overlap must be in [0, 1), got {overlap}")
    return tuple(int(round(frac * p)) for p in patch_size)


def flip_tta(predict_fn: PredictFn, flips: Sequence[Sequence[int]] = TTA_FLIPS) -> PredictFn:
    """Wrap ``predict_fn``: average its predictions over flipped copies of the batch.

    Each flip is applied to the spatial axes of the batch, predicted, and flipped back before
    averaging, so a flip-equivariant model gives exactly its plain prediction. The channel axis
    (any number of output channels) is never flipped.
    """

    def predict(batch: np.ndarray) -> np.ndarray:
        total = None
        for axes in flips:
            spatial = tuple(a + 1 for a in axes)
            flipped = np.flip(batch, axis=spatial) if spatial else batch
            pred = np.asarray(predict_fn(np.ascontiguousarray(flipped)), dtype=np.float64)
            pred = np.flip(pred, axis=spatial) if spatial else pred
            total = pred if total is None else total + pred
        return (total / len(flips)).astype(np.float32)

    return predict


def sliding_window_predict(
    volume: np.ndarray,
    predict_fn: PredictFn,
    patch_size: Sequence[int],
    overlap: float | int = 0.5,
    tta: bool = False,
    *,
    batch_size: int = 2,
    blend: str = "gaussian",
    pad_value: float | None = None,
    roi: np.ndarray | None = None,
) -> np.ndarray:
    """Predict a whole 3-D ``volume`` window by window and blend the overlapping windows.

    ``roi`` (boolean, the volume's shape) restricts the work to the windows that contain at
    least one ROI voxel; voxels no predicted window covers get probability 0.

    ``batch_size`` windows go through the network together. The default 2 sets the peak memory of
    a whole run (benchmarks/pipeline_benchmark.py: 1.15 GiB; with 4, 1.52 GiB, the activations of
    four 64^3 windows) at the same speed on a 2-core CPU; the result does not depend on it.

    ``overlap`` is voxels (int) or a fraction of the patch (float). ``blend`` is "gaussian"
    (centre-weighted) or "mean". Axes shorter than the patch are padded symmetrically with
    ``pad_value`` (default: the volume minimum, i.e. background) and cropped back. With
    ``tta`` the prediction is averaged over flips (see :data:`TTA_FLIPS`). Returns float32
    probabilities clipped to [0, 1]: of the volume's shape ``(X, Y, Z)`` when ``predict_fn``
    returns one channel, ``(X, Y, Z, C)`` when it returns ``C > 1`` channels.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise UsageError(f"sliding_window_predict expects a 3-D volume, got shape {vol.shape}")
    if vol.size == 0:
        raise UsageError("sliding_window_predict got an empty volume")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3:
        raise UsageError(f"patch_size must have 3 entries, got {patch_size}")
    ov = overlap_voxels(overlap, patch)
    if blend not in ("gaussian", "mean"):
        raise UsageError(f"unknown blending {blend!r}")

    pad_before = [max(0, (p - s) // 2) for p, s in zip(patch, vol.shape, strict=True)]
    pad_after = [max(0, p - s - b) for p, s, b in zip(patch, vol.shape, pad_before, strict=True)]
    fill = float(vol.min()) if pad_value is None else float(pad_value)
    padded = np.pad(vol, list(zip(pad_before, pad_after, strict=True)), constant_values=fill)

    starts = [window_starts(padded.shape[a], patch[a], ov[a]) for a in range(3)]
    corners = [(i, j, k) for i in starts[0] for j in starts[1] for k in starts[2]]
    if roi is not None:
        roi = np.asarray(roi, dtype=bool)
        if roi.shape != vol.shape:
            raise UsageError(f"roi shape {roi.shape} differs from the volume's {vol.shape}")
        proi = np.pad(roi, list(zip(pad_before, pad_after, strict=True)), constant_values=False)
        corners = [c for c in corners if proi[c[0]:c[0] + patch[0], c[1]:c[1] + patch[1], c[2]:c[2] + patch[2]].any()]
    weight = gaussian_weight(patch) if blend == "gaussian" else np.ones(patch, dtype=np.float64)
    fn = flip_tta(predict_fn) if tta else predict_fn

    acc = None  # (X, Y, Z, C), allocated once the first prediction tells C
    norm = np.zeros(padded.shape, dtype=np.float64)
    if not corners:  # an ROI without voxels: nothing to predict
        return np.zeros(vol.shape, dtype=np.float32)
    for b0 in range(0, len(corners), batch_size):
        group = corners[b0 : b0 + batch_size]
        batch = np.stack(
            [padded[i : i + patch[0], j : j + patch[1], k : k + patch[2]] for i, j, k in group]
        )[..., None]
        pred = np.asarray(fn(batch), dtype=np.float64)
        if pred.ndim != 5 or pred.shape[:4] != batch.shape[:4] or pred.shape[4] < 1 or (
                acc is not None and pred.shape[4] != acc.shape[3]):
            expected = batch.shape[:4] + ("C",)
            raise UsageError(f"predict_fn returned shape {pred.shape}, expected {expected}")
        if acc is None:
            acc = np.zeros(padded.shape + (pred.shape[4],), dtype=np.float64)
        for (i, j, k), p in zip(group, pred, strict=True):
            sl = (slice(i, i + patch[0]), slice(j, j + patch[1]), slice(k, k + patch[2]))
            acc[sl] += p * weight[..., None]
            norm[sl] += weight
    out = np.divide(acc, norm[..., None], out=np.zeros_like(acc), where=norm[..., None] > 0)
    crop = tuple(slice(b, b + s) for b, s in zip(pad_before, vol.shape, strict=True))
    out = np.clip(out[crop], 0.0, 1.0).astype(np.float32)
    return np.ascontiguousarray(out[..., 0]) if out.shape[3] == 1 else out
