"""Segment one image: centerline → crop → sliding-window U-Net → native-grid mask.

This is the per-image chain of the participant level (``pipeline.py`` handles BIDS, files and
the batch). Every preprocessing parameter (spacing, patch size, normalisation, threshold)
comes from the model bundles; nothing here is tuned to a particular model.

Steps:
1. reorient to RAS (permute/flip only, exact);
2. centerline: ``auto`` (coarse heatmap model + global fit), ``reference`` (from the reference
   mask) or ``file`` (a user's mask or points). In ``auto`` mode a small image (at most
   ``whole_image_windows`` segmentation windows) is segmented whole and the centerline is fitted
   to those probabilities (more accurate than the coarse model on small fields of view, for
   about the cost of the crop); a large image whose coarse heatmap shows no cord, or whose crop
   around the coarse centerline holds no cord (a decoy), is also segmented whole, within
   ``fallback_windows``, with a warning (when the coarse model saw no cord at all, the whole
   image must show at least ``fallback_min_cord_mm3`` of cord to overrule it);
3. crop box on the segmentation grid around the centerline, extended ``crop_extension_mm``
   beyond both ends along their last direction, so that the segmentation model — not the
   centerline — decides where the cord ends (the thesis's finding about deepseg);
4. sliding-window probabilities on the crop, resampled back onto the native grid;
5. threshold (bundle), keep the cord's components, fill axial holes, trim what lies more than
   ``trim_margin_mm`` below the conus tip found in the segmentation probabilities themselves.

Region-aware segmentation (``lumbosacral_model``): between steps 4 and 5, a second segmentation
bundle is run on the stretch of the crop below the split disc (the run's disc labels, ``split``)
and its probabilities replace the general model's below the split plane, blended linearly over
``region_blend_mm`` on either side (the same plane as ``--split``).

The centerline bundle is a one-channel "centerline" model or a multi-channel "spine" model whose
``outputs`` name its channels (``cord``, ``discs``, ``anchors``). The centerline always comes
from the ``cord`` channel. With ``disc_heatmaps`` set (``--levels auto``), the disc and anchor
heatmaps are kept on the result (``coarse_heatmaps``): from the coarse centerline run when its
bundle has a ``discs`` channel, else from a separate pass of the levels bundle (a spine model,
``levels_model`` or the shipped default), which also runs when the centerline did not need the
coarse model (small image segmented whole, or ``reference`` / ``file`` centerline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_app import centerline as cl
from bids_app import postprocess
from bids_app.config import DEFAULT_OVERLAP
from bids_app.geometry import (
    CropBox,
    apply_affine,
    box_around_points,
    grid_for_spacing,
    reorientation_for,
    resample,
    resample_to_grid,
)
from bids_app.image_io import LoadedImage
from bids_app.segment import overlap_voxels, sliding_window_predict, window_starts

CENTERLINE_MODES = ("auto", "reference", "file")


@dataclass(frozen=True)
class InferenceOptions:
    """What ``segment_image`` needs besides the image (all from the command line)."""

    model: str | None = None  # segmentation bundle name or path (None: the registry default)
    centerline_model: str | None = None  # centerline bundle name or path (None: default)
    centerline_mode: str = "auto"
    centerline_file: Path | None = None
    overlap: float = DEFAULT_OVERLAP
    tta: bool = False
    crop_extension_mm: float = 30.0
    trim_margin_mm: float = 10.0
    # auto mode: images needing at most this many segmentation windows are segmented whole
    # (the crop would cover most of them anyway); larger ones use the coarse centerline model
    # and fall back to the whole image, within ``fallback_windows``, when it finds no cord
    whole_image_windows: int = 64
    fallback_windows: int = 400
    # when the coarse model found no cord at all, the whole-image fallback must find at least
    # this much cord to overrule it (a real cord in view, even a conus alone, is larger; small
    # cord-like blobs in views below the conus are not)
    fallback_min_cord_mm3: float = 500.0
    # the crop's sliding windows only run within this distance of the (extended) centerline
    roi_radius_mm: float = 12.0
    # --levels auto: compute the disc and anchor heatmaps, with the centerline bundle when it
    # predicts them, else with the levels bundle (``levels_model`` or the shipped default)
    disc_heatmaps: bool = False
    levels_model: str | None = None
    # region-aware segmentation: below the split disc this segmentation bundle takes over from
    # ``model``, the two blended linearly over +-``region_blend_mm`` around the split plane
    lumbosacral_model: str | None = None
    region_blend_mm: float = 5.0


@dataclass(frozen=True)
class RegionSplit:
    """Where the lumbosacral model takes over: the run's disc labels and the split disc value."""

    discs: tuple          # levels.DiscLabel (or (value, point_mm)) entries
    split_value: int


