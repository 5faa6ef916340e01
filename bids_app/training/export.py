"""Export of a trained network as a model bundle: validation report, curves, metadata.

Used by ``conus train`` and ``conus finetune`` (the only writers of ``metadata.json``). Every
number recorded here is computed on CPU in the exporting process.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bids_app.training.dataset import (
    OUT_OF_RANGE_SEED,
    PHANTOM_SEED,
    REPORT_SEED,
    VALIDATION_SEED,
    PatchProducer,
    SyntheticSource,
    TaskConfig,
    load_or_build_set,
)
from bids_app.training.train import MODEL_VERSION, Recipe, TrainResult, evaluate_set, predict_patches

LOG = logging.getLogger("conus.training")
PHANTOM_FILE = "phantom_fixed.npz"



def plot_curves(history: list[dict], path: Path, title: str) -> Path:
    """Loss and Dice curves per epoch (training soft Dice, validation Dice) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    ax1.plot(epochs, [h["loss"] for h in history], label="train loss (1-Dice+BCE)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [h["soft_dice"] for h in history], label="train soft Dice")
    ax2.plot(epochs, [h["val_dice"] for h in history], label="validation Dice")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def framework_versions() -> dict:
    import keras
    import numpy
    import scipy
    import tensorflow as tf

    from bids_app import __version__

    return {"conus": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__}


def hardware() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    cpu = platform.processor() or platform.machine()
    return f"{len(gpus)} GPU" if gpus else f"CPU ({cpu}, {os.cpu_count()} cores)"


def fixed_sets(task: TaskConfig, pam50_dir: str | None, n_per_region: int, n_out_of_range: int,
               n_phantom: int) -> dict[str, tuple[SyntheticSource, list[int], str]]:
    """The held-out synthetic sets reported in a bundle: (source, seeds, description) by name."""
    sets: dict[str, tuple[SyntheticSource, list[int], str]] = {}
    for ri, region in enumerate(task.val_regions):
        sets[f"heldout_{region}"] = (
            SyntheticSource(task, pam50_dir=pam50_dir, region=region, fov=False),
            [REPORT_SEED + 10_000 * ri + i for i in range(n_per_region)],
            f"held-out seeds {REPORT_SEED + 10_000 * ri}+, training ranges, region {region}")
        sets[f"out_of_range_{region}"] = (
            SyntheticSource(task, pam50_dir=pam50_dir, region=region, fov=False, strength=1.6),
            [OUT_OF_RANGE_SEED + 10_000 * ri + i for i in range(n_out_of_range)],
            f"held-out seeds {OUT_OF_RANGE_SEED + 10_000 * ri}+, deformation/size strength 1.6 "
            f"(training 1.0), region {region}")
    if task.fov_fraction > 0:
        sets["heldout_whole_view_patches"] = (
            SyntheticSource(task, pam50_dir=pam50_dir, fov=True),
            [REPORT_SEED + 900_000 + i for i in range(n_per_region)],
            "random patches of whole coarse views (often without cord)")
    sets["phantom_fixed"] = (
        SyntheticSource(task, pam50_dir=None, source="phantom", region="lumbosacral", fov=False),
        [PHANTOM_SEED + i for i in range(n_phantom)],
        "procedural phantom (no data needed), lumbosacral crops; checked by tests/test_training.py")
    return sets


def validation_report(model, task: TaskConfig, pam50_dir: str | None, run_dir: Path, threshold: float,
                      normalisation: dict, n_per_region: int = 16, n_out_of_range: int = 8, n_phantom: int = 4,
                      workers: int = 0, n_views_per_region: int = 3) -> dict:
    """Dice on every fixed held-out set (computed on CPU), for the bundle metadata."""
    report = {}
    for name, (source, seeds, desc) in fixed_sets(task, pam50_dir, n_per_region, n_out_of_range, n_phantom).items():
        producer = PatchProducer(source, workers=workers)
        try:
            data = load_or_build_set(run_dir / f"set_{name}.npz", producer, seeds)
        finally:
            producer.close()
        if name == "phantom_fixed":
            # shipped inside the bundle (float16 to stay small) so that a test can re-run inference
            # on exactly these crops, whatever later changes the synthetic engine goes through
            data["image"] = data["image"].astype(np.float16).astype(np.float32)
            np.savez_compressed(run_dir / PHANTOM_FILE, image=data["image"].astype(np.float16),
                                mask=data["mask"].astype(np.uint8), seed=np.asarray(seeds))
        probs = predict_patches(model, data["image"], normalisation)
        res = evaluate_set(model, data, normalisation, threshold, group_by="contrast", targets=task.targets,
                           probs=probs)
        entry = {"description": desc, "seeds": [int(seeds[0]), int(seeds[-1])], **res.pop("all")}
        entry["by_contrast"] = {k: v["dice_mean"] for k, v in res.items()}
        if name == "phantom_fixed":
            entry["generate_crop"] = {"source": "phantom", "region": "lumbosacral", "strength": 1.0,
                                      "patch_size": list(task.patch_size), "spacing": list(task.spacing),
                                      "seeds": [int(s) for s in seeds]}
            entry["file"] = PHANTOM_FILE
        if task.task == "segmentation" and name.endswith("_lumbosacral"):
            entry["conus_tip"] = conus_tip_errors(probs, data["mask"], threshold, task.spacing)
        report[name] = entry
        LOG.info("validation %s: Dice mean %s pooled %.4f (n=%d)", name,
                 None if entry["dice_mean"] is None else round(entry["dice_mean"], 4), entry["dice_pooled"], entry["n"])
    if task.fov_fraction > 0:
        from bids_app.training.train import model_predict_fn
        from bids_app.training.view_eval import evaluate_views

        views = evaluate_views(model_predict_fn(model, normalisation), outputs=task.targets, spacing=task.spacing,
                               patch_size=task.patch_size, pam50_dir=pam50_dir, n_per_region=n_views_per_region)
        (run_dir / "whole_views.json").write_text(json.dumps(views, indent=1, default=float))
        report["whole_views"] = {"description": views["description"], **views["all"],
                                 "by_region": views["by_region"]}
        LOG.info("whole views: %s", views["all"])
    return report


def conus_tip_errors(probs: np.ndarray, masks: np.ndarray, threshold: float, spacing) -> dict:
    """Conus tip error (mm) on crops whose reference cord ends inside the crop, from the crops'
    cord probabilities ``probs`` and reference ``masks`` (N, X, Y, Z).

    The tip of a mask is the end of its centerline (:func:`bids_app.centerline.centerline_from_mask`),
    computed the same way for the reference and the prediction; a prediction without cord counts as
    a miss.
    """
    from bids_app import centerline as cl

    affine = np.diag([*map(float, spacing), 1.0])
    errors, missed = [], 0
    for prob, mask in zip(probs, masks, strict=True):
        if not mask.any() or mask[:, :, 0].any():
            continue  # no cord, or the cord leaves through the bottom of the crop
        ref_tip = cl.centerline_from_mask(mask, affine).conus_tip_mm
        pred = cl.centerline_from_mask((prob >= threshold).astype(np.uint8), affine)
        if ref_tip is None:
            continue
        if not pred.found or pred.conus_tip_mm is None:
            missed += 1
            continue
        errors.append(float(np.linalg.norm(np.asarray(pred.conus_tip_mm) - np.asarray(ref_tip))))
    n = len(errors) + missed
    return {"n_crops_with_tip": n, "missed": missed,
            "error_mm_mean": float(np.mean(errors)) if errors else None,
            "error_mm_median": float(np.median(errors)) if errors else None,
            "within_3mm": (sum(e <= 3.0 for e in errors) / n) if n else None}


def export_bundle(result: TrainResult, out: Path, *, name: str, task: TaskConfig, recipe: Recipe, data: dict,
                  validation: dict, normalisation: dict, description: str, extra_training: dict | None = None):
    """Write the bundle (weights, metadata, model card, curves, checksums) and return it."""
    from bids_app.bundle import write_bundle

    curves = plot_curves(result.history, result.run_dir / "training_curves.png", f"{name}: {task.task}")
    metadata = {
        "name": name,
        "version": MODEL_VERSION,
        "task": task.task,
        "description": description,
        "architecture": recipe.arch,
        "parameters": int(result.model.count_params()),
        "spacing": list(task.spacing),
        "patch_size": list(task.patch_size),
        "normalisation": normalisation,
        "threshold": recipe.threshold,
        "output": ("sigmoid cord probability, one channel" if not task.multi_target
                   else f"sigmoid probabilities, {len(task.targets)} channels: {', '.join(task.targets)}"),
        "outputs": list(task.targets),
        "trained_flips": list(task.flip_axes),
        "training": {
            "argv": list(result.state.get("argv", [])),
            "resumed_argv": result.state.get("resumed_argv", []),
            "seed": recipe.stream.seed,
            "steps": result.steps,
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
            "seconds": round(result.seconds, 1),
            "hardware": hardware(),
            "recipe": recipe.as_dict(),
            "task": task.as_dict(),
            "data": data,
            "validation_seeds": f"monitored each epoch: {VALIDATION_SEED}+ (disjoint from training seeds < {VALIDATION_SEED})",
            **(extra_training or {}),
        },
        "framework": framework_versions(),
        "validation": validation,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    extra = {"training_curves.png": curves}
    if "phantom_fixed" in validation and (result.run_dir / PHANTOM_FILE).is_file():
        extra[PHANTOM_FILE] = result.run_dir / PHANTOM_FILE
    return write_bundle(out, result.model, metadata, extra)


