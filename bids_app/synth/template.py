"""Straightened spine templates: the label maps every synthetic sample is rendered from.

A :class:`SpineTemplate` lives in a *straightened template frame* (mm): ``x`` left→right,
``y`` posterior→anterior, ``z`` inferior→superior, the spinal canal's axis on ``x = y = 0``,
``z = 0`` at the bottom of the sacrum.  It holds

* ``static``: a uint8 label map of the tissues outside the dural sac (vertebral bodies,
  posterior elements, disc annulus and nucleus, sacrum, epidural fat); 0 means "body" and
  is filled at render time by muscle, fat, skin, air and random background blobs;
* ``cord_sdf`` and ``sac_sdf``: signed distances (mm, negative inside) to the cord surface
  and to the dural sac (cord + CSF) on a smaller box around the canal, so that the cord and
  the sac can be rescaled independently and rendered with partial-volume edges;
* ``gm``: grey-matter fraction (0-255) on the same box;
* disc heights ``disc_z`` (SCT values), the conus tip ``conus_z``, the end of the dural
  sac ``sac_end_z`` and a vertebral level per template slice.

Two sources build one: :func:`load_pam50_template` (PAM50 label maps, extended below
L1-L2 procedurally: L2-L5, sacrum, dural sac) and :func:`make_phantom_template`
(parametric, no data).  Both are cached per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from bids_app.errors import BadDataError, InputMissingError
from bids_app.synth.labels import LABELS

#: Template grid spacing (mm): 0.5 in-plane, 1.0 along the cord.
TEMPLATE_SPACING = (0.5, 0.5, 1.0)
#: Extent of the static box in the template frame (mm).
STATIC_X = (-35.0, 35.0)
STATIC_Y = (-35.0, 70.0)
#: Half-width (mm) of the box holding the cord/sac signed distances.
SDF_HALF = 22.0
#: Value used for "far outside" in the signed distance maps (mm).
SDF_FAR = 30.0

PAM50_FILES = (
    "PAM50_cord.nii.gz", "PAM50_csf.nii.gz", "PAM50_spine.nii.gz", "PAM50_gm.nii.gz",
    "PAM50_label_disc.nii.gz",
)

# Lumbar vertebrae added below PAM50's L1-L2 disc: (name, height incl. one disc in mm,
# in-plane scale relative to L1).
_LUMBAR_BLOCKS = (("L2", 35.0, 1.05), ("L3", 37.0, 1.10), ("L4", 38.0, 1.15), ("L5", 37.0, 1.18))
_SACRUM_HEIGHT = 90.0      # mm below the L5-S1 disc centre
_BOTTOM_MARGIN = 10.0      # mm of template below the sacrum
_SAC_END_BELOW_S1 = 27.0   # the dural sac ends about S2
#: The cord ends where its cross-section first reaches this area (mm²) from below: the thin
#: thread under it (PAM50's cord mask ends in about 10 mm of 1-2 mm²) is the filum terminale,
#: which the renderer draws itself, not cord.  Real filum: 1-2 mm across.
MIN_CONUS_AREA_MM2 = 3.0


@dataclass(frozen=True)
class SpineTemplate:
    """A straightened spine label template (see the module docstring for the frame)."""

    name: str
    static: np.ndarray           # uint8 (nx, ny, nz) labels outside the dural sac
    cord_sdf: np.ndarray         # float32 (mx, my, nz) mm, negative inside the cord
    sac_sdf: np.ndarray          # float32 (mx, my, nz) mm, negative inside the dural sac
    gm: np.ndarray               # uint8 (mx, my, nz) grey-matter fraction * 255
    disc_z: dict[int, float]     # SCT disc value -> template z (mm)
    conus_z: float               # template z of the cord's inferior tip
    sac_end_z: float             # template z of the inferior end of the dural sac
    top_z: float                 # template z of the top of the cord
    vertebra: np.ndarray         # int16 (nz,) vertebra value per template slice (0 = none)
    cord_radius: np.ndarray      # float32 (nz,) equivalent cord radius (mm) per slice

    @property
    def nz(self) -> int:
        return int(self.static.shape[2])

    @property
    def static_origin(self) -> np.ndarray:
        """Template mm of static voxel (0, 0, 0)."""
        return np.array([STATIC_X[0], STATIC_Y[0], 0.0])

    @property
    def sdf_origin(self) -> np.ndarray:
        """Template mm of voxel (0, 0, 0) of the cord/sac boxes."""
        return np.array([-SDF_HALF, -SDF_HALF, 0.0])


# --------------------------------------------------------------------------- helpers

def _grid_shape() -> tuple[int, int]:
    sx, sy, _ = TEMPLATE_SPACING
    return (int(round((STATIC_X[1] - STATIC_X[0]) / sx)) + 1, int(round((STATIC_Y[1] - STATIC_Y[0]) / sy)) + 1)


def _sdf_slices() -> tuple[slice, slice]:
    """Index slices of the SDF box inside the static box."""
    sx, sy, _ = TEMPLATE_SPACING
    i0 = int(round((-SDF_HALF - STATIC_X[0]) / sx))
    j0 = int(round((-SDF_HALF - STATIC_Y[0]) / sy))
    n = int(round(2 * SDF_HALF / sx)) + 1
    return slice(i0, i0 + n), slice(j0, j0 + n)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed Euclidean distance (mm) to the surface of ``mask``, negative inside."""
    if not mask.any():
        return np.full(mask.shape, SDF_FAR, np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=TEMPLATE_SPACING)
    inside = ndimage.distance_transform_edt(mask, sampling=TEMPLATE_SPACING)
    sdf = np.where(mask, -inside + 0.5 * TEMPLATE_SPACING[0], outside - 0.5 * TEMPLATE_SPACING[0])
    return np.clip(sdf, -SDF_FAR, SDF_FAR).astype(np.float32)


