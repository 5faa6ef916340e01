"""Whole-field-of-view evaluation of a coarse model on held-out synthetic views.

Patch Dice says little about what the coarse model is for. This module runs it the way the
pipeline does, over whole synthetic fields of view (``bids_app.synth.generate_sample``), and
measures what users rely on:

- centerline error (mm, symmetric point-to-curve over the common S-I range) and whether a
  cord is found at all (views entirely below the conus must give none);
- conus tip error (mm) when the tip is in view (a missed tip counts as a failure);
- for models with ``discs``/``anchors`` outputs: disc position error (mm, each true disc
  matched to the nearest detection within ``match_mm``), detection recall, identities
  (a disc counts as correct only when detected *and* given its true value; a skipped
  identification counts as a failure), wrong identities (detected discs given another value: a
  skip is safe, a wrong value is not) and the T9-T10 split-point error.

Used by ``conus train --task spine`` (numbers recorded in the bundle) and by
``evaluation/eval_levels.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

LOG = logging.getLogger("conus.training")

VIEW_REGIONS = ("whole", "cervical", "thoracic", "thoracolumbar", "lumbosacral", "below_conus")
VIEW_SEED = 4_000_000
SPLIT_VALUE = 17   # T9-T10


def view_heatmaps(predict_fn, sample, outputs: Sequence[str], patch_size, overlap: float = 0.5):
    """``(heat (X, Y, Z, C), centerline)`` of one view: the model's sliding-window outputs and the
    global centerline fit on its cord output, as the pipeline computes them."""
    from bids_app import centerline as cl
    from bids_app.segment import sliding_window_predict

    heat = sliding_window_predict(sample.image.astype(np.float32), predict_fn, patch_size, overlap)
    if heat.ndim == 3:
        heat = heat[..., None]
    centre = cl.fit_centerline(heat[..., list(outputs).index("cord")], sample.affine, sample.spacing)
    return heat, centre


def true_discs(sample) -> list[tuple[int, np.ndarray]]:
    """The view's real intervertebral discs, C2-C3 (3) to L5-S1 (25): ``(SCT value, xyz mm)``."""
    return [(int(v), np.asarray(p, float)) for v, p in sample.discs if 3 <= int(v) <= 25]


def match_true_discs(points_mm: np.ndarray, truth: list[tuple[int, np.ndarray]], match_mm: float = 10.0):
    """For each true disc ``(value, xyz mm)``: ``(value, index of the nearest detection, distance mm)``,
    or ``(value, None, None)`` when no detection lies within ``match_mm``."""
    out = []
    for value, point in truth:
        if len(points_mm):
            d = np.linalg.norm(np.asarray(points_mm) - point, axis=1)
            i = int(np.argmin(d))
            if d[i] <= match_mm:
                out.append((value, i, float(d[i])))
                continue
        out.append((value, None, None))
    return out


def view_discs(heat: np.ndarray, outputs: Sequence[str], sample, centre):
    """Detected and identified discs (:class:`bids_app.levels.AutoDiscs`) from a spine model's outputs."""
    from bids_app import levels as lv

    anchors = heat[..., list(outputs).index("anchors")] if "anchors" in outputs else None
    return lv.discs_from_heatmaps(heat[..., list(outputs).index("discs")], anchors, sample.affine,
                                  centerline=centre if centre.found else None,
                                  conus_tip_mm=centre.conus_tip_mm if centre.found else None)


def evaluate_view(predict_fn, sample, outputs: Sequence[str], patch_size, overlap: float = 0.5,
                  match_mm: float = 10.0) -> dict:
    """Metrics of one synthetic whole view (see the module docstring)."""
    from bids_app import centerline as cl

    heat, centre = view_heatmaps(predict_fn, sample, outputs, patch_size, overlap)
    spacing = sample.spacing
    has_cord = bool(sample.cord.any())
    row: dict = {"region": sample.region, "contrast": sample.contrast, "has_cord": has_cord,
                 "cord_found": bool(centre.found)}
    if has_cord and len(sample.centerline_mm) and centre.found:
        truth = cl.Centerline(np.zeros_like(sample.centerline_mm), sample.centerline_mm, sample.affine, spacing, True)
        err = cl.centerline_error_mm(centre, truth)
        row["centerline_mean_mm"], row["centerline_max_mm"] = err.mean_mm, err.max_mm
    if sample.conus_tip_mm is not None:
        tip = centre.conus_tip_mm if centre.found else None
        row["conus_tip_error_mm"] = (float(np.linalg.norm(np.asarray(tip) - sample.conus_tip_mm))
                                     if tip is not None else None)
    if "discs" not in outputs:
        return row
    truth = true_discs(sample)
    auto = view_discs(heat, outputs, sample, centre)
    values = auto.identification.values
    errors, correct, wrong = [], 0, 0
    split_error = None
    for value, i, dist in match_true_discs(auto.points_mm, truth, match_mm):
        if i is None:
            continue
        errors.append(dist)
        if values is not None and values[i] == value:
            correct += 1
            if value == SPLIT_VALUE:
                split_error = dist
        elif values is not None:
            wrong += 1
    row.update({"discs_true": len(truth), "discs_detected": int(len(auto.points_mm)), "discs_matched": len(errors),
                "disc_errors_mm": errors, "identities_correct": correct, "identities_wrong": wrong,
                "identified": values is not None, "sacrum_in_view": auto.sacrum_in_view,
                "top_in_view": auto.top_in_view, "identification": auto.identification.reason,
                "split_point_error_mm": split_error,
                "split_point_true": any(v == SPLIT_VALUE for v, _ in truth)})
    return row