@dataclass
class SegmentationResult:
    """The outcome of :func:`segment_image`; arrays on the native grid unless said otherwise."""

    mask: np.ndarray  # uint8 0/1, native grid
    probability: np.ndarray | None  # float32, native grid
    centerline: cl.Centerline  # working grid of the stage that produced it; points_mm are scanner mm
    centerline_mask: np.ndarray  # uint8, native grid, one voxel per working axial slice
    cord_found: bool
    conus_tip_mm: np.ndarray | None  # from the final mask (None when the cord leaves the view)
    working_affine: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    model_info: dict = field(default_factory=dict)
    # the coarse model's disc heatmaps when its bundle predicts discs: {"affine": 4x4 scanner-mm
    # affine of the coarse (RAS working, resampled) grid, "discs": float32 array on that grid,
    # "anchors": float32 array or None}; None when no disc channel was run
    coarse_heatmaps: dict | None = None


def levels_bundle(centerline, levels_model: str | None = None):
    """The bundle whose disc heatmaps ``--levels auto`` reads: the (loaded) ``centerline`` bundle
    when it predicts discs and no ``levels_model`` is named, else ``levels_model`` or the shipped
    default levels bundle, loaded; None when there is none."""
    from bids_app.bundle import load_bundle
    from bids_app.registry import default_bundle

    if levels_model is None and centerline is not None and centerline.channel("discs") is not None:
        return centerline
    name = levels_model or default_bundle("levels", required=False)
    return load_bundle(name) if name else None


def _segmentation_windows(work: np.ndarray, waff: np.ndarray, models, overlap) -> int:
    """Sliding windows the segmentation model needs to cover the whole working image."""
    fine_shape, _ = grid_for_spacing(work.shape, waff, models.segmentation.spacing)
    return count_windows(fine_shape, models.segmentation.patch_size, overlap)