def _plane_coords() -> tuple[np.ndarray, np.ndarray]:
    """Template mm coordinates (x, y) of the static box's in-plane grid, each (nx, ny)."""
    nx, ny = _grid_shape()
    x = STATIC_X[0] + TEMPLATE_SPACING[0] * np.arange(nx)
    y = STATIC_Y[0] + TEMPLATE_SPACING[1] * np.arange(ny)
    return np.meshgrid(x, y, indexing="ij")


def _ellipse(xx, yy, cx, cy, rx, ry) -> np.ndarray:
    return ((xx - cx) / max(rx, 1e-3)) ** 2 + ((yy - cy) / max(ry, 1e-3)) ** 2 <= 1.0


def _vertebra_per_slice(disc_z: dict[int, float], nz: int) -> np.ndarray:
    """Vertebra value per template slice: vertebra n lies between disc n+1 (below) and disc n."""
    out = np.zeros(nz, np.int16)
    z = np.arange(nz) * TEMPLATE_SPACING[2]
    values = sorted(v for v in disc_z if v < 60)
    for v in values:
        top = disc_z[v]
        below = disc_z.get(v + 1, -np.inf)
        out[(z < top) & (z >= below)] = v
    return out


def trim_filum(cord: np.ndarray, min_area_mm2: float = MIN_CONUS_AREA_MM2) -> np.ndarray:
    """``cord`` without its caudal thread: slices below the first one (from the bottom) whose
    cross-section reaches ``min_area_mm2`` are cleared.  Axis 2 is z (inferior first)."""
    area = cord.sum(axis=(0, 1)) * TEMPLATE_SPACING[0] * TEMPLATE_SPACING[1]
    thick = np.nonzero(area >= min_area_mm2)[0]
    out = cord.copy()
    if thick.size:
        out[:, :, : thick[0]] = False
    return out


