"""Orchestration only: the participant-level batch loop and the per-run sequence of writers.

Per run (:func:`process_run`):

1. build the provenance record (input / reference / disc labels sha256, model sha256,
   parameters); skip the run when its outputs are complete and were made from the same
   provenance (unless ``--overwrite``);
2. load the image (and the reference mask on the image grid) with :mod:`bids_app.image_io`;
3. segment: ``segment_fn(loaded, cfg, reference=...)`` returns a SegmentationResult
   (``mask``, ``cord_found``, ``centerline``, ``conus_tip_mm``, ``seconds``, ``warnings``,
   ``model_info``);
4. call each writer of :data:`RUN_WRITERS` in turn (each writes its files atomically and
   returns their paths) — add new outputs by appending a writer;
5. delete outputs of an earlier, different computation that were not written this time;
6. write the sidecar last: its presence with a matching provenance marks the run complete.

A failing run writes ``sub-<l>/log/<run_id>_error.json`` and the batch goes on; the invocation
then exits 1. With ``--n_cpus N > 1`` runs are processed in N spawned worker processes, each
with TensorFlow/BLAS threads limited to ``max(1, cpu_count // N)``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bids_app import __version__
from bids_app.bids_io import Run, bids_uri, find_runs
from bids_app.config import ParticipantConfig
from bids_app.derivatives import (
    OutputPaths,
    build_provenance,
    is_complete,
    output_paths,
    remove_stale,
    write_dataset_files,
    write_error_record,
    write_json,
    write_tsv,
)
from bids_app.errors import EXIT_IO_ERROR, EXIT_OK, EXIT_RUN_FAILED, ConusError, UsageError
from bids_app.writers import REPORT_WRITERS

LOG = logging.getLogger("conus.pipeline")

SegmentFn = Callable[..., Any]
THREAD_ENV_VARS = ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class RunOutcome:
    """What happened to one run: status is ``ok``, ``skipped`` or ``failed``."""

    run_id: str
    status: str
    seconds: float
    exit_code: int = EXIT_OK
    message: str = ""
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Summary:
    """Result of the participant level: one outcome per run and the total time."""

    outcomes: tuple[RunOutcome, ...]
    seconds: float

    def count(self, status: str) -> int:
        """Number of runs with this status."""
        return sum(o.status == status for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        """0 when no run failed, else 1 (each failure's own code is in its error record)."""
        return EXIT_RUN_FAILED if self.count("failed") else EXIT_OK

    def line(self) -> str:
        """One-line summary for the log."""
        return (f"{len(self.outcomes)} run(s): {self.count('ok')} ok, {self.count('skipped')} skipped, "
                f"{self.count('failed')} failed in {self.seconds:.1f} s")


@dataclass
class RunContext:
    """Everything the writers of one run need (mutable: filled in as the run progresses)."""

    run: Run
    cfg: ParticipantConfig
    paths: OutputPaths
    provenance: dict[str, Any]
    model: dict[str, Any]
    loaded: Any = None
    reference: Any = None
    result: Any = None
    written: list[Path] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # shared between writers (levels, ...)
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


# --------------------------------------------------------------------------------------------
# model identity and default segmenter (lazy: nothing here imports TensorFlow)


def inference_options(cfg: ParticipantConfig):
    """The :class:`bids_app.inference.InferenceOptions` for this configuration."""
    from bids_app.inference import InferenceOptions

    mode = "file" if cfg.centerline_file is not None else cfg.centerline
    return InferenceOptions(model=cfg.model, centerline_model=cfg.centerline_model, centerline_mode=mode,
                            centerline_file=cfg.centerline_file, overlap=cfg.overlap, tta=cfg.tta,
                            disc_heatmaps=cfg.levels == "auto", lumbosacral_model=cfg.lumbosacral_model)


_MODELS_CACHE: dict[Any, Any] = {}


def shipped_segmenter(loaded, cfg: ParticipantConfig, reference=None, discs=None):
    """Segment with the shipped models (``bids_app.inference.segment_image``).

    The bundles are loaded once per process and per set of options (module-level cache), so a
    batch, or each worker process, loads them only once. Module-level, hence picklable. ``discs``
    (the run's disc labels) serve region-aware segmentation (``--lumbosacral-model``).
    """
    from bids_app import inference
    from bids_app import levels as lv

    options = inference_options(cfg)
    if options not in _MODELS_CACHE:
        _MODELS_CACHE.clear()
        _MODELS_CACHE[options] = inference.Models(options)
    split = None if not discs else inference.RegionSplit(tuple(discs), lv.disc_value(cfg.split_level))
    return inference.segment_image(loaded, options, reference=reference, models=_MODELS_CACHE[options],
                                   split=split)


def default_segment_fn() -> SegmentFn:
    """The segmenter used when none is injected: :func:`shipped_segmenter`."""
    return shipped_segmenter


def model_identity(cfg: ParticipantConfig, segment_fn: SegmentFn | None) -> dict[str, Any]:
    """Name and sha256 of the model(s) a run will use, known before segmenting (for skip logic).

    A custom ``segment_fn`` may carry a ``model_info`` dict attribute with at least ``sha256``.
    For the shipped segmenter, the bundles are looked up with :mod:`bids_app.bundle` (their
    checksums are verified; no TensorFlow is loaded).
    """
    info = getattr(segment_fn, "model_info", None) if segment_fn is not None else None
    if info is not None:
        return dict(info)
    from bids_app import bundle, registry
    from bids_app.inference import levels_bundle

    names = {"segmentation": cfg.model or registry.default_bundle("segmentation")}
    if cfg.centerline == "auto" and cfg.centerline_file is None:
        names["centerline"] = cfg.centerline_model or registry.default_bundle("centerline")
    if cfg.lumbosacral_model:
        names["lumbosacral"] = cfg.lumbosacral_model
    bundles = {task: bundle.load_bundle(name) for task, name in names.items()}
    if cfg.levels == "auto":   # the disc heatmaps' bundle, when it is not the centerline one
        levels = levels_bundle(bundles.get("centerline"))
        if levels is not None and levels is not bundles.get("centerline"):
            names["levels"], bundles["levels"] = levels.name, levels
    return {
        "name": str(names["segmentation"]),
        "sha256": "+".join(b.sha256 for b in bundles.values()),
        "bundles": {task: {"name": str(names[task]), "sha256": b.sha256} for task, b in bundles.items()},
    }


# --------------------------------------------------------------------------------------------
# writers: each takes the context, writes its files atomically, returns the paths written


def _run_discs(ctx: RunContext) -> list | None:
    """The run's disc labels (``--levels labels``) for region-aware segmentation, or None."""
    from bids_app import levels as lv

    if ctx.run.disc_labels is None or ctx.cfg.levels != "labels":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lv.DiscLabelWarning)     # reported once, by the levels writer
        return lv.read_disc_labels(ctx.run.disc_labels)


