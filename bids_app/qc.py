"""QC picture per run: a curved sagittal view that follows the centerline, plus axial slices.

The sagittal panel is a curved reformat: for every axial slice ``k`` of the working RAS grid the
column ``image[x_c(k), :, k]`` is sampled at the centerline's x (linear interpolation), so a
cord that leaves the mid-sagittal plane stays in view. The axial panels show ~6 slices evenly
spaced along the cord, cropped around the centerline. The mask outline is drawn in red and the
centerline in cyan. Matplotlib (Agg) is imported inside :func:`write_qc_png` only.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from bids_app.image_io import atomic_write_bytes

N_AXIAL = 6
AXIAL_FOV_MM = 40.0


def centerline_x_y_by_slice(
    centerline_vox: np.ndarray | None, mask_work: np.ndarray, shape
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x(k), y(k) of the centerline at every axial slice (clamped beyond its ends) and a boolean
    telling where the centerline (or, without one, the mask) actually exists.

    Without a centerline, the per-slice centroid of the mask is used; without either, the
    array's centre.
    """
    nz = shape[2]
    ks = np.arange(nz, dtype=np.float64)
    pts = None if centerline_vox is None else np.asarray(centerline_vox, dtype=np.float64).reshape(-1, 3)
    if pts is None or len(pts) == 0:
        m = np.asarray(mask_work) != 0
        present = m.any(axis=(0, 1))
        if not present.any():
            return np.full(nz, (shape[0] - 1) / 2), np.full(nz, (shape[1] - 1) / 2), present
        cents = np.array([ndimage.center_of_mass(m[:, :, k]) for k in np.nonzero(present)[0]])
        pts = np.column_stack([cents, np.nonzero(present)[0]])
    else:
        present = (ks >= pts[:, 2].min() - 0.5) & (ks <= pts[:, 2].max() + 0.5)
    order = np.argsort(pts[:, 2], kind="stable")
    pts = pts[order]
    return np.interp(ks, pts[:, 2], pts[:, 0]), np.interp(ks, pts[:, 2], pts[:, 1]), present


def curved_sagittal(volume: np.ndarray, x_by_slice: np.ndarray, order: int = 1) -> np.ndarray:
    """(Y, Z) image: for each axial slice k, the sagittal column at x = x_by_slice[k]."""
    nx, ny, nz = volume.shape
    yy, kk = np.meshgrid(np.arange(ny), np.arange(nz), indexing="ij")
    xx = np.broadcast_to(np.clip(x_by_slice, 0, nx - 1)[None, :], yy.shape)
    return ndimage.map_coordinates(
        np.asarray(volume, dtype=np.float32), [xx, yy, kk], order=order, mode="nearest"
    )


def _window(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _axial_slices(present: np.ndarray, n: int) -> np.ndarray:
    ks = np.nonzero(present)[0]
    if ks.size == 0:
        ks = np.arange(present.size)
    picks = np.linspace(ks.min(), ks.max(), n + 2)[1:-1] if ks.size > n else ks
    return np.unique(np.round(picks).astype(int))


def write_qc_png(
    path: str | os.PathLike,
    image_work: np.ndarray,
    mask_work: np.ndarray,
    spacing,
    centerline_vox: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Write the QC PNG (atomic write) and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(image_work, dtype=np.float32)
    mask = (np.asarray(mask_work) != 0).astype(np.float32)
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be 3-D on the same grid")
    sx, sy, sz = (float(s) for s in spacing)
    xs, ys, present = centerline_x_y_by_slice(centerline_vox, mask, image.shape)
    vmin, vmax = _window(image)

    fig = Figure(figsize=(13, 7), dpi=90)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 1 + N_AXIAL // 2, width_ratios=[2] + [1] * (N_AXIAL // 2))
    ax_sag = fig.add_subplot(grid[:, 0])
    sag = curved_sagittal(image, xs)
    sag_mask = curved_sagittal(mask, xs, order=0)
    extent = (-0.5 * sy, (image.shape[1] - 0.5) * sy, -0.5 * sz, (image.shape[2] - 0.5) * sz)
    ax_sag.imshow(
        sag.T, cmap="gray", origin="lower", extent=extent, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    if sag_mask.any():
        ax_sag.contour(np.arange(image.shape[1]) * sy, np.arange(image.shape[2]) * sz, sag_mask.T, levels=[0.5],
                       colors="red", linewidths=0.8)  # fmt: skip
    if centerline_vox is not None and present.any():
        ax_sag.plot(ys[present] * sy, np.nonzero(present)[0] * sz, color="cyan", linewidth=0.8)
    ax_sag.set_title("curved sagittal (posterior left, superior up)", fontsize=9)
    ax_sag.set_xlabel("y (mm, P→A)")
    ax_sag.set_ylabel("z (mm, I→S)")

    half_x, half_y = AXIAL_FOV_MM / 2 / sx, AXIAL_FOV_MM / 2 / sy
    for i, k in enumerate(_axial_slices(present, N_AXIAL)):
        ax = fig.add_subplot(grid[i // (N_AXIAL // 2), 1 + i % (N_AXIAL // 2)])
        cx, cy = xs[k], ys[k]
        x0, x1 = int(max(0, np.floor(cx - half_x))), int(min(image.shape[0], np.ceil(cx + half_x) + 1))
        y0, y1 = int(max(0, np.floor(cy - half_y))), int(min(image.shape[1], np.ceil(cy + half_y) + 1))
        extent = ((x0 - 0.5) * sx, (x1 - 0.5) * sx, (y0 - 0.5) * sy, (y1 - 0.5) * sy)
        ax.imshow(image[x0:x1, y0:y1, k].T, cmap="gray", origin="lower", extent=extent, vmin=vmin, vmax=vmax,
                  interpolation="nearest")  # fmt: skip
        section = mask[x0:x1, y0:y1, k]
        if section.any() and min(section.shape) > 1:
            ax.contour(np.arange(x0, x1) * sx, np.arange(y0, y1) * sy, section.T, levels=[0.5], colors="red",
                       linewidths=0.8)  # fmt: skip
        if centerline_vox is not None and present[k]:
            ax.plot([cx * sx], [cy * sy], marker="+", color="cyan", markersize=8)
        ax.set_title(f"axial z = {k * sz:.0f} mm (slice {k}), R right, A up", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or "conus QC", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
