"""SynthSeg-style intensities and MR acquisition artefacts.

Each label gets a random Gaussian mean/std.  Contrast presets constrain the means to the
ordering seen on real scans (T2w: CSF bright, cord darker; T1w: cord brighter than CSF;
T2*w: CSF bright, grey matter brighter than white matter, dark bone); ``"random"`` draws
every tissue freely.  Artefacts: bias field, gamma, Rician noise, blur, ghosting, motion
and wrap-around.  All functions take an explicit ``np.random.Generator``.
"""

from __future__ import annotations

import numpy as np

from bids_app.synth.labels import BACKGROUND_BLOB_FIRST, LABELS, N_BACKGROUND_BLOBS, N_LABELS

CONTRASTS = ("T2w", "T1w", "T2starw", "random")

# (low, high) of the mean intensity per tissue for each preset (scale ~[0, 1]).
_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "T2w": {
        "cord": (0.22, 0.42), "cord_gm": (0.25, 0.48), "csf": (0.75, 1.0), "filum": (0.15, 0.4),
        "cauda_equina": (0.12, 0.38), "vertebral_body": (0.25, 0.55), "posterior_elements": (0.2, 0.5),
        "disc_annulus": (0.08, 0.3), "disc_nucleus": (0.2, 0.85), "epidural_fat": (0.45, 0.8),
        "paraspinal_muscle": (0.1, 0.25), "subcutaneous_fat": (0.55, 0.9), "sacrum": (0.25, 0.55),
        "ligament": (0.02, 0.12), "air": (0.0, 0.03), "body_tissue": (0.1, 0.6), "blob": (0.05, 0.7),
    },
    "T1w": {
        "cord": (0.45, 0.65), "cord_gm": (0.4, 0.6), "csf": (0.05, 0.22), "filum": (0.35, 0.6),
        "cauda_equina": (0.35, 0.6), "vertebral_body": (0.45, 0.8), "posterior_elements": (0.4, 0.75),
        "disc_annulus": (0.25, 0.45), "disc_nucleus": (0.25, 0.5), "epidural_fat": (0.7, 1.0),
        "paraspinal_muscle": (0.25, 0.42), "subcutaneous_fat": (0.75, 1.0), "sacrum": (0.45, 0.8),
        "ligament": (0.02, 0.12), "air": (0.0, 0.03), "body_tissue": (0.2, 0.7), "blob": (0.1, 0.8),
    },
    "T2starw": {
        "cord": (0.25, 0.42), "cord_gm": (0.45, 0.65), "csf": (0.7, 1.0), "filum": (0.2, 0.45),
        "cauda_equina": (0.2, 0.45), "vertebral_body": (0.05, 0.3), "posterior_elements": (0.05, 0.3),
        "disc_annulus": (0.2, 0.5), "disc_nucleus": (0.3, 0.7), "epidural_fat": (0.2, 0.5),
        "paraspinal_muscle": (0.15, 0.35), "subcutaneous_fat": (0.3, 0.6), "sacrum": (0.05, 0.3),
        "ligament": (0.02, 0.12), "air": (0.0, 0.03), "body_tissue": (0.1, 0.6), "blob": (0.05, 0.7),
    },
}


