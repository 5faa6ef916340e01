"""Render the label map (and partial-volume fractions) of a spine on any world grid.

Only the voxels of the requested grid are computed: each voxel's world position is mapped
to the template frame by a :class:`~bids_app.synth.deform.SpineGeometry`, then

* the static tissues (bones, discs, epidural fat) are read from the template (nearest);
* the body around them (paraspinal muscle, subcutaneous fat, skin, air, random background
  blobs) is drawn analytically per sample (:class:`BodyParams`);
* the dural sac and the cord come from their signed distance maps, each with its own
  scaling, so cord size, canal size, CSF rim and cord shift are independent; the sac
  always contains the cord plus ``rim`` mm;
* below the (shifted) conus the filum terminale and the cauda equina roots are drawn as
  thin tubes inside the sac.

The signed distances also give soft tissue fractions at voxel scale, used by the intensity
model for partial volume at the cord and sac edges without supersampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bids_app.synth.deform import SpineGeometry
from bids_app.synth.intensity import linear_axis
from bids_app.synth.labels import BACKGROUND_BLOB_FIRST, LABELS, N_BACKGROUND_BLOBS
from bids_app.synth.template import SDF_FAR, TEMPLATE_SPACING, SpineTemplate

_BONY = np.array([LABELS[k] for k in ("vertebral_body", "posterior_elements", "disc_annulus", "disc_nucleus",
                                      "sacrum", "ligament")], np.uint8)


@dataclass(frozen=True)
class BodyParams:
    """Per-sample body outline around the spine (template frame, mm)."""

    muscle_cx: float
    muscle_cy: float
    muscle_rx: float
    muscle_ry: float
    psoas: float              # size factor of the anterolateral muscles (0 = none)
    skin_post: float          # distance of the posterior skin from the canal (mm, positive)
    fat_post: float           # subcutaneous fat thickness (mm)
    skin_ant: float
    half_width: float
    blob_scale: float         # mm, size of the background blobs
    ligament_depth: float     # how far back the interspinous ligament reaches (mm)
    elastic_amp: float        # mm, smooth elastic displacement of all tissues (zero on the cord axis)
    elastic_scale: float      # mm, its wavelength
    septa_scale: float        # mm, spacing of intramuscular fat septa
    septa_width: float        # field-units half-width of the septa (0 = none)
    blob_seed: int


@dataclass(frozen=True)
class Roots:
    """Cauda equina roots and filum tabulated over template z (1 mm)."""

    z0: float                 # template z of row 0
    x: np.ndarray             # (n_roots, nz) template x (mm), NaN where the root does not exist
    y: np.ndarray
    radius: np.ndarray        # (n_roots,)
    filum_x: np.ndarray       # (nz,)
    filum_y: np.ndarray
    filum_r: float
    top: float                # template z where the roots start (highest)


@dataclass
class Rendered:
    """Labels and soft fractions on a grid (arrays shaped like the grid)."""

    labels: np.ndarray        # uint8
    static: np.ndarray        # uint8 labels outside the sac
    content: np.ndarray       # uint8 label inside the sac (csf / roots / filum)
    sac_frac: np.ndarray      # float32 [0, 1]
    cord_frac: np.ndarray     # float32 [0, 1]
    gm: np.ndarray            # float32 [0, 1]
    s: np.ndarray             # float32 template z of each voxel


def random_body(rng: np.random.Generator) -> BodyParams:
    return BodyParams(
        muscle_cx=float(rng.uniform(14, 26)), muscle_cy=float(rng.uniform(-30, -18)),
        muscle_rx=float(rng.uniform(11, 20)), muscle_ry=float(rng.uniform(11, 19)),
        psoas=float(rng.uniform(0.5, 1.3)),
        skin_post=float(rng.uniform(45, 90)), fat_post=float(rng.uniform(3, 25)),
        skin_ant=float(rng.uniform(90, 230)), half_width=float(rng.uniform(70, 180)),
        blob_scale=float(rng.uniform(12, 40)), blob_seed=int(rng.integers(2**31 - 1)),
        ligament_depth=float(rng.choice([0.0, rng.uniform(8, 40)], p=[0.4, 0.6])),
        septa_scale=float(rng.uniform(6, 16)), septa_width=float(rng.choice([0.0, rng.uniform(0.01, 0.04)], p=[0.3, 0.7])),
        elastic_amp=float(rng.uniform(0.0, 1.5)), elastic_scale=float(rng.uniform(6, 20)),
    )


def random_roots(rng: np.random.Generator, tpl: SpineTemplate, geo: SpineGeometry) -> Roots:
    """Cauda equina: roots leave the cord surface above the conus and run caudally in the sac,
    crowded around the conus, then spread and leave laterally at lumbar and sacral levels."""
    c = geo.cord
    conus = c.conus_z
    top = conus + rng.uniform(25, 60)
    z0 = tpl.sac_end_z - 20.0
    zs = np.arange(z0, top + 1.0)
    n = c.n_roots
    x = np.full((n, zs.size), np.nan, np.float32)
    y = np.full((n, zs.size), np.nan, np.float32)
    exits = sorted(v for v in tpl.disc_z if 20 <= v <= 25)
    exit_z = [tpl.disc_z[v] for v in exits] + [tpl.sac_end_z + 3 * i for i in range(4)]
    # template cord radius just above the conus, scaled like the cord
    zc_ref = tpl.conus_z + 25.0
    r_cord = float(np.max(tpl.cord_radius[int(tpl.conus_z):int(zc_ref)], initial=3.0)) * np.sqrt(c.scale_x * c.scale_y)
    dependent = rng.uniform(0.2, 0.8)      # how much the roots settle posteriorly (supine)
    for i in range(n):
        side = 1 if i % 2 else -1
        ventral = rng.random() < 0.45
        start = rng.uniform(conus + 2, top)
        ang = rng.uniform(0.15, 0.85) * np.pi / 2 * (1 if ventral else -1)
        sx0 = c.shift_x + side * r_cord * np.cos(ang)
        sy0 = c.shift_y + r_cord * np.sin(ang)
        ez = float(rng.choice(exit_z)) + rng.uniform(-3, 3)
        bx = side * rng.uniform(0.1, 0.75) * 7.0 * c.canal_x
        by = (rng.uniform(-0.8, 0.2) * (1 + dependent)) * 6.0 * c.canal_y
        t = np.clip((start - zs) / 30.0, 0, 1)
        t = t * t * (3 - 2 * t)
        px = sx0 + (bx - sx0) * t
        py = sy0 + (by - sy0) * t
        u = np.clip((ez + 15 - zs) / 20.0, 0, 1)        # swing laterally towards the foramen
        px = px + (side * 9.0 * c.canal_x - px) * u
        py = py * (1 - u)
        ok = (zs <= start) & (zs >= ez - 8)
        x[i, ok], y[i, ok] = px[ok], py[ok]
    fz = np.clip((conus - zs) / max(conus - tpl.sac_end_z, 1.0), 0, 1)
    filum_x = (c.shift_x * (1 - fz)).astype(np.float32)
    filum_y = (c.shift_y + (-2.0 * c.canal_y - c.shift_y) * fz).astype(np.float32)
    filum_x[zs > conus] = np.nan
    return Roots(z0=float(z0), x=x, y=y, radius=rng.uniform(0.45, 1.1, size=n).astype(np.float32),
                 filum_x=filum_x, filum_y=filum_y, filum_r=float(rng.uniform(0.4, 0.9)), top=float(top))


def _sample(vol: np.ndarray, origin: np.ndarray, coords: tuple, order: int, cval: float) -> np.ndarray:
    idx = [(c - o) / sp for c, o, sp in zip(coords, origin, TEMPLATE_SPACING, strict=True)]
    return ndimage.map_coordinates(vol, idx, order=order, mode="constant", cval=cval, prefilter=False)


def _lattice_field(pts: np.ndarray, step: float, seed: int) -> np.ndarray:
    """Smooth random field in [0, 1]: hash-seeded values on a global lattice of ``step`` mm,
    trilinearly interpolated (the same world point always gets the same value)."""
    lo = np.floor(pts.min(axis=0) / step) - 1
    shape = (np.ceil(pts.max(axis=0) / step) + 2 - lo).astype(int) + 1
    ii = [np.arange(lo[a], lo[a] + shape[a]).astype(np.int64) for a in range(3)]
    gi, gj, gk = np.meshgrid(*ii, indexing="ij")
    h = (gi * 73856093) ^ (gj * 19349663) ^ (gk * 83492791) ^ seed
    h = (h * 2654435761) % (2**32)
    grid = (h.astype(np.float64) / 2**32).astype(np.float32)
    idx = [(pts[:, a] / step - lo[a]) for a in range(3)]
    return ndimage.map_coordinates(grid, idx, order=1, prefilter=False)


def _lattice_grid(affine: np.ndarray, shape, step: float, seed: int) -> np.ndarray:
    """:func:`_lattice_field` on a whole axis-aligned grid, by separable interpolation (fast)."""
    axes = [affine[a, 3] + affine[a, a] * np.arange(shape[a]) for a in range(3)]
    lo = [np.floor(min(ax[0], ax[-1]) / step) - 1 for ax in axes]
    n = [int(np.ceil(max(ax[0], ax[-1]) / step) + 2 - lo[a]) + 1 for a, ax in enumerate(axes)]
    ii = [np.arange(lo[a], lo[a] + n[a]).astype(np.int64) for a in range(3)]
    gi, gj, gk = np.meshgrid(*ii, indexing="ij")
    h = (gi * 73856093) ^ (gj * 19349663) ^ (gk * 83492791) ^ seed
    h = (h * 2654435761) % (2**32)
    out = (h.astype(np.float64) / 2**32).astype(np.float32)
    for a in range(3):
        out = linear_axis(out, a, axes[a] / step - lo[a])
    return out.reshape(-1)


def _separable(affine: np.ndarray) -> bool:
    return bool(np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))))


def _blobs(pts: np.ndarray, body: BodyParams, affine=None, shape=None) -> np.ndarray:
    """Random background tissue ids (0..N_BACKGROUND_BLOBS-1) from two smooth random fields."""
    out = np.zeros(len(pts) if pts is not None else int(np.prod(shape)), np.int64)
    for f in range(2):
        step, seed = body.blob_scale * (1 + 0.5 * f), body.blob_seed + 7919 * f
        v = _lattice_grid(affine, shape, step, seed) if pts is None else _lattice_field(pts, step, seed)
        out = out * 3 + np.clip((v - 0.25) / 0.5 * 3, 0, 2.999).astype(np.int64)
    return out % N_BACKGROUND_BLOBS


def _grid_points(affine: np.ndarray, shape, step: int = 1) -> np.ndarray:
    axes = [np.arange(0, n, step, dtype=np.float64) for n in shape]
    gi, gj, gk = np.meshgrid(*axes, indexing="ij")
    m, t = affine[:3, :3], affine[:3, 3]
    return np.stack([(gi * m[r, 0] + gj * m[r, 1] + gk * m[r, 2] + t[r]).reshape(-1) for r in range(3)], axis=1)


def _body_labels(tpl: SpineTemplate, body: BodyParams, x, y, st, blob, septa=None) -> np.ndarray:
    """Analytic body outline around the spine (template frame) with background blobs."""
    lab = blob.astype(np.uint8) + BACKGROUND_BLOB_FIRST
    neck = st > tpl.disc_z[8]
    skin_ant = np.where(neck, min(body.skin_ant, 75.0), body.skin_ant)
    skin_post = np.where(neck, min(body.skin_post, 55.0), body.skin_post)
    muscle = np.zeros(x.shape, bool)
    lumbar = (st < tpl.disc_z[19]) & (st > tpl.disc_z[25])
    for sgn in (-1, 1):
        muscle |= ((x - sgn * body.muscle_cx) / body.muscle_rx) ** 2 + ((y - body.muscle_cy) / body.muscle_ry) ** 2 <= 1
        if body.psoas > 0:
            muscle |= lumbar & (((x - sgn * 24 * body.psoas) / (11 * body.psoas)) ** 2
                                + ((y - 22) / (12 * body.psoas)) ** 2 <= 1)
    # the back muscles fill a rounded box between the laminae and the subcutaneous fat
    inner = -skin_post + body.fat_post
    yc, hh = 0.5 * (inner - 2.0), 0.5 * (-2.0 - inner)
    hw = body.muscle_cx + body.muscle_rx
    back = (np.abs(x) / hw) ** 4 + (np.abs(y - yc) / np.maximum(hh, 1.0)) ** 4 <= 1.0
    muscle |= back
    lab[muscle] = LABELS["paraspinal_muscle"]
    if septa is not None:       # thin fat septa between muscle bellies
        lab[muscle & (np.abs(septa - 0.5) < body.septa_width)] = LABELS["subcutaneous_fat"]
    lab[back & (np.abs(x) < 1.2) & (y > -body.ligament_depth)] = LABELS["ligament"]
    fat = (y <= -skin_post + body.fat_post) & (y > -skin_post)
    lab[fat] = LABELS["subcutaneous_fat"]
    air = (y <= -skin_post) | (y >= skin_ant) | (np.abs(x) > body.half_width)
    lab[air] = LABELS["air"]
    return lab


def render(tpl: SpineTemplate, geo: SpineGeometry, body: BodyParams, roots: Roots,
           affine: np.ndarray, shape: tuple[int, int, int], blob_step: int = 2) -> Rendered:
    """Render labels and partial-volume fractions on the grid (``affine``, ``shape``).

    ``blob_step`` evaluates the (large) background blobs on every n-th voxel only (speed)."""
    shape = tuple(int(v) for v in shape)
    pts = _grid_points(affine, shape)
    voxel = float(np.cbrt(abs(np.linalg.det(affine[:3, :3]))))
    xt, yt, st = geo.to_template(pts)
    c = geo.cord
    sep = _separable(affine)
    if body.elastic_amp > 0:
        # smooth random displacement of the template coordinates, vanishing on the cord axis
        w = np.clip(np.hypot(xt - c.shift_x, yt - c.shift_y) / 3.0, 0.0, 1.0) * 2.0 * body.elastic_amp
        for k, seed in ((0, body.blob_seed + 1), (1, body.blob_seed + 2)):
            f = (_lattice_grid(affine, shape, body.elastic_scale, seed) if sep
                 else _lattice_field(pts, body.elastic_scale, seed))
            if k == 0:
                xt = xt + (f - 0.5) * w
            else:
                yt = yt + (f - 0.5) * w

    static = _sample(tpl.static, tpl.static_origin, (xt, yt, st), 0, 0).astype(np.uint8)
    out = static == 0
    if out.any():
        septa = None
        if sep:
            blob = _blobs(None, body, affine, shape)
            if body.septa_width > 0:
                septa = _lattice_grid(affine, shape, body.septa_scale, body.blob_seed + 3)[out]
        else:
            b = int(blob_step)
            coarse = _blobs(_grid_points(affine, shape, b), body).reshape(tuple(-(-n // b) for n in shape))
            blob = coarse.repeat(b, 0).repeat(b, 1).repeat(b, 2)[: shape[0], : shape[1], : shape[2]].reshape(-1)
        static[out] = _body_labels(tpl, body, xt[out], yt[out], st[out], blob[out], septa)

    # dural sac and cord, with independent scalings
    # above the template's top the cord and the sac continue with their top cross-section
    top_clamp = tpl.top_z - 2.0
    sac_d = _sample(tpl.sac_sdf, tpl.sdf_origin, (xt / c.canal_x, yt / c.canal_y, np.minimum(st, top_clamp)), 1, SDF_FAR)
    sac_d *= np.sqrt(c.canal_x * c.canal_y)
    top, conus0 = tpl.top_z, tpl.conus_z
    zc = np.minimum(top + (st - top) * (top - conus0) / max(top - c.conus_z, 1.0), top_clamp)
    enl = 1.0 + (c.lumbar_enlargement - 1.0) * np.exp(-0.5 * ((zc - conus0 - 30.0) / 25.0) ** 2)
    sx, sy = c.scale_x * enl, c.scale_y * enl
    # the cord only matters inside or near the sac
    u, v = (xt - c.shift_x) / sx, (yt - c.shift_y) / sy
    cand = np.nonzero(u * u + v * v < 81.0)[0]         # the template cord lies within 9 mm of its axis
    cord_d = np.full(st.shape, SDF_FAR, np.float32)
    gm = np.zeros(st.shape, np.float32)
    if cand.size:
        cc = (u[cand], v[cand], zc[cand])
        cord_d[cand] = _sample(tpl.cord_sdf, tpl.sdf_origin, cc, 1, SDF_FAR) * np.sqrt(sx[cand] * sy[cand])
        gm[cand] = _sample(tpl.gm, tpl.sdf_origin, cc, 1, 0).astype(np.float32) / 255.0
    sac_d = np.minimum(sac_d, cord_d - c.rim)
    # a cord larger than its canal pushes bone away: keep a thin epidural layer around the sac
    hard = (cord_d < c.rim + 1.2) & (sac_d >= 0) & np.isin(static, _BONY)
    static[hard] = LABELS["epidural_fat"]
    # nothing of the sac where there is no template sac at all (above the top, below S2)
    content = np.full(st.shape, LABELS["csf"], np.uint8)
    near = (sac_d < voxel) & (st < roots.top + 1) & (st > roots.z0)
    if near.any():
        idx = np.nonzero(near)[0]
        row = np.clip(np.round(st[idx] - roots.z0).astype(int), 0, roots.x.shape[1] - 1)
        rx, ry = roots.x[:, row], roots.y[:, row]
        d2 = (xt[idx][None] - rx * 1.0) ** 2 + (yt[idx][None] - ry) ** 2
        d2 = np.where(np.isnan(d2), np.inf, d2)
        hit = (d2 <= (roots.radius[:, None] ** 2)).any(axis=0)
        content[idx[hit]] = LABELS["cauda_equina"]
        fx, fy = roots.filum_x[row], roots.filum_y[row]
        fd2 = (xt[idx] - fx) ** 2 + (yt[idx] - fy) ** 2
        fil = np.nan_to_num(fd2, nan=np.inf) <= roots.filum_r ** 2
        content[idx[fil]] = LABELS["filum"]

    sac_frac = np.clip(0.5 - sac_d / voxel, 0, 1).astype(np.float32)
    cord_frac = np.clip(0.5 - cord_d / voxel, 0, 1).astype(np.float32)
    labels = static.copy()
    in_sac = sac_d < 0
    labels[in_sac] = content[in_sac]
    in_cord = cord_d < 0
    labels[in_cord] = np.where(gm[in_cord] >= 0.5, LABELS["cord_gm"], LABELS["cord"])
    rs = lambda a: a.reshape(shape)  # noqa: E731
    return Rendered(labels=rs(labels), static=rs(static), content=rs(content), sac_frac=rs(sac_frac),
                    cord_frac=rs(cord_frac), gm=rs(gm), s=rs(st.astype(np.float32)))
