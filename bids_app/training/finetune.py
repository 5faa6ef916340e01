"""``conus finetune``: adapt a bundle to a team's labelled scans (the thesis's workflow).

Labelled data is a BIDS dataset with cord masks in ``derivatives/labels`` (spine-generic names,
as ``conus synth`` and conus's own outputs write them). Subjects are split into training and
validation subjects (never patches of one subject on both sides); Dice on the validation
subjects is measured before and after fine-tuning and recorded in the new bundle.

Presets are named recipes; ``thesis`` is the protocol of the thesis conus follows: contraction
path frozen (no network surgery), Adam lr 1e-5, batch 5, random flips on all axes, training
patches on a grid with a 3-slice overlap, ReduceLROnPlateau (factor 0.5, patience 10), keep the
best epoch by validation Dice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_app.errors import NoMatchError, UsageError
from bids_app.training.dataset import (
    VALIDATION_SEED,
    PatchProducer,
    StreamConfig,
    TaskConfig,
    grid_patches,
)
from bids_app.training.networks import CONTRACTION_PREFIXES

LOG = logging.getLogger("conus.training")


@dataclass(frozen=True)
class FinetunePreset:
    """A named fine-tuning recipe."""

    name: str
    freeze_prefixes: tuple[str, ...]
    lr: float
    batch_size: int
    flip_axes: tuple[int, ...]
    patch_overlap: int            # voxels between neighbouring training patches (per axis)
    plateau_factor: float
    plateau_patience: int
    keep_best: bool
    epochs: int
    val_fraction: float = 0.25    # share of subjects held out for validation


PRESETS: dict[str, FinetunePreset] = {
    "thesis": FinetunePreset(name="thesis", freeze_prefixes=CONTRACTION_PREFIXES, lr=1e-5, batch_size=5,
                             flip_axes=(0, 1, 2), patch_overlap=3, plateau_factor=0.5, plateau_patience=10,
                             keep_best=True, epochs=100),
}


@dataclass
class LabelledVolume:
    """One labelled scan on the model grid (RAS working axes, resampled to the model spacing)."""

    subject: str
    run_id: str
    image: np.ndarray   # float32
    mask: np.ndarray    # uint8


class ListSource:
    """Seed -> one of a fixed list of patches (``seed % n``): consecutive seeds visit every patch."""

    def __init__(self, patches: list[tuple[np.ndarray, np.ndarray]], names: list[str] | None = None):
        if not patches:
            raise UsageError("no training patches: the labelled masks are empty")
        self.patches = patches
        self.names = names
        self.n_patches = len(patches)

    def describe(self) -> dict:
        return {"engine": "patch-list", "n_patches": self.n_patches}

    def __call__(self, seed: int):
        image, mask = self.patches[int(seed) % self.n_patches]
        return image, mask, {"region": "data", "contrast": ""}


def load_labelled_bids(bids_dir: Path, spacing) -> list[LabelledVolume]:
    """Every image of ``bids_dir`` that has a reference cord mask, reoriented and resampled."""
    from bids_app.bids_io import find_runs
    from bids_app.config import ParticipantConfig
    from bids_app.geometry import reorientation_for, resample
    from bids_app.image_io import load_image, load_mask

    cfg = ParticipantConfig(bids_dir=Path(bids_dir).absolute(), output_dir=Path(bids_dir).absolute() / "derivatives",
                            skip_bids_validator=True)
    runs = [r for r in find_runs(cfg) if r.reference_mask is not None]
    if not runs:
        raise NoMatchError("no image with a reference cord mask (derivatives/labels/..._label-SC_seg) found",
                           path=bids_dir)
    out = []
    for run in runs:
        img = load_image(run.path)
        mask = load_mask(run.reference_mask, like=img)
        reo = reorientation_for(img.affine, img.data.shape)
        work, waff = reo.to_working(img.data), reo.working_affine
        image_r, _ = resample(work, waff, spacing, order=1)
        mask_r, _ = resample(reo.to_working(mask.data).astype(np.float32), waff, spacing, order=1)
        out.append(LabelledVolume(run.subject, run.run_id, image_r.astype(np.float32), (mask_r >= 0.5).astype(np.uint8)))
        LOG.info("loaded %s: %s on the model grid, %d cord voxels", run.run_id, image_r.shape, int(out[-1].mask.sum()))
    return out


def split_subjects(volumes: list[LabelledVolume], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of the subjects (not runs): (training subjects, validation subjects)."""
    subjects = sorted({v.subject for v in volumes})
    if len(subjects) < 2:
        LOG.warning("only one subject: validation uses the training subject (no independent estimate)")
        return subjects, subjects
    rng = np.random.default_rng([int(seed), 271828])
    order = list(rng.permutation(subjects))
    n_val = min(len(subjects) - 1, max(1, round(val_fraction * len(subjects))))
    return sorted(order[n_val:]), sorted(order[:n_val])


def patch_set(volumes: list[LabelledVolume], patch_size, overlap: int) -> dict:
    """Grid patches (overlap in voxels) over the cord of each volume, as an evaluation set."""
    images, masks, names = [], [], []
    for v in volumes:
        for image, mask in grid_patches(v.image, v.mask, patch_size, overlap):
            images.append(image)
            masks.append(mask)
            names.append(v.subject)
    if not images:
        raise UsageError("no patches: the validation masks are empty")
    return {"image": np.stack(images), "mask": np.stack(masks), "region": np.array(names),
            "contrast": np.array(names), "seed": np.arange(len(images))}


