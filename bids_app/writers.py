"""Per-run report writers: vertebral levels and split, Dice metrics, morphometry, QC picture.

Each writer takes the pipeline's ``RunContext`` (``ctx.result`` is the SegmentationResult of
:mod:`bids_app.inference`), writes its files atomically and returns the paths written; the
pipeline calls them in the order of ``pipeline.RUN_WRITERS``. Levels come first because the
metrics (per-region Dice) and the morphometry (per-level summary) use them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bids_app import levels as lv
from bids_app.derivatives import write_json, write_tsv
from bids_app.geometry import apply_affine, reorientation_for, voxel_sizes


def _working(ctx) -> tuple[Any, np.ndarray, tuple[float, float, float]]:
    """(reorientation, working affine, working spacing) of the run's image (computed once per run)."""
    if "working" not in ctx.extras:
        reo = reorientation_for(ctx.loaded.affine, ctx.loaded.data.shape)
        ctx.extras["working"] = (reo, reo.working_affine, voxel_sizes(reo.working_affine))
    return ctx.extras["working"]


def _mask_working(ctx) -> np.ndarray:
    """The final mask in the RAS working orientation (an exact permutation of the native one)."""
    if "mask_working" not in ctx.extras:
        reo, _, _ = _working(ctx)
        ctx.extras["mask_working"] = reo.to_working((np.asarray(ctx.result.mask) > 0).astype(np.uint8))
    return ctx.extras["mask_working"]


def _final_centerline(ctx):
    """The centerline of the final mask (working grid), or the detected one when the mask is empty."""
    from bids_app.centerline import centerline_from_mask

    if "centerline" not in ctx.extras:
        _, waff, _ = _working(ctx)
        result = ctx.result
        ctx.extras["centerline"] = (centerline_from_mask(_mask_working(ctx), waff) if result.cord_found
                                    else result.centerline)
    return ctx.extras["centerline"]


def _rows_to_tsv(path: Path, rows: list[dict]) -> Path:
    header = list(rows[0]) if rows else []
    return write_tsv(path, header, [[row.get(k) for k in header] for row in rows])