def write_mask(ctx: RunContext) -> list[Path]:
    """The cord mask on the native grid, with the source's exact header."""
    from bids_app.image_io import save_like

    mask = (np.asarray(ctx.result.mask) > 0).astype(np.uint8)
    return [save_like(mask, ctx.loaded.img, ctx.paths.mask)]


def _centerline_points(ctx: RunContext) -> np.ndarray | None:
    centerline = getattr(ctx.result, "centerline", None)
    points = None if centerline is None else getattr(centerline, "points_mm", None)
    if points is None or not ctx.result.cord_found:
        return None
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    return points if len(points) else None


def mm_to_voxel(affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Scanner mm (N, 3) -> native voxel coordinates (N, 3) through the inverse affine."""
    inverse = np.linalg.inv(np.asarray(affine, dtype=float))
    points = np.asarray(points_mm, dtype=float).reshape(-1, 3)
    return points @ inverse[:3, :3].T + inverse[:3, 3]


def write_centerline(ctx: RunContext) -> list[Path]:
    """Centerline mask (native grid; the result's ``centerline_mask`` when it has one, else one
    voxel per point) and its points in mm (TSV)."""
    from bids_app.image_io import save_like

    points = _centerline_points(ctx)
    if points is None:
        return []
    shape = ctx.loaded.data.shape
    label = getattr(ctx.result, "centerline_mask", None)
    if label is None:   # rasterise the points: one voxel per point on the native grid
        voxels = np.rint(mm_to_voxel(ctx.loaded.affine, points)).astype(int)
        inside = np.all((voxels >= 0) & (voxels < np.array(shape)), axis=1)
        label = np.zeros(shape, dtype=np.uint8)
        label[tuple(voxels[inside].T)] = 1
    label = (np.asarray(label) > 0).astype(np.uint8)
    tsv = write_tsv(ctx.paths.centerline_tsv, ["x_mm", "y_mm", "z_mm"],
                    [[float(v) for v in p] for p in points])
    return [save_like(label, ctx.loaded.img, ctx.paths.centerline_mask), tsv]


#: The per-run writers, called in this order after segmentation (append new outputs here).
RUN_WRITERS: list[Callable[[RunContext], list[Path]]] = [write_mask, write_centerline, *REPORT_WRITERS]


def sidecar_content(ctx: RunContext) -> dict[str, Any]:
    """The ``_label-SC_seg.json`` sidecar (BIDS URIs for Sources, model, parameters, seconds)."""
    run, cfg, result = ctx.run, ctx.cfg, ctx.result
    tip = getattr(result, "conus_tip_mm", None)
    conus_tip = None
    if tip is not None and result.cord_found:
        tip = np.asarray(tip, dtype=float).reshape(3)
        conus_tip = {"mm": tip.tolist(), "voxel": mm_to_voxel(ctx.loaded.affine, tip[None])[0].tolist()}
    model = dict(getattr(result, "model_info", None) or {})
    model.setdefault("name", ctx.model.get("name"))
    model.setdefault("sha256", ctx.model.get("sha256"))
    seconds = {k: float(v) for k, v in dict(getattr(result, "seconds", None) or {}).items()}
    seconds["total"] = time.perf_counter() - ctx.started
    return {
        "Description": "Spinal cord segmentation (cord mask) by conus",
        "Sources": [bids_uri(run.path, cfg.bids_dir)],
        "ReferenceMask": None if run.reference_mask is None else bids_uri(run.reference_mask, cfg.bids_dir),
        "DiscLabels": None if run.disc_labels is None else bids_uri(run.disc_labels, cfg.bids_dir),
        "Levels": ctx.extras.get("levels_info"),
        "CordFound": bool(result.cord_found),
        "ConusTip": conus_tip,
        "Model": model,
        "Parameters": cfg.processing_parameters(),
        "Seconds": seconds,
        "Warnings": list(ctx.warnings) + [str(w) for w in (getattr(result, "warnings", None) or [])],
        "GeneratedBy": {"Name": "conus", "Version": __version__},
        "Outputs": [p.name for p in ctx.written],
        "Provenance": ctx.provenance,
    }


# --------------------------------------------------------------------------------------------
# one run


def _exit_code_for(error: BaseException) -> int:
    if isinstance(error, ConusError):
        return error.exit_code
    if isinstance(error, OSError):
        return EXIT_IO_ERROR
    return EXIT_RUN_FAILED


def process_run(run: Run, cfg: ParticipantConfig, segment_fn: SegmentFn | None = None,
                model: dict[str, Any] | None = None) -> RunOutcome:
    """Process one run end to end; never raises for a run-level failure (see module doc)."""
    from bids_app.image_io import load_image, load_mask

    started = time.perf_counter()
    paths = output_paths(cfg.output_dir, run)
    try:
        segment = segment_fn or default_segment_fn()
        model = model if model is not None else model_identity(cfg, segment_fn)
        provenance = build_provenance(run, cfg.processing_parameters(), model.get("sha256"), cfg.centerline_file)
        if not cfg.overwrite and is_complete(paths, provenance):
            LOG.info("%s: up to date, skipped", run.run_id)
            return RunOutcome(run.run_id, "skipped", time.perf_counter() - started)
        remove_stale([paths.sidecar])
        ctx = RunContext(run=run, cfg=cfg, paths=paths, provenance=provenance, model=model, started=started)
        ctx.loaded = load_image(run.path)
        ctx.warnings.extend(ctx.loaded.warnings)
        if run.reference_mask is not None:
            ctx.reference = load_mask(run.reference_mask, like=ctx.loaded)
            ctx.warnings.extend(f"reference: {w}" for w in ctx.reference.warnings)
        if cfg.lumbosacral_model:    # region-aware: the segmenter needs the disc labels (only then)
            ctx.result = segment(ctx.loaded, cfg, reference=ctx.reference, discs=_run_discs(ctx))
        else:
            ctx.result = segment(ctx.loaded, cfg, reference=ctx.reference)
        for writer in RUN_WRITERS:
            ctx.written.extend(Path(p) for p in writer(ctx))
        remove_stale([p for p in paths.products() if p not in ctx.written])
        write_json(paths.sidecar, sidecar_content(ctx))
        remove_stale([paths.error_record])
        seconds = time.perf_counter() - started
        for warning in ctx.warnings:
            LOG.warning("%s: %s", run.run_id, warning)
        LOG.info("%s: done in %.1f s (cord %s)", run.run_id, seconds,
                 "found" if ctx.result.cord_found else "not found")
        return RunOutcome(run.run_id, "ok", seconds, outputs=tuple(p.name for p in ctx.written))
    except Exception as error:  # noqa: BLE001 - a run's failure must not stop the batch
        return _record_failure(run, paths, error, traceback.format_exc(), started)


def _record_failure(run: Run, paths: OutputPaths, error: BaseException, trace: str,
                    started: float) -> RunOutcome:
    code = _exit_code_for(error)
    LOG.error("%s: failed (exit code %d): %s", run.run_id, code, error)
    try:
        write_error_record(paths, run, error, code, trace)
    except Exception as record_error:  # noqa: BLE001
        LOG.error("%s: could not write the error record: %s", run.run_id, record_error)
    return RunOutcome(run.run_id, "failed", time.perf_counter() - started, code, str(error))


# --------------------------------------------------------------------------------------------
# the batch


def worker_threads(n_workers: int, cpus: int | None = None) -> int:
    """Threads per worker so that N workers share the machine: ``max(1, cpus // N)``."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, n_workers))


def _init_worker(threads: int, verbosity: int) -> None:
    """Worker process set-up: thread limits (before TensorFlow is imported) and logging."""
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    from bids_app.cli import configure_logging

    configure_logging(verbosity)


def use_work_dir(work_dir: Path | None) -> None:
    """Send temporary files (Python's tempfile, and through TMPDIR those of worker processes and
    libraries) to ``--work-dir``; conus keeps no other intermediate files."""
    if work_dir is None:
        return
    try:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from bids_app.errors import CannotCreateOutputError

        raise CannotCreateOutputError(f"cannot create the work folder: {exc}", path=work_dir) from exc
    import tempfile

    os.environ["TMPDIR"] = str(work_dir)
    tempfile.tempdir = str(work_dir)


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="run", file=sys.stderr, disable=quiet, desc="conus", leave=True)


def run_participant_level(cfg: ParticipantConfig, segment_fn: SegmentFn | None = None,
                          runs: Sequence[Run] | None = None) -> Summary:
    """Process every selected run; a failed run is recorded and the others go on.

    ``segment_fn`` defaults to the shipped segmenter; tests inject their own (module-level
    callables, so that worker processes can import them). Writes ``dataset_description.json``
    and ``.bidsignore`` first. Raises ConusError only for invocation-level problems (no runs,
    output not writable...).
    """
    started = time.perf_counter()
    runs = list(find_runs(cfg) if runs is None else runs)
    use_work_dir(cfg.work_dir)
    write_dataset_files(cfg.output_dir, cfg.bids_dir)
    segment_fn = segment_fn or default_segment_fn()
    model = model_identity(cfg, segment_fn)
    LOG.info("%d run(s) to process with model %s", len(runs), model.get("name"))
    outcomes: list[RunOutcome] = []
    from tqdm.contrib.logging import logging_redirect_tqdm

    with _progress(len(runs), cfg.quiet) as bar, logging_redirect_tqdm(loggers=[logging.getLogger("conus")]):
        if cfg.n_cpus <= 1 or len(runs) <= 1:
            for run in runs:
                bar.set_postfix_str(run.run_id)
                outcomes.append(process_run(run, cfg, segment_fn, model))
                bar.update(1)
        else:
            n_workers = min(cfg.n_cpus, len(runs))
            context = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=context, initializer=_init_worker,
                                        initargs=(worker_threads(n_workers), cfg.verbosity)) as pool:
                futures = {pool.submit(process_run, run, cfg, segment_fn, model): run for run in runs}
                for future in cf.as_completed(futures):
                    run = futures[future]
                    try:
                        outcomes.append(future.result())
                    except Exception as error:  # noqa: BLE001 - e.g. a worker killed by the OOM killer
                        outcomes.append(_record_failure(run, output_paths(cfg.output_dir, run), error,
                                                        traceback.format_exc(), started))
                    bar.update(1)
    order = {run.run_id: i for i, run in enumerate(runs)}
    summary = Summary(tuple(sorted(outcomes, key=lambda o: order[o.run_id])), time.perf_counter() - started)
    (LOG.warning if summary.count("failed") else LOG.info)("%s", summary.line())
    for outcome in summary.outcomes:
        if outcome.status == "failed":
            LOG.warning("  failed: %s (exit code %d): %s", outcome.run_id, outcome.exit_code, outcome.message)
    return summary


def run_group_level(cfg: ParticipantConfig) -> int:
    """Group level: ``bids_app.report`` gathers the participant outputs (and ``--compare``)."""
    try:
        from bids_app import report
    except ModuleNotFoundError as exc:
        if exc.name == "bids_app.report":
            raise UsageError("the group level is not available in this installation "
                             "(module bids_app.report is missing)") from exc
        raise
    if not cfg.compare or Path(cfg.output_dir).is_dir():
        folder = report.run_group_level(cfg.output_dir)
        LOG.info("group report written to %s", folder)
    if cfg.compare:
        folder = report.compare(list(cfg.compare), Path(cfg.output_dir) / "compare")
        LOG.info("comparison written to %s", folder)
    return EXIT_OK