def subject_dice(model, volumes: list[LabelledVolume], patch_size, normalisation: dict, threshold: float,
                 margin: int = 16) -> dict:
    """Dice per volume: sliding window (overlap 0.5) over the cord's bounding box + ``margin`` voxels."""
    from bids_app.metrics import dice
    from bids_app.segment import sliding_window_predict
    from bids_app.training.train import model_predict_fn

    predict = model_predict_fn(model, normalisation)
    out = {}
    for v in volumes:
        cord = np.argwhere(v.mask > 0)
        lo = np.maximum(cord.min(0) - margin, 0)
        hi = np.minimum(cord.max(0) + margin + 1, v.mask.shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        prob = sliding_window_predict(v.image[sl], predict, patch_size, 0.5)
        out[v.run_id] = dice(prob >= threshold, v.mask[sl] > 0)
    values = list(out.values())
    return {"per_run": out, "mean": float(np.mean(values)) if values else None}


def labelled_bids_sources(bids_dir: Path, task: TaskConfig, seed: int, val_fraction: float = 0.25):
    """For ``conus train --data``: (random-patch training source, validation patch source, description)."""
    from bids_app.training.dataset import ArraySource

    volumes = load_labelled_bids(bids_dir, task.spacing)
    train_s, val_s = split_subjects(volumes, val_fraction, seed)
    train_v = [v for v in volumes if v.subject in train_s]
    val_v = [v for v in volumes if v.subject in val_s]
    source = ArraySource([v.image for v in train_v], [v.mask for v in train_v], task.patch_size,
                         names=[v.run_id for v in train_v])
    val_patches = [p for v in val_v for p in grid_patches(v.image, v.mask, task.patch_size, 0)]
    desc = {"kind": "bids", "bids_dir": str(Path(bids_dir).absolute()), "train_subjects": train_s,
            "validation_subjects": val_s, "runs": [v.run_id for v in volumes]}
    return source, ListSource(val_patches), desc


def main_finetune(args) -> int:
    """``conus finetune --from MODEL --data BIDS_DIR --out DIR [--preset thesis] ...``."""
    from bids_app.bundle import load_bundle
    from bids_app.training.export import export_bundle
    from bids_app.training.train import Recipe, _argv, configure_tensorflow, run_training

    preset = PRESETS[args.preset]
    base = load_bundle(args.from_model)
    name = args.name or Path(args.out).name
    run_dir = Path(getattr(args, "run_dir", None) or Path("runs") / name)
    task = TaskConfig(task=base.task, spacing=base.spacing, patch_size=base.patch_size, flip_axes=preset.flip_axes)
    volumes = load_labelled_bids(args.data, base.spacing)
    train_s, val_s = split_subjects(volumes, preset.val_fraction, int(args.seed))
    train_v = [v for v in volumes if v.subject in train_s]
    val_v = [v for v in volumes if v.subject in val_s]
    patches = [p for v in train_v for p in grid_patches(v.image, v.mask, base.patch_size, preset.patch_overlap)]
    source = ListSource(patches)
    batch = args.batch_size or preset.batch_size
    steps = args.steps or max(1, math.ceil(len(patches) / batch))
    stream = StreamConfig(batch_size=batch, steps_per_epoch=steps, reuse=1, chunk=max(1, len(patches)),
                          seed=int(args.seed))
    recipe = Recipe(arch=str(base.metadata["architecture"]), lr=args.lr or preset.lr,
                    epochs=args.epochs or preset.epochs,
                    max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes,
                    threshold=base.threshold, plateau_factor=preset.plateau_factor,
                    plateau_patience=preset.plateau_patience, keep_best=preset.keep_best,
                    freeze_prefixes=preset.freeze_prefixes,
                    threads=int(getattr(args, "threads", None) or 2), workers=0, stream=stream)
    LOG.info("fine-tuning %s (preset %s) on %d training patches from %d subjects; validation subjects: %s",
             base.name, preset.name, len(patches), len(train_s), ", ".join(val_s))
    configure_tensorflow(recipe.threads, stream.seed)
    model = base.load_model()
    val_set = patch_set(val_v, base.patch_size, 0)
    before = subject_dice(model, val_v, base.patch_size, base.normalisation, base.threshold)
    LOG.info("validation Dice before fine-tuning: %.4f", before["mean"])
    result = run_training(model, recipe, PatchProducer(source, workers=0), task, val_set, run_dir,
                          resume=args.resume, argv=_argv(args), normalisation=base.normalisation)
    after = subject_dice(result.model, val_v, base.patch_size, base.normalisation, base.threshold)
    LOG.info("validation Dice after fine-tuning: %.4f (before %.4f)", after["mean"], before["mean"])
    data = {"kind": "bids", "bids_dir": str(Path(args.data).absolute()), "train_subjects": train_s,
            "validation_subjects": val_s, "train_patches": len(patches)}
    validation = {"validation_subjects": {"description": "Dice per held-out subject run (sliding window over "
                                          "the cord bounding box + 16 voxels)", "before": before, "after": after}}
    bundle = export_bundle(result, Path(args.out), name=name, task=task, recipe=recipe, data=data,
                           validation=validation, normalisation=dict(base.normalisation),
                           description=f"{base.name} fine-tuned with preset {preset.name!r}",
                           extra_training={"preset": preset.name, "from_bundle": {"name": base.name,
                                                                                  "sha256": base.sha256}})
    print(f"bundle written: {bundle.path}  (Dice on validation subjects {before['mean']:.3f} -> {after['mean']:.3f})")
    return 0


__all__ = ["PRESETS", "FinetunePreset", "VALIDATION_SEED", "labelled_bids_sources", "main_finetune"]