def _nanmean(values) -> float | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def summarise(rows: list[dict]) -> dict:
    """Aggregate :func:`evaluate_view` rows (means over the views where a number exists)."""
    with_cord = [r for r in rows if r["has_cord"]]
    without = [r for r in rows if not r["has_cord"]]
    tips = [r["conus_tip_error_mm"] for r in rows if "conus_tip_error_mm" in r]
    out = {
        "n_views": len(rows),
        "cord_found_rate": (sum(r["cord_found"] for r in with_cord) / len(with_cord)) if with_cord else None,
        "false_cord_rate_below_conus": (sum(r["cord_found"] for r in without) / len(without)) if without else None,
        "centerline_mean_mm": _nanmean([r.get("centerline_mean_mm") for r in with_cord]),
        "centerline_max_mm_median": (float(np.median([r["centerline_max_mm"] for r in with_cord
                                                       if r.get("centerline_max_mm") is not None]))
                                     if any(r.get("centerline_max_mm") is not None for r in with_cord) else None),
        "conus_tip_views": len(tips),
        "conus_tip_missed": sum(t is None for t in tips),
        "conus_tip_error_mm_mean": _nanmean(tips),
        "conus_tip_error_mm_median": (float(np.median([t for t in tips if t is not None]))
                                      if any(t is not None for t in tips) else None),
        "conus_tip_within_3mm": (sum(t is not None and t <= 3.0 for t in tips) / len(tips)) if tips else None,
    }
    disc_rows = [r for r in rows if "discs_true" in r]
    if disc_rows:
        errs = [e for r in disc_rows for e in r["disc_errors_mm"]]
        n_true = sum(r["discs_true"] for r in disc_rows)
        splits = [r for r in disc_rows if r["split_point_true"]]
        out.update({
            "discs_true": n_true,
            "disc_recall": (sum(r["discs_matched"] for r in disc_rows) / n_true) if n_true else None,
            "disc_error_mm_mean": float(np.mean(errs)) if errs else None,
            "disc_error_mm_median": float(np.median(errs)) if errs else None,
            "disc_within_3mm": (sum(e <= 3.0 for e in errs) / n_true) if n_true else None,
            "identities_correct_rate": (sum(r["identities_correct"] for r in disc_rows) / n_true) if n_true else None,
            "identities_wrong_rate": (sum(r.get("identities_wrong", 0) for r in disc_rows) / n_true) if n_true else None,
            "identified_views": sum(r["identified"] for r in disc_rows if r["discs_true"]),
            "views_with_discs": sum(1 for r in disc_rows if r["discs_true"]),
            "split_point_views": len(splits),
            "split_point_within_3mm": (sum(r["split_point_error_mm"] is not None and r["split_point_error_mm"] <= 3.0
                                           for r in splits) / len(splits)) if splits else None,
        })
    return out


def held_out_views(*, spacing, pam50_dir: str | None, n_per_region: int = 4, regions: Sequence[str] = VIEW_REGIONS,
                   seed0: int = VIEW_SEED, strength: float = 1.0):
    """Yield ``(region, seed, source, sample)`` for the held-out whole views: seeds ``seed0 + 1000 *
    region index + i``, PAM50 when available, every 4th a phantom."""
    from bids_app.synth import generate_sample

    for ri, region in enumerate(regions):
        for i in range(n_per_region):
            seed = seed0 + 1000 * ri + i
            source = "phantom" if (pam50_dir is None or i % 4 == 3) else "pam50"
            yield region, seed, source, generate_sample(seed, source=source, pam50_dir=pam50_dir, region=region,
                                                        spacing=tuple(spacing), strength=strength)


def evaluate_views(predict_fn, *, outputs: Sequence[str], spacing, patch_size, pam50_dir: str | None,
                   n_per_region: int = 4, regions: Sequence[str] = VIEW_REGIONS, seed0: int = VIEW_SEED,
                   strength: float = 1.0) -> dict:
    """Held-out whole views (:func:`held_out_views`), summarised overall and per region; ``rows``
    holds the per-view numbers."""
    rows = []
    for region, seed, source, sample in held_out_views(spacing=spacing, pam50_dir=pam50_dir,
                                                       n_per_region=n_per_region, regions=regions,
                                                       seed0=seed0, strength=strength):
        row = evaluate_view(predict_fn, sample, outputs, patch_size)
        row.update({"seed": seed, "source": source, "requested_region": region})
        rows.append(row)
        LOG.info("view %s/%s seed %d: %s", region, source, seed,
                 {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()
                  if k in ("cord_found", "centerline_mean_mm", "conus_tip_error_mm", "discs_true",
                           "discs_matched", "identities_correct")})
    by_region = {region: summarise([r for r in rows if r["requested_region"] == region]) for region in regions}
    return {"all": summarise(rows), "by_region": by_region, "rows": rows,
            "description": f"{len(rows)} held-out whole synthetic views (seeds {seed0}+, strength {strength}), "
                           "the model run as in the pipeline (sliding window, global centerline fit, "
                           "disc peaks + identification)"}