def _finish(name, static, cord, sac, gm, disc_z, sac_end_z) -> SpineTemplate:
    """Compute distance maps and annotations and freeze a template."""
    si, sj = _sdf_slices()
    sac_box = sac[si, sj] | cord[si, sj]       # the thread stays inside the sac
    cord = trim_filum(cord)
    cord_box = cord[si, sj]
    # inside the dural sac the static map says epidural fat: a shrunken sac reveals fat
    static = static.copy()
    static[sac | cord] = LABELS["epidural_fat"]
    zs = np.nonzero(cord_box.any(axis=(0, 1)))[0]
    area = cord_box.sum(axis=(0, 1)) * TEMPLATE_SPACING[0] * TEMPLATE_SPACING[1]
    return SpineTemplate(
        name=name,
        static=np.ascontiguousarray(static.astype(np.uint8)),
        cord_sdf=_signed_distance(cord_box),
        sac_sdf=_signed_distance(sac_box),
        gm=np.ascontiguousarray((np.clip(gm[si, sj], 0, 1) * 255).astype(np.uint8)),
        disc_z=dict(disc_z),
        conus_z=float(zs.min() * TEMPLATE_SPACING[2]),
        sac_end_z=float(sac_end_z),
        top_z=float(zs.max() * TEMPLATE_SPACING[2]),
        vertebra=_vertebra_per_slice(disc_z, static.shape[2]),
        cord_radius=np.sqrt(area / np.pi).astype(np.float32),
    )


def _sacrum(static: np.ndarray, sac: np.ndarray, z_top: float, body_cy: float, body_r: tuple[float, float],
            canal_r: tuple[float, float], sac_end_z: float) -> None:
    """Draw the sacrum (bone, sacral canal with epidural fat) below ``z_top`` in place."""
    xx, yy = _plane_coords()
    dz = TEMPLATE_SPACING[2]
    bx, by = body_r
    cx, cy = canal_r
    for k in range(static.shape[2]):
        z = k * dz
        if z >= z_top or z < z_top - _SACRUM_HEIGHT:
            continue
        t = (z_top - z) / _SACRUM_HEIGHT            # 0 at S1 endplate, 1 at the tip
        f = 1.0 - 0.7 * t
        body = _ellipse(xx, yy, 0.0, body_cy * (1 - 0.35 * t), bx * f, by * (1 - 0.5 * t))
        alae = np.zeros_like(body)
        if t < 0.45:
            g = 1.0 - t / 0.45
            for s in (-1, 1):
                alae |= _ellipse(xx, yy, s * (18 + 14 * g), body_cy * 0.4, 15 * g + 2, 13 * g + 2)
        canal = _ellipse(xx, yy, 0.0, 0.0, cx * (1 - 0.5 * t), cy * (1 - 0.5 * t))
        arch = _ellipse(xx, yy, 0.0, -1.0, cx * (1 - 0.5 * t) + 7, cy * (1 - 0.5 * t) + 8) & (yy < 2)
        bone = (body | alae | arch) & ~canal
        sl = static[:, :, k]
        sl[bone] = LABELS["sacrum"]
        sl[canal] = LABELS["epidural_fat"]
        if z >= sac_end_z:
            taper = np.clip((z - sac_end_z) / 15.0, 0.05, 1.0)
            sac[:, :, k] = _ellipse(xx, yy, 0.0, 0.0, cx * 0.85 * taper, cy * 0.8 * taper)
        else:
            sac[:, :, k] = False


def _fill_epidural(static: np.ndarray, sac: np.ndarray, yy: np.ndarray, sampling) -> None:
    """Fill the bony canal around the dural sac: epidural fat (thicker dorsally), the
    ligamentum flavum behind it, in place (computed inside the box around the canal)."""
    si, sj = _sdf_slices()
    box = (si, sj)
    dist = ndimage.distance_transform_edt(~sac[box], sampling=sampling)
    st = static[box]
    free = (st == 0) & ~sac[box]
    yb = yy[box] if yy.ndim == 3 else yy[box][:, :, None]
    post = yb < -1.0
    epi = free & ((dist < 1.5) | (post & (dist < 3.5)))
    st[epi] = LABELS["epidural_fat"]
    flavum = free & ~epi & post & (dist < 5.5)
    st[flavum] = LABELS["ligament"]
    static[box] = st


# --------------------------------------------------------------------------- PAM50

def default_pam50_dir() -> Path | None:
    """``$SCT_DIR/data/PAM50/template`` when SCT_DIR is set, else None."""
    sct = os.environ.get("SCT_DIR")
    if not sct:
        return None
    return Path(sct) / "data" / "PAM50" / "template"