def _auto_discs(ctx) -> tuple[list | None, list[Path]]:
    """``--levels auto``: discs detected and identified in the coarse model's heatmaps.

    Returns (identified discs or None, files written). Identified discs are also written as a
    single-voxel label image (``_label-discs_dlabel``, SCT values, header of the image). What
    the identification found is recorded in ``ctx.extras["levels_info"]`` (sidecar).
    """
    heatmaps = getattr(ctx.result, "coarse_heatmaps", None)
    if not heatmaps or heatmaps.get("discs") is None:
        ctx.warnings.append("--levels auto: no model predicts discs (no disc-detection model available); "
                            "vertebral levels and the split were skipped")
        ctx.extras["levels_info"] = {"DiscSource": None, "Reason": "no model predicts discs"}
        return None, []
    auto = lv.discs_from_heatmaps(heatmaps["discs"], heatmaps.get("anchors"), heatmaps["affine"],
                                  centerline=_final_centerline(ctx), conus_tip_mm=ctx.result.conus_tip_mm)
    ident = auto.identification
    ctx.extras["levels_info"] = {
        "DiscSource": "auto",
        "DiscsDetected": int(len(auto.points_mm)),
        "Identified": ident.values is not None,
        "Confidence": round(float(ident.confidence), 4),
        "Reason": ident.reason,
        "SacrumInView": bool(auto.sacrum_in_view),
        "TopInView": bool(auto.top_in_view),
    }
    if ident.values is None:
        ctx.warnings.append(f"--levels auto: disc identities not found, vertebral levels and the split were "
                            f"skipped ({ident.reason})")
        return None, []
    from bids_app.image_io import save_like

    discs = auto.labels(ctx.loaded.affine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", lv.DiscLabelWarning)
        label = lv.discs_to_label_image(discs, ctx.loaded.data.shape, ctx.loaded.affine)
    ctx.warnings.extend(f"detected discs: {w.message}" for w in caught)
    ctx.warnings.append("--levels auto is experimental (disc model trained on synthetic images only): check "
                        f"the detected discs ({ctx.paths.discs.name}) before relying on levels or the split")
    return discs, [save_like(label, ctx.loaded.img, ctx.paths.discs)]


def write_levels(ctx) -> list[Path]:
    """Vertebral levels from the run's discs: discs TSV, per-slice levels, optional split.

    ``--levels labels`` (default) uses the disc labels found in the derivatives; without them
    nothing is written. ``--levels auto`` detects and identifies the discs in the heatmaps of
    a centerline model that predicts them (a "spine" model, see ``inference``), writes them as
    ``_label-discs_dlabel`` and goes on as with labels; when the identities are not
    trustworthy, or no model predicts discs, a warning says so and levels and
    the split are skipped (never guessed). With ``--levels auto`` and a model without disc
    channel, the run's disc labels are used when there are some.
    """
    cfg, run = ctx.cfg, ctx.run
    if cfg.levels == "none" or not ctx.result.cord_found:
        return []
    heatmaps = getattr(ctx.result, "coarse_heatmaps", None)
    written: list[Path] = []
    if cfg.levels == "auto" and (run.disc_labels is None or (heatmaps and heatmaps.get("discs") is not None)):
        discs, written = _auto_discs(ctx)
        if discs is None:
            return written
    elif run.disc_labels is None:
        if cfg.split:
            ctx.warnings.append("--split needs disc labels (derivatives/labels *_label-discs_dlabel); "
                                "none found for this run, the split was skipped")
        return []
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", lv.DiscLabelWarning)
            discs = lv.read_disc_labels(run.disc_labels)
        ctx.warnings.extend(f"disc labels: {w.message}" for w in caught)
        ctx.extras["levels_info"] = {"DiscSource": "labels", "Discs": sum(d.value != lv.CONUS_VALUE for d in discs)}
    centre = _final_centerline(ctx)
    _, waff, _ = _working(ctx)
    point_levels = lv.levels_along_cord(centre, discs)
    points_vox = apply_affine(np.linalg.inv(waff), centre.points_mm)
    per_slice = lv.slice_levels(points_vox, point_levels, _mask_working(ctx).shape[2])
    ctx.extras["discs"] = discs
    ctx.extras["slice_levels"] = per_slice
    ctx.extras["conus_level"] = lv.conus_level(ctx.result.conus_tip_mm, centre, discs)
    ctx.extras["levels_info"]["ConusLevel"] = ctx.extras["conus_level"]
    written += [
        _rows_to_tsv(ctx.paths.discs_tsv, lv.discs_tsv_rows(discs, centre)),
        _rows_to_tsv(ctx.paths.levels_tsv, lv.levels_tsv_rows(per_slice)),
    ]
    split_value = lv.disc_value(cfg.split_level)
    regions, reason = lv.region_masks(ctx.result.mask, ctx.loaded.affine, centre, discs, split_value)
    if regions is None and cfg.split:
        ctx.warnings.append(f"--split at {cfg.split_level} skipped: {reason}")
    ctx.extras["split_value"] = split_value
    if cfg.split and regions is not None:
        from bids_app.image_io import save_like

        dseg = np.zeros(ctx.result.mask.shape, dtype=np.uint8)
        dseg[regions["cervicothoracic"] > 0] = 1
        dseg[regions["lumbosacral"] > 0] = 2
        written.append(save_like(dseg, ctx.loaded.img, ctx.paths.dseg))
        written.append(_rows_to_tsv(ctx.paths.dseg_tsv, lv.dseg_tsv_rows()))
    return written


def write_metrics(ctx) -> list[Path]:
    """Dice report against the reference mask (native grid) and per-slice metrics (working grid)."""
    from bids_app import metrics
    from bids_app.centerline import centerline_from_mask

    if ctx.reference is None:
        return []
    reo, waff, spacing = _working(ctx)
    ref_native = (np.asarray(ctx.reference.data) > 0).astype(np.uint8)
    pred_native = ctx.result.mask
    ref_work = reo.to_working(ref_native)
    ref_centre = centerline_from_mask(ref_work, waff) if ref_work.any() else None
    regions = None
    if "discs" in ctx.extras and ctx.result.cord_found:
        centre = _final_centerline(ctx)
        pred_regions, _ = lv.region_masks(pred_native, ctx.loaded.affine, centre, ctx.extras["discs"],
                                          ctx.extras["split_value"])
        ref_regions, _ = lv.region_masks(ref_native, ctx.loaded.affine, centre, ctx.extras["discs"],
                                         ctx.extras["split_value"])
        if pred_regions is not None and ref_regions is not None:
            regions = {name: np.maximum(pred_regions[name], ref_regions[name]) for name in pred_regions}
    values = metrics.compute_metrics(
        pred_native, ref_native, ctx.loaded.affine,
        conus_tip_pred_mm=ctx.result.conus_tip_mm,
        conus_tip_ref_mm=None if ref_centre is None else ref_centre.conus_tip_mm,
        region_masks=regions,
    )
    notes = [w for w in ctx.reference.warnings]
    report = {
        "metrics": metrics.json_safe(values),
        "grid": "native grid of the image",
        "notes": notes,
        "Reference": str(ctx.run.reference_mask),
    }
    if "levels_info" in ctx.extras:
        report["levels"] = ctx.extras["levels_info"]
    rows = metrics.per_slice_metrics(_mask_working(ctx), ref_work, spacing)
    return [write_json(ctx.paths.metrics_json, report), _rows_to_tsv(ctx.paths.slice_metrics_tsv, rows)]


def write_morphometry(ctx) -> list[Path]:
    """Per-slice cross-sectional area, AP/RL diameters and eccentricity; per-level summary."""
    from bids_app import morphometry

    if not ctx.result.cord_found:
        return []
    _, waff, spacing = _working(ctx)
    centre = _final_centerline(ctx)
    points_vox = apply_affine(np.linalg.inv(waff), centre.points_mm)
    rows = morphometry.cord_morphometry(_mask_working(ctx), spacing, points_vox)
    if "slice_levels" in ctx.extras:
        per_slice = ctx.extras["slice_levels"]
        for row in rows:
            value = per_slice[int(row["slice"])]
            row["vertebra"] = None if not np.isfinite(value) else lv.vertebra_name(int(value))
    ctx.extras["cord_length_mm"] = morphometry.centerline_length_mm(points_vox, spacing)
    written = [_rows_to_tsv(ctx.paths.morphometry_tsv, rows)]
    if "slice_levels" in ctx.extras:
        names = [None if not np.isfinite(v) else lv.vertebra_name(int(v)) for v in ctx.extras["slice_levels"]]
        summary = morphometry.summarise_by_level(rows, names)
        if summary:
            written.append(_rows_to_tsv(ctx.paths.morphometry_levels_tsv, summary))
    return written


def write_qc(ctx) -> list[Path]:
    """The QC picture: curved sagittal view and axial slices with the mask outline and centerline."""
    from bids_app.qc import write_qc_png

    reo, waff, spacing = _working(ctx)
    centre = _final_centerline(ctx)
    points_vox = None
    if centre is not None and len(np.asarray(centre.points_mm).reshape(-1, 3)):
        points_vox = apply_affine(np.linalg.inv(waff), np.asarray(centre.points_mm).reshape(-1, 3))
    title = f"{ctx.run.run_id}  cord {'found' if ctx.result.cord_found else 'NOT found'}"
    return [write_qc_png(ctx.paths.qc_png, reo.to_working(ctx.loaded.data), _mask_working(ctx), spacing,
                         points_vox, title=title)]


#: appended to ``pipeline.RUN_WRITERS`` after the mask and centerline writers
REPORT_WRITERS = [write_levels, write_metrics, write_morphometry, write_qc]