def label_means(rng: np.random.Generator, contrast: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-label (mean, std) arrays of length ``N_LABELS`` for ``contrast``."""
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
    means = rng.uniform(0.0, 1.0, N_LABELS)
    if contrast != "random":
        preset = _PRESETS[contrast]
        for name, value in LABELS.items():
            lo, hi = preset[name] if name in preset else preset["blob"]
            means[value] = rng.uniform(lo, hi)
        lo, hi = preset["blob"]
        means[BACKGROUND_BLOB_FIRST:BACKGROUND_BLOB_FIRST + N_BACKGROUND_BLOBS] = rng.uniform(lo, hi, N_BACKGROUND_BLOBS)
        # keep the cord / CSF contrast visible whatever the draws
        if contrast == "T1w":
            means[LABELS["csf"]] = min(means[LABELS["csf"]], means[LABELS["cord"]] - 0.2)
        else:
            means[LABELS["csf"]] = max(means[LABELS["csf"]], means[LABELS["cord"]] + 0.3)
    else:
        # fully random, but the cord must differ from CSF
        if abs(means[LABELS["cord"]] - means[LABELS["csf"]]) < 0.2:
            means[LABELS["csf"]] = (means[LABELS["cord"]] + 0.5) % 1.0
    means[LABELS["air"]] = rng.uniform(0.0, 0.03)
    stds = rng.uniform(0.005, 0.04, N_LABELS)
    stds[LABELS["csf"]] = rng.uniform(0.005, 0.03)
    return means.astype(np.float32), stds.astype(np.float32)


def linear_axis(arr: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``arr`` along ``axis`` at fractional indices ``pos`` (clamped)."""
    n = arr.shape[axis]
    pos = np.clip(np.asarray(pos, np.float64), 0, n - 1)
    i0 = np.minimum(np.floor(pos).astype(int), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    w = (pos - i0).astype(np.float32)
    shp = [1] * arr.ndim
    shp[axis] = len(pos)
    w = w.reshape(shp)
    return np.take(arr, i0, axis=axis) * (1 - w) + np.take(arr, i1, axis=axis) * w


def upsample(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Stretch a small lattice over ``shape`` by separable linear interpolation (fast)."""
    out = coarse.astype(np.float32)
    for a, n in enumerate(shape):
        out = linear_axis(out, a, np.linspace(0, coarse.shape[a] - 1, n))
    return out


def bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(N(0, strength)) from a 4x4x4 lattice."""
    coarse = rng.normal(0.0, strength, (4, 4, 4)).astype(np.float32)
    return np.exp(upsample(coarse, shape)).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing, scale_mm: float) -> np.ndarray:
    """Zero-mean, unit-std-ish smooth random field with features of about ``scale_mm``."""
    n = [max(2, int(np.ceil(sh * sp / scale_mm)) + 1) for sh, sp in zip(shape, spacing, strict=True)]
    return upsample(rng.standard_normal(n).astype(np.float32), shape)


def rician_noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise of std ``sigma``."""
    n1 = rng.normal(0.0, sigma, img.shape).astype(np.float32)
    n2 = rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return np.sqrt((img + n1) ** 2 + n2 ** 2)


def ghosting(rng: np.random.Generator, img: np.ndarray, axis: int) -> np.ndarray:
    """N/2-like ghosts along the phase-encode ``axis``."""
    shift = img.shape[axis] // int(rng.integers(2, 5))
    return img + rng.uniform(0.03, 0.12) * np.roll(img, shift, axis=axis)


def motion(rng: np.random.Generator, img: np.ndarray, axis: int) -> np.ndarray:
    """Rigid shifts during a fraction of the k-space lines along ``axis`` (phase encoding)."""
    k = np.fft.fftn(img)
    n = img.shape[axis]
    lines = rng.random(n) < rng.uniform(0.05, 0.3)
    if not lines.any():
        return img
    shift = rng.normal(0, 1.5)
    freq = np.fft.fftfreq(n)
    phase = np.exp(-2j * np.pi * freq * shift) * lines + (~lines)
    shp = [1] * img.ndim
    shp[axis] = n
    return np.abs(np.fft.ifftn(k * phase.reshape(shp))).astype(np.float32)


def wrap_around(rng: np.random.Generator, img: np.ndarray, axis: int) -> np.ndarray:
    """Fold part of the image from one edge onto the other (field of view too small)."""
    n = img.shape[axis]
    w = int(n * rng.uniform(0.05, 0.25))
    if w < 1:
        return img
    out = img.copy()
    src = np.take(img, np.arange(n - w, n), axis=axis)
    dst = [slice(None)] * img.ndim
    dst[axis] = slice(0, w)
    out[tuple(dst)] += rng.uniform(0.3, 0.9) * src
    return out


def normalise(img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Scale to [0, 1] by the 0.5-99.5 percentiles, then apply a random gamma when ``rng``."""
    lo, hi = np.percentile(img, [0.5, 99.5])
    out = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    if rng is not None:
        out = out ** np.float32(np.exp(rng.normal(0, 0.25)))
    return out.astype(np.float32)