def _load_ras(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        return np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise BadDataError(f"cannot read PAM50 file: {exc}", path=path) from exc


def _split_body_posterior(spine: np.ndarray, canal_front: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> tuple:
    """Vertebral bodies (anterior to the canal, near the midline) vs posterior elements."""
    body = spine & (yy[:, :, None] > canal_front[None, None, :] + 1.0) & (np.abs(xx)[:, :, None] < 26.0)
    body = ndimage.binary_opening(body, structure=np.ones((3, 3, 1), bool))
    return body, spine & ~body


def _make_discs(body: np.ndarray, spine: np.ndarray, disc_k: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Disc annulus / nucleus volumes filling the gaps between consecutive vertebral bodies."""
    annulus = np.zeros_like(body)
    nucleus = np.zeros_like(body)
    area = body.sum(axis=(0, 1))
    nz = body.shape[2]
    for v, kd in disc_k.items():
        if v < 2 or v >= 60:
            continue
        local = area[max(kd - 40, 0): kd + 40]
        thr = 0.4 * (local.max() if local.size else 0)
        if thr <= 0:
            continue
        lo, hi = kd, kd
        while lo > 0 and area[lo] < thr:
            lo -= 1
        while hi < nz - 1 and area[hi] < thr:
            hi += 1
        if hi - lo < 2:
            continue
        for k in range(lo + 1, hi):
            w = (k - lo) / (hi - lo)
            foot = body[:, :, lo] if w < 0.5 else body[:, :, hi]
            foot = ndimage.binary_closing(foot | (body[:, :, lo] & body[:, :, hi]), iterations=2)
            d = ndimage.distance_transform_edt(foot)
            disc = foot & ~spine[:, :, k]
            annulus[:, :, k] |= disc
            if d.max() > 0:
                nucleus[:, :, k] |= disc & (d > 0.45 * d.max()) & (abs(w - 0.5) < 0.35)
    return annulus & ~nucleus, nucleus


def _extrude_anterior(mask: np.ndarray, edge_j: int, depth_mm: np.ndarray) -> None:
    """Continue masks cut by PAM50's anterior box edge (row ``edge_j``) up to ``depth_mm``."""
    sy = TEMPLATE_SPACING[1]
    for k in range(mask.shape[2]):
        row = mask[:, edge_j, k]
        if not row.any():
            continue
        extra = int(depth_mm[k] / sy)
        if extra <= 0:
            continue
        idx = np.nonzero(row)[0]
        c, hw = 0.5 * (idx.min() + idx.max()), 0.5 * (idx.max() - idx.min() + 1)
        for e in range(1, min(extra, mask.shape[1] - 1 - edge_j) + 1):
            w = hw * np.sqrt(max(1.0 - (e / extra) ** 2, 0.0))
            lo, hi = int(round(c - w)), int(round(c + w))
            if hi > lo:
                mask[lo:hi, edge_j + e, k] = True


#: Bump when the template construction changes (invalidates the on-disk cache).
TEMPLATE_VERSION = "4"


def cache_dir() -> Path | None:
    """Folder for built templates: ``$CONUS_CACHE_DIR``, ``$XDG_CACHE_HOME/conus`` or ``~/.cache/conus``;
    None if unusable."""
    d = os.environ.get("CONUS_CACHE_DIR")
    xdg = os.environ.get("XDG_CACHE_HOME")
    path = Path(d) if d else (Path(xdg) if xdg else Path.home() / ".cache") / "conus"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK) else None


def _cached_build(key: str, build) -> SpineTemplate:
    """Load a template from the disk cache, or build it and store it (atomically)."""
    folder = cache_dir()
    f = folder / f"template-{key}.npz" if folder is not None else None
    if f is not None and f.is_file():
        try:
            with np.load(f, allow_pickle=False) as z:
                discs = {int(v): float(h) for v, h in z["disc_z"]}
                return SpineTemplate(
                    name=str(z["name"]), static=z["static"], cord_sdf=z["cord_sdf"], sac_sdf=z["sac_sdf"],
                    gm=z["gm"], disc_z=discs, conus_z=float(z["conus_z"]), sac_end_z=float(z["sac_end_z"]),
                    top_z=float(z["top_z"]), vertebra=z["vertebra"], cord_radius=z["cord_radius"])
        except (OSError, KeyError, ValueError):
            pass  # a broken cache file is rebuilt below
    tpl = build()
    if f is not None:
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp.npz")
        try:
            np.savez(tmp, name=tpl.name, static=tpl.static, cord_sdf=tpl.cord_sdf, sac_sdf=tpl.sac_sdf, gm=tpl.gm,
                     disc_z=np.array(sorted(tpl.disc_z.items()), float), conus_z=tpl.conus_z,
                     sac_end_z=tpl.sac_end_z, top_z=tpl.top_z, vertebra=tpl.vertebra, cord_radius=tpl.cord_radius)
            os.replace(tmp, f)
        except OSError:
            tmp.unlink(missing_ok=True)
    return tpl


@lru_cache(maxsize=2)
def _pam50_cached(path: str) -> SpineTemplate:
    import hashlib

    h = hashlib.sha256(TEMPLATE_VERSION.encode())
    for name in PAM50_FILES:
        h.update((Path(path) / name).read_bytes())
    return _cached_build(f"pam50-{h.hexdigest()[:16]}", lambda: _build_pam50(Path(path)))


def load_pam50_template(pam50_dir: str | os.PathLike) -> SpineTemplate:
    """Build (once per process) the extended straightened template from a PAM50 folder.

    Raises :class:`InputMissingError` when a needed file is absent.
    """
    d = Path(pam50_dir).expanduser().resolve()
    missing = [f for f in PAM50_FILES if not (d / f).is_file()]
    if missing:
        raise InputMissingError(f"PAM50 folder lacks {', '.join(missing)}", path=d)
    return _pam50_cached(str(d))


def _build_pam50(d: Path) -> SpineTemplate:
    cord0 = _load_ras(d / "PAM50_cord.nii.gz") > 0
    csf0 = _load_ras(d / "PAM50_csf.nii.gz") > 0
    spine0 = _load_ras(d / "PAM50_spine.nii.gz") > 0
    gm0 = _load_ras(d / "PAM50_gm.nii.gz").astype(np.float32)
    disc0 = _load_ras(d / "PAM50_label_disc.nii.gz")
    if not (cord0.shape == csf0.shape == spine0.shape == gm0.shape == disc0.shape) or cord0.ndim != 3:
        raise BadDataError("PAM50 files do not share one 3-D grid", path=d)
    needed = {1, 8, 12, 20, 21}
    have = {int(v) for v in np.unique(disc0)}
    if not needed <= have or not cord0.any() or not csf0.any():
        raise BadDataError(f"PAM50 disc labels lack {sorted(needed - have)} or cord/CSF are empty", path=d)
    nx0, ny0, nz0 = cord0.shape
    # canal axis: the cord's centre of mass in the middle of the template
    mid = ndimage.center_of_mass(cord0[:, :, nz0 // 4: 3 * nz0 // 4])
    ci, cj = int(round(mid[0])), int(round(mid[1]))
    # place PAM50 into the padded static box, 0.5 mm in-plane, still 0.5 mm along z
    nx, ny = _grid_shape()
    oi = int(round(-STATIC_X[0] / 0.5)) - ci
    oj = int(round(-STATIC_Y[0] / 0.5)) - cj

    def place(a, dtype=bool):
        out = np.zeros((nx, ny, nz0), dtype)
        si0, sj0 = max(0, -oi), max(0, -oj)
        si1, sj1 = min(nx0, nx - oi), min(ny0, ny - oj)
        out[si0 + oi: si1 + oi, sj0 + oj: sj1 + oj] = a[si0:si1, sj0:sj1]
        return out

    cord, csf, spine, gm = place(cord0), place(csf0), place(spine0), place(gm0, np.float32)
    disc_k = {int(v): int(np.argwhere(disc0 == v)[0][2]) for v in np.unique(disc0) if v > 0}
    edge_j = min(ny0, ny - oj) - 1 + oj
    xx, yy = _plane_coords()
    plane = np.zeros((3, 3, 3), bool)
    plane[:, :, 1] = True
    sac = ndimage.binary_closing(cord | csf, structure=plane, iterations=2) | cord | csf
    sac = ndimage.binary_fill_holes(sac, structure=plane)
    # canal front per slice: anterior edge of the sac (nearest slice where the sac exists)
    has_sac = sac.any(axis=(0, 1))
    ks = np.nonzero(has_sac)[0]
    front = np.array([yy[sac[:, :, k]].max() if has_sac[k] else np.nan for k in range(nz0)])
    front = np.interp(np.arange(nz0), ks, front[ks])
    body, post = _split_body_posterior(spine, front, xx, yy)
    # anterior extrusion of bodies cut by the 35 mm PAM50 box
    z_mm = np.arange(nz0) * 0.5
    depth = np.interp(z_mm, [0, disc_k[21] * 0.5, disc_k[12] * 0.5, disc_k[8] * 0.5, nz0 * 0.5],
                      [34, 33, 26, 17, 16])
    post_edge = np.array([yy[body[:, :, k]].min() if body[:, :, k].any() else 0.0 for k in range(nz0)])
    need = np.clip(post_edge + depth - yy[0, edge_j], 0, None)
    _extrude_anterior(body, edge_j, need)
    annulus, nucleus = _make_discs(body, spine, disc_k)
    # the sac below the end of PAM50's CSF: extend with the cross-section just above it
    csf_start = int(np.nonzero(csf.any(axis=(0, 1)))[0].min())
    ref = sac[:, :, csf_start + 8]
    for k in range(csf_start + 8):
        sac[:, :, k] = ref | cord[:, :, k]

    static = np.zeros((nx, ny, nz0), np.uint8)
    static[post] = LABELS["posterior_elements"]
    static[body] = LABELS["vertebral_body"]
    static[annulus] = LABELS["disc_annulus"]
    static[nucleus] = LABELS["disc_nucleus"]
    _fill_epidural(static, sac, yy, (0.5, 0.5, 0.5))

    # resample PAM50 part to 1 mm along z, starting at the L1-L2 disc centre
    k21 = disc_k[21]
    ks_top = np.arange(k21, nz0, 2)
    l1 = slice(k21, max(disc_k[20], k21 + 4))              # the L1 block, disc centre to disc centre
    ext = _lumbar_extension(static[:, :, l1], sac[:, :, l1], body[:, :, l1])
    static_e, sac_e, z21, disc_ext, sac_end, body_cy = ext
    n_below = static_e.shape[2]
    static_all = np.concatenate([static_e, static[:, :, ks_top]], axis=2)
    sac_all = np.concatenate([sac_e, sac[:, :, ks_top]], axis=2)
    cord_all = np.concatenate([np.zeros_like(sac_e), cord[:, :, ks_top]], axis=2)
    gm_all = np.concatenate([np.zeros(sac_e.shape, np.float32), gm[:, :, ks_top]], axis=2)
    disc_z = {v: float(n_below + (k - k21) / 2.0) for v, k in disc_k.items() if v != 60}
    disc_z.update(disc_ext)
    del z21, body_cy
    return _finish("pam50", static_all, cord_all, sac_all, gm_all, disc_z, sac_end)


def _lumbar_extension(l1_static, l1_sac, l1_body):
    """Procedural L2-L5 + sacrum below PAM50's L1-L2 disc, from its L1 block (0.5 mm z).

    Returns (static, sac, z of the L1-L2 disc, {disc value: z}, sac end z, body centre y),
    arrays at 1 mm along z from template z = 0 up to (excluding) the L1-L2 disc centre.
    """
    nx, ny, nb = l1_static.shape
    heights = [h for _, h, _ in _LUMBAR_BLOCKS]
    z_ls = _BOTTOM_MARGIN + _SACRUM_HEIGHT               # L5-S1 disc centre
    z21 = z_ls + sum(heights)
    nz = int(round(z21))
    static = np.zeros((nx, ny, nz), np.uint8)
    sac = np.zeros((nx, ny, nz), bool)
    ci = -STATIC_X[0] / 0.5
    cj = -STATIC_Y[0] / 0.5
    ii, jj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    disc_ext = {}
    z_top = z21
    for n, (_name, h, s) in enumerate(_LUMBAR_BLOCKS):
        z_bot = z_top - h
        disc_ext[22 + n] = z_bot
        for k in range(int(round(z_bot)), int(round(z_top))):
            w = (k + 0.5 - z_bot) / h                     # 0 at the lower disc, 1 at the upper
            src = min(int(w * (nb - 1)), nb - 1)
            si = ci + (ii - ci) / s
            sj = cj + (jj - cj) / s
            static[:, :, k] = ndimage.map_coordinates(l1_static[:, :, src], [si, sj], order=0)
            sac[:, :, k] = ndimage.map_coordinates(l1_sac[:, :, src].astype(np.uint8), [si, sj], order=0) > 0
        z_top = z_bot
    disc_ext[25] = z_ls
    # sacrum: body size from the L5 block
    yy = STATIC_Y[0] + 0.5 * np.arange(ny)
    k5 = int(round(z_ls + 0.5 * heights[-1]))
    bmask = static[:, :, k5] == LABELS["vertebral_body"]
    body_cy = float(yy[np.nonzero(bmask.any(axis=0))[0]].mean()) if bmask.any() else 25.0
    bx = 0.5 * bmask.any(axis=1).sum() * 0.5 if bmask.any() else 22.0
    by = 0.5 * bmask.any(axis=0).sum() * 0.5 if bmask.any() else 15.0
    # half disc above the sacrum: mirror the L5 block's lowest slices
    kz = int(round(z_ls))
    for d in range(1, 5):
        static[:, :, kz - d] = static[:, :, kz + d - 1]
        sac[:, :, kz - d] = sac[:, :, kz + d - 1]
    sacm = sac[:, :, kz]
    canal_r = (0.5 * sacm.any(axis=1).sum() * 0.5 + 1.0, 0.5 * sacm.any(axis=0).sum() * 0.5 + 1.0) if sacm.any() else (9.0, 7.0)
    sac_end = z_ls - _SAC_END_BELOW_S1
    for k in range(kz - 4):
        sac[:, :, k] = sacm if k * TEMPLATE_SPACING[2] >= z_ls - 4 - _SACRUM_HEIGHT else False
    _sacrum(static, sac, z_ls - 4, body_cy, (bx, by), canal_r, sac_end)
    return static, sac, z21, disc_ext, sac_end, body_cy


# --------------------------------------------------------------------------- phantom

# Vertebral heights (body + disc, mm) from C1 to L5 for the phantom.
_PHANTOM_HEIGHTS = ([22.0, 18.0] + [15.0] * 5 + [20.0, 21.0, 22.0, 23.0, 24.0, 25.0, 26.0, 27.0, 28.0, 29.0, 30.0, 31.0]
                    + [34.0, 35.0, 37.0, 38.0, 37.0])


@lru_cache(maxsize=1)
def make_phantom_template() -> SpineTemplate:
    """A parametric spine (no data): elliptic cord with cervical and lumbar enlargements and
    a conus taper to L1-L2, CSF sac to S2, vertebral bodies, posterior arches, discs, sacrum.

    Built once per process (and cached on disk, see :func:`cache_dir`)."""
    return _cached_build(f"phantom-{TEMPLATE_VERSION}", _build_phantom)


def _build_phantom() -> SpineTemplate:
    nx, ny = _grid_shape()
    xx, yy = _plane_coords()
    z_ls = _BOTTOM_MARGIN + _SACRUM_HEIGHT
    total = z_ls + sum(_PHANTOM_HEIGHTS) + 15.0
    nz = int(round(total))
    static = np.zeros((nx, ny, nz), np.uint8)
    sac = np.zeros((nx, ny, nz), bool)
    cord = np.zeros((nx, ny, nz), bool)
    gm = np.zeros((nx, ny, nz), np.float32)
    # disc positions: vertebra v spans [disc v+1, disc v]
    disc_z = {25: z_ls}
    z = z_ls
    for v in range(24, 0, -1):
        z += _PHANTOM_HEIGHTS[v - 1]
        disc_z[v] = z
    top = disc_z[1]
    conus = disc_z[21] + 3.0
    sac_end = z_ls - _SAC_END_BELOW_S1
    zk = np.arange(nz) * TEMPLATE_SPACING[2]
    # cord radii along z (RL, AP) with enlargements and conus taper
    cerv = np.exp(-0.5 * ((zk - 0.5 * (disc_z[5] + disc_z[8])) / 25.0) ** 2)
    lumb = np.exp(-0.5 * ((zk - (disc_z[20] + 8.0)) / 18.0) ** 2)
    rx = 4.2 + 2.2 * cerv + 1.6 * lumb
    ry = 3.2 + 0.9 * cerv + 1.0 * lumb
    taper = np.clip((zk - conus) / 22.0, 0.0, 1.0) ** 0.6
    rx, ry = rx * taper, ry * taper
    for k in range(nz):
        zz = zk[k]
        lvl = _level_at(disc_z, zz)
        lumbar = lvl >= 20
        s = 1.0 + 0.25 * np.clip((disc_z[12] - zz) / (disc_z[12] - z_ls), 0, 1)   # larger caudally
        canal_rx, canal_ry = 7.5 * s, 6.5 * s + (1.0 if lumbar else 0.0)
        if zz <= top + 10 and zz >= z_ls - 4:
            sac[:, :, k] = _ellipse(xx, yy, 0.0, 0.3, canal_rx, canal_ry)
        if zz <= top + 10 and rx[k] > 0.2:
            c = _ellipse(xx, yy, 0.0, -0.4, rx[k], ry[k])
            cord[:, :, k] = c
            u, w = xx / max(rx[k], 0.1), (yy + 0.4) / max(ry[k], 0.1)
            g = ((np.abs(w) < 0.22) & (np.abs(u) < 0.55)) | ((np.abs(u) > 0.2) & (np.abs(u) < 0.55) & (np.abs(w) < 0.8))
            gm[:, :, k] = (g & c).astype(np.float32)
        if zz < z_ls - 4:
            continue
        # vertebra or disc?
        # real discs only: none between C1 and C2 or above C1 (SCT values 1 and 2 mark levels)
        below = max((d for v, d in disc_z.items() if v >= 3 and d <= zz), default=None)
        above = min((d for v, d in disc_z.items() if v >= 3 and d > zz), default=None)
        body_ry, body_rx = 6.0 * s + (6.0 if lvl >= 8 else 2.0), 8.0 * s + (6.0 if lvl >= 8 else 3.0)
        body_cy = canal_ry + 2.0 + body_ry
        disc_half = 2.5 + 0.12 * (above - below if above and below else 20.0) * 0.5
        near = min(abs(zz - (below if below is not None else -1e9)), abs((above if above is not None else 1e9) - zz))
        if near < disc_half:
            disc = _ellipse(xx, yy, 0.0, body_cy, body_rx, body_ry)
            static[:, :, k][disc] = LABELS["disc_annulus"]
            static[:, :, k][_ellipse(xx, yy, 0.0, body_cy - 1.0, 0.55 * body_rx, 0.5 * body_ry)] = LABELS["disc_nucleus"]
        else:
            static[:, :, k][_ellipse(xx, yy, 0.0, body_cy, body_rx, body_ry)] = LABELS["vertebral_body"]
            if near > disc_half + 3:
                ring = _ellipse(xx, yy, 0.0, 0.0, canal_rx + 5.0, canal_ry + 6.0) & ~_ellipse(xx, yy, 0.0, 0.0, canal_rx + 1.5, canal_ry + 1.5)
                spinous = (np.abs(xx) < 2.5) & (yy < -canal_ry) & (yy > -canal_ry - 22.0)
                transverse = (np.abs(yy + 1.0) < 3.0) & (np.abs(xx) < canal_rx + 18.0) & (np.abs(xx) > canal_rx)
                post = (ring & (yy < body_cy - body_ry + 1)) | spinous | transverse
                static[:, :, k][post & (static[:, :, k] == 0)] = LABELS["posterior_elements"]
    _fill_epidural(static, sac, yy, TEMPLATE_SPACING)
    # sacrum and the sac's end
    _sacrum(static, sac, z_ls - 4, 6.5 + 2 + 14, (22.0, 14.0), (9.5, 7.0), sac_end)
    cord &= ~(zk[None, None, :] < conus)
    return _finish("phantom", static, cord, sac | cord, gm, disc_z, sac_end)


def _level_at(disc_z: dict[int, float], z: float) -> int:
    """Vertebra value at template height z (0 below S1 / above C1)."""
    for v in sorted(disc_z):
        if v >= 60:
            continue
        below = disc_z.get(v + 1, -np.inf)
        if below <= z < disc_z[v]:
            return v
    return 0