class Models:
    """The bundles one participant-level invocation uses, loaded (and verified) once.

    ``levels`` is the bundle whose ``discs`` (and ``anchors``) channels ``--levels auto`` reads:
    the centerline bundle itself when it predicts discs, else the levels bundle; None when disc
    heatmaps were not asked for or no such bundle exists.
    """

    def __init__(self, options: InferenceOptions):
        from bids_app.bundle import load_bundle
        from bids_app.errors import BundleError
        from bids_app.registry import default_bundle, serves

        self.segmentation = load_bundle(options.model or default_bundle("segmentation"))
        self.centerline = None
        if options.centerline_mode == "auto":
            self.centerline = load_bundle(options.centerline_model or default_bundle("centerline"))
        self.levels = levels_bundle(self.centerline, options.levels_model) if options.disc_heatmaps else None
        self.lumbosacral = load_bundle(options.lumbosacral_model) if options.lumbosacral_model else None
        for role in ("segmentation", "centerline", "levels", "lumbosacral"):
            bundle = getattr(self, role)
            if bundle is not None and not serves("segmentation" if role == "lumbosacral" else role, bundle.task):
                raise BundleError(f"model {bundle.name!r} (task {bundle.task!r}) cannot be used as the "
                                  f"{role} model", path=bundle.path)
        for role, channel in (("centerline", "cord"), ("levels", "discs")):
            bundle = getattr(self, role)
            if bundle is not None and bundle.channel(channel) is None:
                raise BundleError(f"{role} model {bundle.name!r} has no {channel!r} output "
                                  f"(outputs: {', '.join(bundle.outputs)})", path=bundle.path)
        self._predict: dict[str, object] = {}

    @property
    def predicts_discs(self) -> bool:
        """True when a bundle for disc heatmaps is loaded."""
        return self.levels is not None

    def predict_fn(self, which: str):
        """The batch predictor of a role's bundle, e.g. ``"segmentation"`` or ``"centerline"`` (built once)."""
        if which not in self._predict:
            self._predict[which] = getattr(self, which).predict_fn()
        return self._predict[which]

    def info(self) -> dict:
        """Name, version and sha256 of each bundle, for sidecars and provenance."""
        out = {}
        for which in ("segmentation", "centerline", "levels", "lumbosacral"):
            bundle = getattr(self, which)
            if bundle is not None and not (which == "levels" and bundle is self.centerline):
                out[which] = {
                    "name": bundle.metadata.get("name"),
                    "version": bundle.metadata.get("version"),
                    "sha256": bundle.sha256,
                    "path": str(bundle.path),
                }
        return out


def count_windows(shape, patch_size, overlap) -> int:
    """Number of sliding windows needed to cover ``shape`` (pure arithmetic, no prediction)."""
    ov = overlap_voxels(overlap, patch_size)
    n = 1
    for length, patch, o in zip(shape, patch_size, ov, strict=True):
        n *= len(window_starts(max(int(length), int(patch)), int(patch), o))
    return n


def _coarse_predict(work: np.ndarray, waff: np.ndarray, models: Models, which: str, overlap: float):
    """The coarse bundle ``which`` ("centerline" or "levels") over the whole field of view;
    returns (heatmaps (X, Y, Z, C) on the coarse grid, coarse affine)."""
    bundle = getattr(models, which)
    coarse, caff = resample(work, waff, bundle.spacing, order=1)
    heat = sliding_window_predict(coarse, models.predict_fn(which), bundle.patch_size, overlap)
    if heat.ndim == 3:
        heat = heat[..., None]
    if heat.shape[3] != len(bundle.outputs):
        from bids_app.errors import BundleError

        raise BundleError(f"model {bundle.name!r} predicted {heat.shape[3]} channels but its metadata "
                          f"names {len(bundle.outputs)} outputs", path=bundle.path)
    return heat, caff


def _disc_maps(heat: np.ndarray, caff: np.ndarray, bundle) -> dict:
    """The disc (and anchor) channels of a coarse prediction, as ``SegmentationResult.coarse_heatmaps``."""
    anchors = bundle.channel("anchors")
    return {"affine": caff, "discs": np.ascontiguousarray(heat[..., bundle.channel("discs")]),
            "anchors": None if anchors is None else np.ascontiguousarray(heat[..., anchors])}


def _coarse_centerline(work: np.ndarray, waff: np.ndarray, models: Models, overlap: float):
    """The coarse model over the whole field of view, then the global curve fit on its cord
    channel; returns (centerline, disc heatmaps when the same bundle serves the levels, or None)."""
    bundle = models.centerline
    heat, caff = _coarse_predict(work, waff, models, "centerline", overlap)
    centre = cl.fit_centerline(np.ascontiguousarray(heat[..., bundle.channel("cord")]), caff, bundle.spacing)
    discs = _disc_maps(heat, caff, bundle) if models.levels is bundle else None
    return centre, discs


