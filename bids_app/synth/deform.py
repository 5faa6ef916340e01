"""Random spine geometry: how a straight template is bent, stretched and placed in space.

A :class:`SpineGeometry` maps scanner (world) mm to the straightened template frame of
:mod:`bids_app.synth.template` and back.  The spine's axis is a smooth curve whose
sagittal offset combines cervical lordosis, thoracic kyphosis, lumbar lordosis and the
sacral bend, whose coronal offset is a scoliosis, whose arc length is the template length
times a smoothly varying length factor (±15 %), and which is tilted as a whole.
Cord-specific parameters (cross-section scale and AP/RL ratio, shift inside the canal,
conus level, CSF rim) are independent of the column.

The world→template map is first order in the distance to the axis (exact for straight
segments): it rotates the sagittal offset into the local normal plane, so that
cross-sections stay round on curved segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bids_app.synth.template import SpineTemplate

#: mm of spine axis tabulated above the template (the cord continues up into the medulla)
EXTRA_TOP = 80.0


@dataclass(frozen=True)
class CordParams:
    """Per-sample cord and canal parameters (template frame, mm)."""

    scale_x: float            # RL scale of the cord cross-section
    scale_y: float            # AP scale
    lumbar_enlargement: float  # extra scale of the lumbar enlargement (multiplies near the conus)
    shift_x: float            # cord centre offset inside the canal (mm)
    shift_y: float            # AP offset (negative = posterior, as in supine scans)
    canal_x: float            # dural sac scale (RL)
    canal_y: float            # dural sac scale (AP)
    rim: float                # minimum CSF rim around the cord (mm)
    conus_z: float            # template z of the conus tip after the shift
    n_roots: int              # cauda equina roots


@dataclass(frozen=True)
class SpineGeometry:
    """Tabulated spine axis (arrays over template z at 1 mm) and its placement."""

    s: np.ndarray             # template z (mm)
    axis_x: np.ndarray        # body-frame x of the axis at s
    axis_y: np.ndarray
    axis_z: np.ndarray        # increasing with s
    theta: np.ndarray         # sagittal tangent angle (rad)
    length_scale: np.ndarray  # local arc-length factor
    rotation: np.ndarray      # 3x3 body -> world
    origin: np.ndarray        # world position of body-frame origin
    cord: CordParams

    def to_template(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World mm points (N, 3) → template coordinates (x_t, y_t, s)."""
        q = _apply(self.rotation.T, pts - self.origin)   # = R^T (p - o)
        qz = q[:, 2]
        # one search, reused for every tabulated quantity (axis_z is increasing)
        n = self.axis_z.size
        k = np.clip(np.searchsorted(self.axis_z, qz) - 1, 0, n - 2)
        z0, z1 = self.axis_z[k], self.axis_z[k + 1]
        w = np.clip((qz - z0) / (z1 - z0), 0.0, 1.0)

        def at(tab):
            return tab[k] * (1 - w) + tab[k + 1] * w

        s0, ax, ay, th, ls = at(self.s), at(self.axis_x), at(self.axis_y), at(self.theta), at(self.length_scale)
        d = q[:, 1] - ay
        yt = d * np.cos(th)
        st = s0 + d * np.sin(th) / ls
        # beyond the tabulated ends continue straight
        lo, hi = self.axis_z[0], self.axis_z[-1]
        st = np.where(qz < lo, self.s[0] + (qz - lo) / self.length_scale[0], st)
        st = np.where(qz > hi, self.s[-1] + (qz - hi) / self.length_scale[-1], st)
        return q[:, 0] - ax, yt, st

    def to_world(self, xt: np.ndarray, yt: np.ndarray, st: np.ndarray) -> np.ndarray:
        """Template coordinates → world mm (N, 3) (inverse of :meth:`to_template`)."""
        ax = np.interp(st, self.s, self.axis_x)
        ay = np.interp(st, self.s, self.axis_y)
        az = np.interp(st, self.s, self.axis_z)
        th = np.interp(st, self.s, self.theta)
        body = np.stack([ax + xt, ay + yt * np.cos(th), az - yt * np.sin(th)], axis=-1)
        return _apply(self.rotation, body) + self.origin

    def cord_point(self, st: np.ndarray) -> np.ndarray:
        """World mm of the cord centre at template heights ``st``."""
        st = np.atleast_1d(np.asarray(st, float))
        return self.to_world(np.full_like(st, self.cord.shift_x), np.full_like(st, self.cord.shift_y), st)

    def world_z_of(self, st: float) -> float:
        return float(self.cord_point(np.array([st]))[0, 2])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``pts @ m.T`` for (N, 3) points without BLAS (which is slow for 3-wide products
    when threads compete for a loaded CPU)."""
    return np.stack([pts[:, 0] * m[i, 0] + pts[:, 1] * m[i, 1] + pts[:, 2] * m[i, 2] for i in range(3)], axis=1)


def _bump(s: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Raised-cosine bump equal to 1 at the middle of [lo, hi] and 0 outside."""
    t = np.clip((s - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(2 * np.pi * t)


def _smooth_noise(rng: np.random.Generator, s: np.ndarray, step: float, amp: float) -> np.ndarray:
    knots = np.arange(s[0] - step, s[-1] + 2 * step, step)
    vals = rng.normal(0.0, amp, size=knots.size)
    from scipy.interpolate import CubicSpline

    return CubicSpline(knots, vals)(s)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def random_geometry(rng: np.random.Generator, tpl: SpineTemplate, *, strength: float = 1.0,
                    straight: bool = False, size_variation: bool = True) -> SpineGeometry:
    """Draw a random spine geometry for ``tpl``.

    ``strength`` scales all shape variations (1 = training ranges; > 1 reaches outside them,
    for held-out tests).  ``straight=True`` gives an untilted straight spine of template
    length (used by tests that need exact geometry).  ``size_variation=False`` keeps the
    template's cord, canal and enlargement sizes (an ablation of :func:`random_cord`'s sizes).
    """
    dz = tpl.disc_z
    s = np.arange(0.0, tpl.nz + EXTRA_TOP)
    if straight:
        zeros = np.zeros_like(s)
        geo_len = np.ones_like(s)
        theta = zeros
        ax, ay, az = zeros, zeros, s.copy()
        rot = np.eye(3)
    else:
        cerv = rng.uniform(-2, 14) * strength * _bump(s, dz[8] - 20, dz[1] + 25)
        thor = -rng.uniform(0, 30) * strength * _bump(s, dz[20] - 10, dz[8] + 10)
        lumb = rng.uniform(0, 20) * strength * _bump(s, dz[25] - 10, dz[19] + 10)
        below = np.clip(dz[25] - s, 0, None)
        sacral = -rng.uniform(0.002, 0.008) * strength * below ** 2
        y_off = cerv + thor + lumb + sacral + _smooth_noise(rng, s, 80.0, 2.0 * strength)
        x_off = rng.uniform(0, 12) * strength * rng.choice([-1, 1]) * _bump(s, dz[24] - rng.uniform(0, 80), dz[5] + rng.uniform(0, 80))
        x_off = x_off + _smooth_noise(rng, s, 100.0, 1.5 * strength)
        base = rng.uniform(1 - 0.15 * strength, 1 + 0.15 * strength)
        geo_len = np.clip(base * (1 + _smooth_noise(rng, s, 120.0, 0.04 * strength)), 0.6, 1.5)
        dy = np.gradient(y_off, s)
        dx = np.gradient(x_off, s)
        theta = np.arctan(dy)
        phi = np.arctan(dx)
        # integrate the curve so that arc length = length factor * template length
        az = np.concatenate([[0.0], np.cumsum(geo_len[1:] * np.cos(theta[1:]) * np.cos(phi[1:]))])
        ay = np.concatenate([[0.0], np.cumsum(geo_len[1:] * np.sin(theta[1:]))])
        ax = np.concatenate([[0.0], np.cumsum(geo_len[1:] * np.sin(phi[1:]))])
        ay, ax = ay - ay[int(dz[12])], ax - ax[int(dz[12])]
        rot = _rotation(np.deg2rad(rng.uniform(-8, 8) * strength), np.deg2rad(rng.uniform(-4, 4) * strength),
                        np.deg2rad(rng.uniform(-6, 6) * strength))
    cord = random_cord(rng, tpl, strength=strength, size_variation=size_variation)
    return SpineGeometry(s=s, axis_x=ax, axis_y=ay, axis_z=az, theta=theta, length_scale=geo_len,
                         rotation=rot, origin=np.zeros(3), cord=cord)


def random_cord(rng: np.random.Generator, tpl: SpineTemplate, *, strength: float = 1.0,
                size_variation: bool = True) -> CordParams:
    """Cord size (0.6x-2.5x area, own AP/RL ratio), position in the canal, conus level, CSF rim.

    ``size_variation=False`` draws the same random numbers but keeps the template's sizes (cord,
    dural sac and lumbar enlargement scale 1).
    """
    lo, hi = np.log(0.6), np.log(2.5)
    mid = 0.5 * (lo + hi)
    area = float(np.exp(mid + (rng.uniform(lo, hi) - mid) * strength))
    ratio = float(np.exp(rng.normal(0.0, 0.12 * strength)))
    sx, sy = np.sqrt(area * ratio), np.sqrt(area / ratio)
    dz = tpl.disc_z
    conus_lo = 0.5 * (dz[21] + dz[22])            # mid L2
    conus_hi = 0.5 * (dz[19] + dz[20])            # mid T12
    span = conus_hi - conus_lo
    conus = float(rng.uniform(conus_lo - 0.25 * span * (strength - 1), conus_hi + 0.25 * span * (strength - 1)))
    canal = float(np.exp(rng.uniform(np.log(0.8), np.log(1.4))))
    canal_ratio = float(np.exp(rng.normal(0, 0.08)))
    enlargement = float(rng.uniform(0.9, 1.3))
    if not size_variation:
        sx = sy = canal = canal_ratio = enlargement = 1.0
    return CordParams(
        scale_x=float(sx), scale_y=float(sy),
        lumbar_enlargement=enlargement,
        shift_x=float(rng.normal(0, 0.5)), shift_y=float(rng.uniform(-2.0, 1.0)),
        canal_x=canal * canal_ratio, canal_y=canal / canal_ratio,
        rim=float(rng.choice([rng.uniform(0.05, 0.4), rng.uniform(0.4, 2.0)])),
        conus_z=conus, n_roots=int(rng.integers(24, 48)),
    )
