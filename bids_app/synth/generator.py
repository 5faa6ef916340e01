"""Synthetic spine MRI samples: whole fields of view and fast training crops.

``generate_crop`` renders only a patch around the cord at the working spacing (the
segmentation model's training data); ``generate_sample`` renders a whole field of view on
a simulated acquisition grid (sagittal, axial thick-slice or isotropic) with partial volume,
or resampled to a working spacing (e.g. a coarse 1.5 mm view for centerline and disc
models).  Both are deterministic for a given seed, work from PAM50 label maps (source A)
or a procedural phantom (source B), and return a :class:`SynthSample` in RAS scanner mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from bids_app.synth import intensity as inten
from bids_app.synth.deform import EXTRA_TOP, SpineGeometry, random_geometry
from bids_app.synth.features import DEFAULT, Features
from bids_app.synth.labels import BACKGROUND_BLOB_FIRST, CONUS_VALUE, CORD_LABELS, LABELS, N_BACKGROUND_BLOBS
from bids_app.synth.render import BodyParams, Rendered, random_body, random_roots, render
from bids_app.synth.template import (
    SpineTemplate,
    default_pam50_dir,
    load_pam50_template,
    make_phantom_template,
)

REGIONS = ("whole", "cervical", "thoracic", "thoracolumbar", "lumbosacral", "below_conus")
CROP_REGIONS = ("cervical", "thoracic", "lumbosacral", "below_conus")
#: crop regions asked for by name only (never in the default mix): patches of at least ~90 mm
#: along the cord that always hold an anchor of the spine model, the C2-C3 disc with the bone
#: above it ("craniocervical") or the L5-S1 disc with the sacrum ("sacral")
ANCHOR_CROP_REGIONS = ("craniocervical", "sacral")
SOURCES = ("phantom", "pam50")
_CORTEX = [LABELS["vertebral_body"], LABELS["posterior_elements"], LABELS["sacrum"]]


@dataclass
class SynthSample:
    """One synthetic image with its truth (see docs/ARCHITECTURE.md)."""

    image: np.ndarray                       # float32 3-D, roughly [0, 1]
    cord: np.ndarray                        # uint8 0/1
    labels: np.ndarray                      # uint8 multi-label map (synth.labels.LABELS)
    affine: np.ndarray                      # 4x4 voxel -> scanner mm (RAS)
    centerline_mm: np.ndarray               # (N, 3) inferior -> superior
    conus_tip_mm: np.ndarray | None
    discs: list[tuple[int, np.ndarray]]     # (SCT disc value, xyz mm); 60 = conus
    region: str
    contrast: str
    levels: np.ndarray | None = None        # int16 vertebra value per axial slice (0 = none)
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


# --------------------------------------------------------------------------- sources

def _resolve_template(source: str | None, pam50_dir, rng: np.random.Generator) -> tuple[SpineTemplate, str]:
    """Pick the template: PAM50 when a folder is given (or $SCT_DIR has one), else the phantom."""
    if source not in (None, "auto", *SOURCES):
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    if pam50_dir is None and source != "phantom":
        d = default_pam50_dir()
        pam50_dir = d if d is not None and d.is_dir() else None
    if source == "pam50" or (source in (None, "auto") and pam50_dir is not None):
        if pam50_dir is None:
            return make_phantom_template(), "phantom"
        if source in (None, "auto") and rng.random() < 0.15:
            return make_phantom_template(), "phantom"     # extra variety
        return load_pam50_template(Path(pam50_dir)), "pam50"
    return make_phantom_template(), "phantom"


def _pick_contrast(rng: np.random.Generator, contrast: str | None) -> str:
    if contrast is None:
        return str(rng.choice(["T2w", "T1w", "T2starw", "random"], p=[0.35, 0.25, 0.25, 0.15]))
    if contrast not in inten.CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; expected one of {inten.CONTRASTS}")
    return contrast


# --------------------------------------------------------------------------- acquisition

@dataclass(frozen=True)
class Acquisition:
    """Simulated acquisition: voxel size per RAS axis and the slice / phase axes."""

    kind: str                                # "sagittal" | "axial" | "iso"
    voxel: tuple[float, float, float]        # mm along x, y, z
    phase_axis: int


def random_acquisition(rng: np.random.Generator, contrast: str, kind: str | None = None) -> Acquisition:
    """Sagittal 3-4 mm RL slices, axial 3-7 mm slices, or isotropic 0.5-1.2 mm."""
    if kind is None:
        p = [0.25, 0.55, 0.2] if contrast == "T2starw" else [0.45, 0.3, 0.25]
        kind = str(rng.choice(["sagittal", "axial", "iso"], p=p))
    if kind == "sagittal":
        ip = rng.uniform(0.5, 1.1)
        vox = (rng.uniform(2.5, 4.0), ip, ip * rng.uniform(0.9, 1.1))
        phase = int(rng.choice([1, 2]))
    elif kind == "axial":
        ip = rng.uniform(0.3, 0.9)
        vox = (ip, ip * rng.uniform(0.9, 1.1), rng.uniform(3.0, 7.5))
        phase = int(rng.choice([0, 1]))
    elif kind == "iso":
        v = rng.uniform(0.5, 1.2)
        vox = (v, v, v)
        phase = int(rng.integers(0, 3))
    else:
        raise ValueError(f"unknown acquisition kind {kind!r}")
    return Acquisition(kind=kind, voxel=tuple(float(v) for v in vox), phase_axis=phase)


#: with ``Features(extra_tissues=False)``: tissues that take the CSF's intensity, the vertebral
#: body's (one bone intensity, like PAM50's single spine mask), or a random background blob's
_AS_CSF = ("cauda_equina", "filum")
_AS_BONE = ("posterior_elements", "sacrum")
_AS_BLOB = ("disc_annulus", "disc_nucleus", "epidural_fat", "paraspinal_muscle", "subcutaneous_fat", "ligament",
            "body_tissue")


def _plain_tissues(rng: np.random.Generator, means: np.ndarray, stds: np.ndarray) -> None:
    """Merge the engine's extra tissues into PAM50's cord / CSF / spine + background blobs (in place)."""
    pairs = [(n, LABELS["csf"]) for n in _AS_CSF] + [(n, LABELS["vertebral_body"]) for n in _AS_BONE]
    blobs = BACKGROUND_BLOB_FIRST + rng.integers(0, N_BACKGROUND_BLOBS, len(_AS_BLOB))
    pairs += [(n, int(b)) for n, b in zip(_AS_BLOB, blobs, strict=True)]
    for name, like in pairs:
        means[LABELS[name]], stds[LABELS[name]] = means[like], stds[like]


def _acquisition_for(rng: np.random.Generator, contrast: str, kind: str | None, features: Features,
                     spacing) -> Acquisition:
    """The random acquisition, or without ``features.acquisition`` an isotropic one at ``spacing``
    (the draws are made either way)."""
    acq = random_acquisition(rng, contrast, kind)
    if features.acquisition:
        return acq
    return Acquisition(kind="iso", voxel=tuple(float(v) for v in spacing), phase_axis=acq.phase_axis)


def _clean_image(rng: np.random.Generator, rend: Rendered, contrast: str, spacing,
                 features: Features = DEFAULT) -> np.ndarray:
    """Noise-free image from the rendered labels, partial volume at cord and sac edges.

    Tissues get SynthSeg-style Gaussian intensities, a smooth multiplicative texture
    (coarse and fine), and on T2-like contrasts sometimes CSF flow voids.
    """
    means, stds = inten.label_means(rng, contrast)
    if not features.extra_tissues:
        _plain_tissues(rng, means, stds)
    shape = rend.labels.shape

    def draw(lab: np.ndarray) -> np.ndarray:
        return means[lab] + stds[lab] * rng.standard_normal(shape, dtype=np.float32)

    outside = draw(rend.static)
    texture = 1.0 + rng.uniform(0.0, 0.2) * inten.smooth_field(rng, shape, spacing, rng.uniform(4, 12))
    texture += rng.uniform(0.0, 0.12) * inten.smooth_field(rng, shape, spacing, rng.uniform(1.2, 3))
    outside *= texture
    # cortical bone and endplates: a dark rim around vertebrae and sacrum
    bone = np.isin(rend.static, _CORTEX)
    if bone.any() and features.extra_tissues:
        rim = bone & ~ndimage.binary_erosion(bone)
        outside[rim] *= rng.uniform(0.2, 0.8)
    content = draw(rend.content)
    if contrast in ("T2w", "T2starw") and rng.random() < 0.3 and features.extra_tissues:
        voids = inten.smooth_field(rng, shape, spacing, rng.uniform(2, 6))
        depth = rng.uniform(0.2, 0.7)
        csf = rend.content == LABELS["csf"]
        content[csf] *= 1.0 - depth * np.clip(voids[csf] - 1.0, 0.0, 1.0)
    wm = means[LABELS["cord"]] + stds[LABELS["cord"]] * rng.standard_normal(shape, dtype=np.float32)
    cord = wm * (1 - rend.gm) + means[LABELS["cord_gm"]] * rend.gm
    img = (1 - rend.sac_frac) * outside + rend.sac_frac * ((1 - rend.cord_frac) * content + rend.cord_frac * cord)
    return img.astype(np.float32)


def _scanner_artefacts(rng: np.random.Generator, img: np.ndarray, phase_axis: int, max_noise: float,
                       artefacts: bool = True) -> np.ndarray:
    """Bias field, then (sometimes, when ``artefacts``) ghosting, motion and wrap-around along the
    phase axis, then Rician noise up to ``max_noise``; the random draws keep this order
    (determinism per seed)."""
    img = img * inten.bias_field(rng, img.shape, rng.uniform(0.05, 0.35))
    if rng.random() < 0.15 and artefacts:
        img = inten.ghosting(rng, img, phase_axis)
    if rng.random() < 0.1 and artefacts:
        img = inten.motion(rng, img, phase_axis)
    if rng.random() < 0.1 and artefacts:
        img = inten.wrap_around(rng, img, phase_axis)
    return inten.rician_noise(rng, img, rng.uniform(0.005, max_noise))


def _acquire(rng: np.random.Generator, img: np.ndarray, spacing, acq: Acquisition,
             out_positions: list[np.ndarray] | None, features: Features = DEFAULT) -> np.ndarray:
    """Simulate the acquisition of a clean image rendered at ``spacing``.

    Blur (point spread), average over each acquired voxel (partial volume), sample on the
    acquisition grid, add bias field, artefacts and Rician noise.  When ``out_positions``
    is given (fractional indices along each axis of the acquisition grid), the result is
    interpolated back onto those positions (the crop path), else the acquisition grid is
    returned.  Without ``features.acquisition`` only the bias field, artefacts and noise are added
    on the rendering grid.
    """
    if not features.acquisition:
        return _scanner_artefacts(rng, img, acq.phase_axis, max_noise=0.06, artefacts=features.artefacts)
    sigma = [rng.uniform(0.0, 0.5) * min(acq.voxel[a] / spacing[a], 3.0) for a in range(3)]
    img = ndimage.gaussian_filter(img, sigma=sigma, truncate=2.0) if max(sigma) > 0.05 else img
    for a in range(3):
        ratio = acq.voxel[a] / spacing[a]
        if ratio > 1.05:
            size = int(round(ratio))
            if size > 1:
                img = ndimage.uniform_filter1d(img, size=size, axis=a, mode="nearest")
            n = img.shape[a]
            phase = rng.uniform(0, ratio)
            pos = np.arange(phase, n - 1e-6, ratio)
            img = inten.linear_axis(img, a, pos)
            if out_positions is not None:
                out_positions[a] = (out_positions[a] - phase) / ratio
    img = _scanner_artefacts(rng, img, acq.phase_axis, max_noise=0.06, artefacts=features.artefacts)
    if out_positions is not None:
        for a in range(3):
            if img.shape[a] != len(out_positions[a]) or not np.allclose(out_positions[a], np.arange(img.shape[a])):
                img = inten.linear_axis(img, a, out_positions[a])
    return img.astype(np.float32)


def _random_shape(rng: np.random.Generator, tpl: SpineTemplate, strength: float,
                  features: Features) -> tuple[SpineGeometry, BodyParams]:
    """The spine's geometry and the body around it (without ``features.deformation``: a straight,
    untilted spine and no elastic field)."""
    geo = random_geometry(rng, tpl, strength=strength, straight=not features.deformation,
                          size_variation=features.size_variation)
    body = random_body(rng)
    if not features.deformation:
        body = replace(body, elastic_amp=0.0)
    return geo, body


# --------------------------------------------------------------------------- annotations

def _inside(aff_inv: np.ndarray, shape, pts: np.ndarray) -> np.ndarray:
    v = pts @ aff_inv[:3, :3].T + aff_inv[:3, 3]
    return np.all((v > -0.5) & (v < np.array(shape) - 0.5), axis=1)


def _annotations(tpl: SpineTemplate, geo: SpineGeometry, affine: np.ndarray, shape) -> dict:
    """Centerline, conus tip, discs and per-slice vertebral levels inside the grid."""
    inv = np.linalg.inv(affine)
    conus = geo.cord.conus_z
    s = np.arange(conus, tpl.top_z + EXTRA_TOP - 5.0, 1.0)
    pts = geo.cord_point(s)
    keep = _inside(inv, shape, pts)
    centerline = pts[keep]
    tip = geo.cord_point(np.array([conus]))[0]
    tip_in = bool(_inside(inv, shape, tip[None])[0])
    discs = []
    for v, z in sorted(tpl.disc_z.items(), key=lambda kv: -kv[1]):
        p = geo.cord_point(np.array([z]))[0]
        if _inside(inv, shape, p[None])[0]:
            discs.append((int(v), p))
    if tip_in:
        discs.append((CONUS_VALUE, tip.copy()))
    # vertebral level per axial slice: template height of the canal axis crossing slice k
    sa = np.arange(0.0, tpl.nz + EXTRA_TOP - 5.0, 1.0)
    axis_pts = geo.cord_point(sa)
    vz = (axis_pts @ inv[:3, :3].T + inv[:3, 3])[:, 2]
    order = np.argsort(vz)
    ks = np.arange(shape[2])
    s_of_k = np.interp(ks, vz[order], sa[order], left=np.nan, right=np.nan)
    levels = np.zeros(shape[2], np.int16)
    ok = np.isfinite(s_of_k)
    inside = ok & (s_of_k <= tpl.top_z)
    levels[inside] = tpl.vertebra[np.clip(np.round(s_of_k[inside]).astype(int), 0, tpl.nz - 1)]
    return {"centerline_mm": centerline, "conus_tip_mm": tip if tip_in else None, "discs": discs, "levels": levels}


# --------------------------------------------------------------------------- crops

def _crop_height(rng: np.random.Generator, tpl: SpineTemplate, geo: SpineGeometry, region: str | None) -> tuple[float, str]:
    dz = tpl.disc_z
    conus = geo.cord.conus_z
    if region is None:
        region = str(rng.choice(CROP_REGIONS, p=[0.22, 0.23, 0.42, 0.13]))
    if region == "cervical":
        return float(rng.uniform(dz[8], tpl.top_z - 12)), region
    if region == "thoracic":
        return float(rng.uniform(dz[19], dz[8])), region
    if region == "lumbosacral":
        return float(rng.uniform(conus - 12, max(dz[17], conus + 20))), region
    if region == "below_conus":
        return float(rng.uniform(tpl.sac_end_z, conus - 30)), region
    if region in ("whole", "thoracolumbar"):
        return float(rng.uniform(conus - 12, tpl.top_z - 12)), region
    if region == "craniocervical":
        return float(rng.uniform(dz[3] - 10, dz[3] + 25)), region
    if region == "sacral":
        return float(rng.uniform(dz[25] - 25, dz[25] + 15)), region
    raise ValueError(f"unknown region {region!r}; expected one of {REGIONS + ANCHOR_CROP_REGIONS}")


def _render_on_working_grid(rng, tpl, geo, body, roots, origin, spacing, shape, acq: Acquisition, contrast: str,
                            blob_step: int = 2, features: Features = DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """Render at the working ``spacing`` (plus margins), simulate the acquisition ``acq``
    (thick slices: blur/average, sample, noise) and interpolate back onto the working grid.

    Returns (normalised image, labels) of ``shape``."""
    spacing = np.asarray(spacing, float)
    shape = np.asarray(shape, int)
    # margins so that blurring/averaging along thick axes sees real neighbours
    margin = np.array([int(np.ceil(0.5 * acq.voxel[a] / spacing[a])) + 2 for a in range(3)])
    big = shape + 2 * margin
    affine_big = np.eye(4)
    affine_big[:3, :3] = np.diag(spacing)
    affine_big[:3, 3] = np.asarray(origin, float) - margin * spacing
    rend = render(tpl, geo, body, roots, affine_big, tuple(int(v) for v in big), blob_step=blob_step)
    clean = _clean_image(rng, rend, contrast, spacing, features)
    positions = [np.arange(big[a], dtype=float) for a in range(3)]
    img = _acquire(rng, clean, spacing, acq, positions, features)
    sl = tuple(slice(m, m + n) for m, n in zip(margin, shape, strict=True))
    return inten.normalise(img[sl], rng), rend.labels[sl]


def generate_crop(seed: int, *, patch_size=(64, 64, 48), spacing=(0.5, 0.5, 1.0), pam50_dir=None,
                  contrast: str | None = None, region: str | None = None, source: str | None = None,
                  acquisition: str | None = None, strength: float = 1.0, features: Features = DEFAULT) -> SynthSample:
    """A training patch around the cord, rendered only where needed, at ``spacing``.

    The patch is roughly centred on the cord with a random offset; ~13 % of patches lie
    below the conus (empty cord mask) unless ``region`` is given.  The image goes through a
    simulated acquisition (sagittal / axial thick slices / isotropic: blur and average along
    each axis, sample, noise, interpolate back to ``spacing``).  ``features`` turns realism
    features off for ablations (:mod:`bids_app.synth.features`).
    """
    rng = np.random.default_rng(seed)
    tpl, src = _resolve_template(source, pam50_dir, rng)
    contrast = _pick_contrast(rng, contrast)
    geo, body = _random_shape(rng, tpl, strength, features)
    roots = random_roots(rng, tpl, geo)
    s_c, region = _crop_height(rng, tpl, geo, region)
    centre = geo.cord_point(np.array([s_c]))[0]
    spacing = np.asarray(spacing, float)
    shape = np.asarray(patch_size, int)
    offset = rng.uniform(-0.25, 0.25, 3) * shape * spacing * np.array([1, 1, 0.8])
    origin = centre + offset - (shape - 1) / 2 * spacing
    acq = _acquisition_for(rng, contrast, acquisition, features, spacing)
    img, labels = _render_on_working_grid(rng, tpl, geo, body, roots, origin, spacing, shape, acq, contrast,
                                          features=features)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    ann = _annotations(tpl, geo, affine, tuple(shape))
    cord = np.isin(labels, CORD_LABELS).astype(np.uint8)
    return SynthSample(image=img, cord=cord, labels=labels, affine=affine, region=region, contrast=contrast,
                       meta={"source": src, "acquisition": acq.kind, "voxel": acq.voxel, "seed": int(seed)}, **ann)


# --------------------------------------------------------------------------- whole views

_REGION_DISCS = {
    # (upper disc value or "top", lower disc value or "sacrum") of the field of view
    "whole": ("top", "sacrum"),
    "cervical": ("top", 10),
    "thoracic": (7, 21),
    "thoracolumbar": (14, 23),
    "lumbosacral": (17, "sacrum"),
}


def _fov_z(rng: np.random.Generator, tpl: SpineTemplate, geo: SpineGeometry, region: str) -> tuple[float, float]:
    """World z range (lo, hi) of the field of view for ``region``."""
    dz = tpl.disc_z
    if region == "below_conus":
        hi_s = geo.cord.conus_z - rng.uniform(3, 25)
        lo_s = max(tpl.sac_end_z - 40, 15.0)
        lo_s = min(lo_s, hi_s - 60)
    else:
        up, down = _REGION_DISCS[region]
        hi_s = tpl.top_z + rng.uniform(0, 15) if up == "top" else dz[up] + rng.uniform(-15, 25)
        lo_s = rng.uniform(20, 60) if down == "sacrum" else dz[down] + rng.uniform(-25, 15)
        if region == "lumbosacral":
            hi_s = max(hi_s, geo.cord.conus_z + 40)
    z = [geo.cord_point(np.array([v]))[0, 2] for v in (lo_s, hi_s)]
    return min(z), max(z)


def generate_sample(seed: int, *, source: str = "phantom", pam50_dir=None, region: str | None = None,
                    contrast: str | None = None, view: str = "full", spacing=None,
                    acquisition: str | None = None, strength: float = 1.0, features: Features = DEFAULT) -> SynthSample:
    """A whole field of view with its truth.

    ``region`` in :data:`REGIONS` (random when None); ``acquisition`` "sagittal" | "axial" |
    "iso" (random when None).  With ``spacing=None`` the sample is on the simulated
    acquisition grid (e.g. 3.5 mm sagittal slices) with masks from partial-volume fractions;
    with a spacing (e.g. ``(1.5, 1.5, 1.5)`` for a coarse view) the acquired image is
    interpolated onto a RAS grid at that spacing and the truth is rendered there exactly.
    ``source="pam50"`` needs ``pam50_dir`` or ``$SCT_DIR``; without them it falls back to
    the phantom.  ``features`` turns realism features off (:mod:`bids_app.synth.features`); without
    the acquisition the view is an isotropic scan at ``spacing`` (1 mm when None).
    """
    if view != "full":
        raise ValueError(f"unknown view {view!r}; expected 'full'")
    rng = np.random.default_rng(seed)
    tpl, src = _resolve_template(source, pam50_dir, rng)
    contrast = _pick_contrast(rng, contrast)
    if region is None:
        region = str(rng.choice(REGIONS, p=[0.15, 0.2, 0.15, 0.15, 0.25, 0.1]))
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    geo, body = _random_shape(rng, tpl, strength, features)
    roots = random_roots(rng, tpl, geo)
    acq = _acquisition_for(rng, contrast, acquisition, features, spacing if spacing is not None else (1.0, 1.0, 1.0))
    if acq.kind == "axial" and region in ("whole", "thoracic", "thoracolumbar"):
        # an axial thick-slice stack covers a short stretch: its lower end for a thoracolumbar
        # request (so that a lumbar-only dataset never gets a cervical image), else either end.
        # The draw is made in every case so that the later draws of a seed stay as they were.
        choice = str(rng.choice(["cervical", "lumbosacral"]))
        region = "lumbosacral" if region == "thoracolumbar" else choice
    zlo, zhi = _fov_z(rng, tpl, geo, region)
    vox = np.array(acq.voxel)
    # in-plane field of view around the canal at the middle of the FOV
    s_mid = float(np.interp(0.5 * (zlo + zhi), geo.axis_z, geo.s))
    mid = geo.cord_point(np.array([s_mid]))[0]
    if acq.kind == "sagittal":
        ext = np.array([rng.uniform(30, 70), rng.uniform(120, 260), zhi - zlo])
        ctr = mid + np.array([rng.normal(0, 3), rng.uniform(5, 40), 0])
    elif acq.kind == "axial":
        nsl = int(rng.integers(9, 40))
        ext = np.array([rng.uniform(70, 180), rng.uniform(70, 160), min(nsl * vox[2], zhi - zlo)])
        ctr = mid + np.array([rng.normal(0, 5), rng.uniform(0, 25), 0])
    else:
        ext = np.array([rng.uniform(50, 120), rng.uniform(100, 220), zhi - zlo])
        ctr = mid + np.array([rng.normal(0, 3), rng.uniform(5, 35), 0])
    ctr[2] = 0.5 * (zlo + zhi)
    shape_acq = np.maximum(np.round(ext / vox).astype(int), 4)
    origin = ctr - (shape_acq - 1) / 2 * vox
    affine_acq = np.eye(4)
    affine_acq[:3, :3] = np.diag(vox)
    affine_acq[:3, 3] = origin
    if spacing is not None:
        # working grid (e.g. a coarse view): render there, simulate the acquisition, come back
        spacing = np.asarray(spacing, float)
        shape = tuple(int(v) for v in np.maximum(np.round(shape_acq * vox / spacing).astype(int), 4))
        w_origin = origin - vox / 2 + spacing / 2
        img, labels = _render_on_working_grid(rng, tpl, geo, body, roots, w_origin, spacing, shape, acq, contrast,
                                              blob_step=1, features=features)
        cord = np.isin(labels, CORD_LABELS).astype(np.uint8)
        affine = np.eye(4)
        affine[:3, :3] = np.diag(spacing)
        affine[:3, 3] = w_origin
    else:
        # native acquisition grid: render finer (<= 1 mm in-plane, ~1.2 mm along thick axes),
        # then average blocks (partial volume) and add the artefacts on the acquired grid
        sub = np.maximum(np.round(vox / np.where(vox > 1.5, 1.2, 1.0)).astype(int), 1)
        rspace = vox / sub
        raff = np.eye(4)
        raff[:3, :3] = np.diag(rspace)
        raff[:3, 3] = origin - (sub - 1) / 2 * rspace
        rend = render(tpl, geo, body, roots, raff, tuple(shape_acq * sub), blob_step=1)
        clean = _clean_image(rng, rend, contrast, rspace, features)
        img = inten.normalise(_acquire_exact(rng, clean, sub, acq, features), rng)
        affine = affine_acq
        shape = tuple(int(v) for v in shape_acq)
        frac = _block_mean(np.isin(rend.labels, CORD_LABELS).astype(np.float32), sub)
        cord = (frac >= 0.5).astype(np.uint8)
        labels = _block_mode(rend.labels, sub)
    ann = _annotations(tpl, geo, affine, shape)
    return SynthSample(image=img.astype(np.float32), cord=cord, labels=labels.astype(np.uint8), affine=affine,
                       region=region, contrast=contrast,
                       meta={"source": src, "acquisition": acq.kind, "voxel": acq.voxel, "seed": int(seed)}, **ann)


def _block_mean(arr: np.ndarray, sub: np.ndarray) -> np.ndarray:
    s = arr.shape
    r = arr.reshape(s[0] // sub[0], sub[0], s[1] // sub[1], sub[1], s[2] // sub[2], sub[2])
    return r.mean(axis=(1, 3, 5))


def _block_mode(labels: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """Label at the centre sub-voxel of each block (a cheap stand-in for the mode)."""
    c = [int(v) // 2 for v in sub]
    return labels[c[0]::sub[0], c[1]::sub[1], c[2]::sub[2]].copy()


def _acquire_exact(rng: np.random.Generator, clean: np.ndarray, sub: np.ndarray, acq: Acquisition,
                   features: Features = DEFAULT) -> np.ndarray:
    """Acquisition of a whole view rendered ``sub`` times finer: PSF blur, block average, artefacts."""
    if features.acquisition:
        sigma = [rng.uniform(0.0, 0.5) * s for s in sub]
        img = ndimage.gaussian_filter(clean, sigma=sigma, truncate=2.0) if max(sigma) > 0.05 else clean
        clean = _block_mean(img, sub).astype(np.float32)
    return _scanner_artefacts(rng, clean, acq.phase_axis, max_noise=0.05, artefacts=features.artefacts)