def _whole_image_segmentation(work, waff, models: Models, options: InferenceOptions, which: str = "segmentation"):
    """The segmentation model (or the ``which`` role's) over the whole image; returns
    (probabilities on the working grid, centerline fitted to them)."""
    bundle = getattr(models, which)
    fine, faff = resample(work, waff, bundle.spacing, order=1)
    prob = sliding_window_predict(fine, models.predict_fn(which), bundle.patch_size,
                                  options.overlap, options.tta)
    centre = cl.fit_centerline(prob, faff, bundle.spacing)
    return resample_to_grid(prob, faff, work.shape, waff, order=1, cval=0.0), centre


def _crop_affine(affine: np.ndarray, box: CropBox) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = box.start
    return affine @ shift


def tube_roi(points_vox: np.ndarray, shape, spacing, extend_mm: float, radius_mm: float) -> np.ndarray:
    """Boolean mask of the voxels within ``radius_mm`` (a box, per axis) of the centerline
    extended ``extend_mm`` beyond both ends: the sliding window only runs where this is set, so
    a curved cord's crop box does not cost windows far from the cord."""
    from bids_app.geometry import extend_polyline

    pts = extend_polyline(np.asarray(points_vox, float), spacing, extend_mm)
    reach = np.ceil(radius_mm / np.asarray(spacing, float)).astype(int)
    roi = np.zeros(tuple(int(v) for v in shape), dtype=bool)
    for p in np.round(pts).astype(int):
        lo = np.maximum(p - reach, 0)
        hi = np.minimum(p + reach + 1, roi.shape)
        if np.all(hi > lo):
            roi[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return roi


def _segment_crop(work, waff, centre: cl.Centerline, models: Models, options: InferenceOptions,
                  which: str = "segmentation", points_mm: np.ndarray | None = None):
    """Probabilities on the working grid from the segmentation model (or the ``which`` role's) run
    on a crop around the centerline (or around ``points_mm``, a stretch of it)."""
    bundle = getattr(models, which)
    fine_shape, faff = grid_for_spacing(work.shape, waff, bundle.spacing)
    pts = apply_affine(np.linalg.inv(faff), centre.points_mm if points_mm is None else points_mm)
    # the box only has to hold the ROI tube (windows outside it are skipped anyway): a margin of
    # the ROI radius, not half a patch, keeps a straight cord inside one window across (a 38 mm
    # wide sagittal scan needed two windows per block with half-patch margins: 32 vs 16 windows)
    half_xy = [min(p // 2, int(np.ceil(options.roi_radius_mm / s)) + 2)
               for p, s in zip(bundle.patch_size[:2], bundle.spacing[:2], strict=True)]
    box = box_around_points(pts, half_xy, options.crop_extension_mm, fine_shape, spacing=bundle.spacing,
                            min_size=bundle.patch_size)
    caff = _crop_affine(faff, box)
    background = float(np.percentile(work, 1.0))
    crop = resample_to_grid(work, waff, box.shape, caff, order=1, cval=background)
    roi = tube_roi(pts - np.asarray(box.start), box.shape, bundle.spacing, options.crop_extension_mm,
                   options.roi_radius_mm)
    prob = sliding_window_predict(crop, models.predict_fn(which), bundle.patch_size,
                                  options.overlap, options.tta, pad_value=background, roi=roi)
    return resample_to_grid(prob, caff, work.shape, waff, order=1, cval=0.0)


def _region_aware(work, waff, centre: cl.Centerline, prob: np.ndarray, whole: bool, models: Models,
                  options: InferenceOptions, split: RegionSplit | None, warnings: list[str]) -> np.ndarray:
    """Below the split disc, the lumbosacral model's probabilities; above it, the general model's
    (``prob``); linear blend over +-``region_blend_mm`` around the split plane (the plane through
    the disc's projection on the centerline, perpendicular to it: the same as ``--split``).

    The lumbosacral model only runs on the stretch of the crop below the blend zone's top (or on
    the whole image when ``whole``). Without disc labels or without the split disc, the general
    model's probabilities are returned with a warning.
    """
    from bids_app import levels as lv

    if split is None:
        warnings.append("region-aware segmentation needs the run's disc labels (--levels labels); none were "
                        "found, so the general model was used throughout")
        return prob
    plane = lv.split_plane(centre, split.discs, split.split_value)
    if isinstance(plane, str):
        warnings.append(f"region-aware segmentation skipped ({plane}): the general model was used throughout")
        return prob
    blend = float(options.region_blend_mm)
    signed_pts = lv.signed_split_distance(centre.points_mm, centre, plane)
    below = centre.points_mm[signed_pts <= blend + 2.0]
    if len(below) < 2:       # the whole cord in view lies above the split
        return prob
    if whole:
        prob_ls, _ = _whole_image_segmentation(work, waff, models, options, which="lumbosacral")
    else:
        prob_ls = _segment_crop(work, waff, centre, models, options, which="lumbosacral", points_mm=below)
    out = prob.copy()
    vox = np.argwhere(np.maximum(prob, prob_ls) >= 0.01)     # elsewhere both models see no cord
    if len(vox):
        signed = lv.signed_split_distance(apply_affine(waff, vox.astype(float)), centre, plane)
        w = np.clip(0.5 - signed / (2.0 * blend), 0.0, 1.0).astype(np.float32)   # 1 = lumbosacral
        idx = tuple(vox.T)
        out[idx] = (1.0 - w) * prob[idx] + w * prob_ls[idx]
    return out


def _working_centerline(loaded, reo, work, waff, options, models, reference, warnings):
    """The centerline, the working-grid probabilities when the whole image was segmented, and
    the coarse disc heatmaps when the coarse model ran and predicts discs."""
    if options.centerline_mode == "reference":
        if reference is None:
            from bids_app.errors import InputMissingError

            raise InputMissingError("--centerline reference needs a reference mask", path=loaded.path)
        return cl.centerline_from_mask(reo.to_working(reference.data), waff), None, None
    if options.centerline_mode == "file":
        return cl.centerline_from_file(options.centerline_file, work.shape, waff), None, None
    windows = _segmentation_windows(work, waff, models, options.overlap)
    if windows <= options.whole_image_windows:
        prob, centre = _whole_image_segmentation(work, waff, models, options)
        return centre, prob, None
    centre, discs = _coarse_centerline(work, waff, models, options.overlap)
    if not centre.found and windows <= options.fallback_windows:
        prob, whole_centre = _whole_image_segmentation(work, waff, models, options)
        volume = float((prob >= models.segmentation.threshold).sum()) * float(np.prod(reo.working_spacing))
        if volume >= options.fallback_min_cord_mm3:
            warnings.append("the coarse centerline model found no cord; the segmentation model was run "
                            f"over the whole image ({windows} windows) and found {volume:.0f} mm3 of cord")
            return whole_centre, prob, discs
        warnings.append("the coarse centerline model found no cord; over the whole image the segmentation "
                        f"model found only {volume:.0f} mm3 of cord-like signal (< {options.fallback_min_cord_mm3:.0f}),"
                        " so no cord is reported")
        return centre, None, discs
    if not centre.found:
        warnings.append(f"the coarse centerline model found no cord, and the image is too large "
                        f"({windows} windows > {options.fallback_windows}) to segment whole")
    return centre, None, discs


def segment_image(
    loaded: LoadedImage,
    options: InferenceOptions,
    reference: LoadedImage | None = None,
    models: Models | None = None,
    split: RegionSplit | None = None,
) -> SegmentationResult:
    """Segment the cord of one image; see the module docstring for the steps.

    ``reference`` (a mask on the image's grid) is only used by ``centerline_mode="reference"``.
    ``models`` may be passed to share loaded bundles between runs. ``split`` (the run's disc
    labels and the split disc) is only used with a lumbosacral model (region-aware segmentation).
    """
    models = models or Models(options)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    reo = reorientation_for(loaded.affine, loaded.data.shape)
    work = reo.to_working(loaded.data).astype(np.float32)
    waff = reo.working_affine
    spacing = reo.working_spacing

    warnings: list[str] = list(loaded.warnings)
    t = time.perf_counter()
    centre, prob_work, heatmaps = _working_centerline(loaded, reo, work, waff, options, models, reference,
                                                      warnings)
    seconds["centerline"] = time.perf_counter() - t
    if heatmaps is None and models.predicts_discs:
        t = time.perf_counter()
        heatmaps = _disc_maps(*_coarse_predict(work, waff, models, "levels", options.overlap), models.levels)
        seconds["disc_heatmaps"] = time.perf_counter() - t

    prob_native = None
    mask_work = np.zeros(work.shape, dtype=np.uint8)
    if centre.found:
        t = time.perf_counter()
        whole = prob_work is not None
        if prob_work is None:
            prob_work = _segment_crop(work, waff, centre, models, options)
            if options.centerline_mode == "auto" and not (prob_work >= models.segmentation.threshold).any():
                # the coarse centerline was a decoy (e.g. a cord-like blob off the spine): look everywhere
                windows = _segmentation_windows(work, waff, models, options.overlap)
                if windows <= options.fallback_windows:
                    warnings.append("the segmentation found no cord around the coarse centerline; the "
                                    f"segmentation model was run over the whole image ({windows} windows)")
                    prob_work, centre = _whole_image_segmentation(work, waff, models, options)
                    whole = True
        seconds["segmentation"] = time.perf_counter() - t
        if models.lumbosacral is not None:
            t = time.perf_counter()
            prob_work = _region_aware(work, waff, centre, prob_work, whole, models, options, split, warnings)
            seconds["lumbosacral"] = time.perf_counter() - t
        t = time.perf_counter()
        prob_native = reo.to_native(prob_work)
        # threshold on the native grid, then clean up in the (exactly permuted) working grid
        mask_work = reo.to_working(postprocess.binarise(prob_native, models.segmentation.threshold))
        mask_work = postprocess.keep_cord_components(mask_work, spacing)
        mask_work = postprocess.fill_holes_axial(mask_work)
        # trim below the conus tip detected in the segmentation's own probabilities (not the
        # centerline's end, which may stop short: the model decides where the cord ends); the
        # tip is where the cord evidence along the fitted curve falls to half its local level
        seg_centre = cl.fit_centerline(prob_work, waff, spacing)
        if seg_centre.found and seg_centre.conus_tip_mm is not None:
            tip_vox = apply_affine(np.linalg.inv(waff), seg_centre.conus_tip_mm)
            mask_work = postprocess.trim_below(mask_work, tip_vox, spacing, margin_mm=options.trim_margin_mm)
        seconds["postprocess"] = time.perf_counter() - t
    else:
        warnings.append("no spinal cord found in the field of view: the mask is empty")

    cord_found = bool(mask_work.any())
    final_centre = cl.centerline_from_mask(mask_work, waff) if cord_found else centre
    conus_tip = final_centre.conus_tip_mm if cord_found else None
    on_work = cl.Centerline(
        apply_affine(np.linalg.inv(waff), centre.points_mm), centre.points_mm, waff, spacing, centre.found
    ) if centre.found else cl.Centerline.empty(waff, spacing)
    seconds["total"] = time.perf_counter() - t0
    return SegmentationResult(
        mask=reo.to_native(mask_work).astype(np.uint8),
        probability=prob_native,
        centerline=centre,
        centerline_mask=reo.to_native(cl.centerline_to_mask(on_work, work.shape)),
        cord_found=cord_found,
        conus_tip_mm=conus_tip,
        working_affine=waff,
        seconds=seconds,
        warnings=warnings,
        model_info=models.info(),
        coarse_heatmaps=heatmaps,
    )
