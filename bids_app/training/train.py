"""``conus train``: train a segmentation or coarse centerline 3D U-Net and export it as a bundle.

The loop is shared with ``conus finetune`` (:func:`run_training`): seeded, a progress bar, one log
line and one checkpoint per epoch (a killed run resumes exactly where the last epoch ended with
``--resume``), an optional wall-clock budget, learning-rate reduction on a validation plateau and,
when asked, keeping the best epoch by validation Dice. Checkpoints and logs go to ``--run-dir``
(default ``runs/<name>``); only the final bundle goes to ``--out``.

The task (segmentation vs centerline) is configuration (:data:`bids_app.training.dataset.TASKS`):
spacing, patch size and patch sampling policy; the code path is the same.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from bids_app.errors import UsageError
from bids_app.segment import DEFAULT_NORMALISATION
from bids_app.training.dataset import (
    TASKS,
    VALIDATION_SEED,
    PatchProducer,
    StreamConfig,
    SyntheticSource,
    TaskConfig,
    epoch_samples,
    load_or_build_set,
)

LOG = logging.getLogger("conus.training")

MODEL_VERSION = "1.0.0"
DEFAULT_ARCH = "unet3d-b8d3"
CHECKPOINT = "checkpoint.keras"
BEST_WEIGHTS = "best.weights.h5"
STATE = "state.json"
INIT_FROM_FILE = "init_from.json"   # the bundle a warm-started run began from


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a training run (recorded in the bundle metadata)."""

    arch: str = DEFAULT_ARCH
    lr: float = 1e-3
    epochs: int = 1000                     # upper bound; the wall-clock budget usually ends the run
    max_seconds: float | None = None
    threshold: float = 0.5
    plateau_factor: float = 0.5
    plateau_patience: int = 10             # epochs without a better validation Dice
    min_lr: float = 1e-6
    keep_best: bool = False                # export the epoch with the best validation Dice
    schedule: str = "plateau"              # "plateau" (ReduceLROnPlateau) | "cosine" (to min_lr at max_seconds,
                                           # or at the last epoch without a time budget)
    freeze_prefixes: tuple[str, ...] = ()  # layer-name prefixes kept frozen (fine-tuning)
    threads: int = 2
    workers: int = 1
    loss: str = "dice+bce"
    channel_weights: tuple[float, ...] | None = None   # per-output loss weights (None: all 1)
    stream: StreamConfig = field(default_factory=StreamConfig)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["freeze_prefixes"] = list(self.freeze_prefixes)
        if self.channel_weights is not None:
            d["channel_weights"] = list(self.channel_weights)
            d["loss"] = "dice+bce, weighted per output channel"
        return d


# --------------------------------------------------------------------------------------------- losses


_LOSS_CLASSES: dict = {}


def _register_losses():
    """Register conus's losses and metric with Keras; return (dice_bce_loss, soft_dice)."""
    import keras
    from keras import ops

    def channel_dice(y_true, y_pred):
        """Soft Dice over the whole batch (smooth 1), one value per output channel."""
        axes = (0, 1, 2, 3)
        inter = ops.sum(y_true * y_pred, axis=axes)
        return (2.0 * inter + 1.0) / (ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes) + 1.0)

    @keras.saving.register_keras_serializable(package="conus", name="soft_dice")
    def soft_dice(y_true, y_pred):
        """Soft Dice over the whole batch (smooth 1) per output channel, averaged over channels."""
        return ops.mean(channel_dice(y_true, y_pred))

    @keras.saving.register_keras_serializable(package="conus", name="dice_bce_loss")
    def dice_bce_loss(y_true, y_pred):
        """Sum over output channels of (1 - soft Dice), + binary cross-entropy.

        Dice for overlap, BCE for calibrated probabilities. Summing (not averaging) the Dice
        terms keeps each channel's Dice as strong against the BCE as in a one-channel model.
        """
        bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred))
        return ops.sum(1.0 - channel_dice(y_true, y_pred)) + bce

    if "weighted" not in _LOSS_CLASSES:
        @keras.saving.register_keras_serializable(package="conus", name="WeightedDiceBCE")
        class WeightedDiceBCE(keras.losses.Loss):
            """``dice_bce_loss`` with one weight per output channel on both its Dice and BCE terms.

            ``sum_c w_c (1 - Dice_c) + sum_c w_c BCE_c / C``: with every weight 1 this is exactly
            ``dice_bce_loss``. A rare, slow-to-learn output (the spine model's C2/sacrum anchors)
            can be weighted up without touching the others.
            """

            def __init__(self, channel_weights=(1.0,), name="weighted_dice_bce", **kwargs):
                super().__init__(name=name, **kwargs)
                self.channel_weights = [float(w) for w in channel_weights]

            def call(self, y_true, y_pred):
                w = ops.convert_to_tensor(self.channel_weights, dtype=y_pred.dtype)
                p = ops.clip(y_pred, 1e-7, 1.0 - 1e-7)
                bce = -ops.mean(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p), axis=(0, 1, 2, 3))
                return (ops.sum(w * (1.0 - channel_dice(y_true, y_pred)))
                        + ops.sum(w * bce) / len(self.channel_weights))

            def get_config(self):
                return {**super().get_config(), "channel_weights": self.channel_weights}

        _LOSS_CLASSES["weighted"] = WeightedDiceBCE
    return dice_bce_loss, soft_dice


def make_loss(channel_weights: Sequence[float] | None = None):
    """The training loss: ``dice_bce_loss``, or its per-channel weighted form when weights are given."""
    loss, _metric = _register_losses()
    if channel_weights is None:
        return loss
    return _LOSS_CLASSES["weighted"](channel_weights=tuple(channel_weights))


def compile_model(model, lr: float, channel_weights: Sequence[float] | None = None) -> None:
    """Adam + Dice/BCE loss (optionally weighted per output channel) + soft-Dice metric."""
    import keras

    _loss, metric = _register_losses()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss=make_loss(channel_weights),
                  metrics=[metric])


def configure_tensorflow(threads: int, seed: int) -> None:
    """Thread counts (must run before the first TensorFlow op) and all random seeds."""
    import keras
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        LOG.debug("TensorFlow already initialised; thread settings unchanged")
    keras.utils.set_random_seed(int(seed))


def apply_freeze(model, prefixes: Sequence[str]) -> list[str]:
    """Freeze every layer whose name starts with one of ``prefixes``; returns the frozen names."""
    frozen = []
    for layer in model.layers:
        if prefixes and layer.name.startswith(tuple(prefixes)):
            layer.trainable = False
            frozen.append(layer.name)
    return frozen


def warm_start(model, source) -> list[str]:
    """Copy ``source``'s weights into ``model`` layer by layer (same names and shapes).

    A layer whose weights differ only in the last axis (an output layer with more channels)
    gets the source's channels in its first positions. Returns the names of the layers copied.
    """
    copied = []
    by_name = {layer.name: layer for layer in source.layers}
    for layer in model.layers:
        src = by_name.get(layer.name)
        if src is None or not layer.get_weights():
            continue
        new, old = layer.get_weights(), src.get_weights()
        if len(new) != len(old):
            continue
        merged = []
        for n, o in zip(new, old, strict=True):
            if n.shape == o.shape:
                merged.append(o)
            elif n.shape[:-1] == o.shape[:-1] and n.shape[-1] > o.shape[-1]:
                n = n.copy()
                n[..., : o.shape[-1]] = o
                merged.append(n)
            else:
                break
        else:
            layer.set_weights(merged)
            copied.append(layer.name)
    return copied


# --------------------------------------------------------------------------------------------- evaluation


def predict_patches(model, images: np.ndarray, normalisation: dict, batch_size: int = 4) -> np.ndarray:
    """Probabilities for a stack of raw patches (N, X, Y, Z) → (N, X, Y, Z) float32, or
    (N, X, Y, Z, C) for a model with C > 1 outputs."""
    from bids_app.segment import normalise_batch

    parts = []
    for i in range(0, len(images), batch_size):
        x = normalise_batch(images[i : i + batch_size, ..., None], normalisation)
        parts.append(np.asarray(model(x, training=False), dtype=np.float32))
    out = np.concatenate(parts)
    return out[..., 0] if out.shape[-1] == 1 else out


def model_predict_fn(model, normalisation: dict):
    """A ``predict_fn`` for :func:`bids_app.segment.sliding_window_predict` from an in-memory model."""
    from bids_app.segment import normalise_batch

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.asarray(model(normalise_batch(batch, normalisation), training=False), dtype=np.float32)

    return predict


def dice_scores(probs: np.ndarray, masks: np.ndarray, threshold: float) -> dict:
    """Per-patch Dice (patches with a cord), pooled Dice, and false-positive voxels on empty patches."""
    from bids_app.metrics import dice

    pred = probs >= threshold
    ref = masks > 0
    has_cord = ref.reshape(len(ref), -1).any(1)
    per = [dice(p, r) for p, r, h in zip(pred, ref, has_cord, strict=True) if h]
    inter = int(np.logical_and(pred, ref).sum())
    total = int(pred.sum()) + int(ref.sum())
    out = {
        "n": int(len(ref)),
        "n_with_cord": int(has_cord.sum()),
        "dice_mean": float(np.mean(per)) if per else None,
        "dice_median": float(np.median(per)) if per else None,
        "dice_min": float(np.min(per)) if per else None,
        "dice_pooled": 2.0 * inter / total if total else 1.0,
    }
    if (~has_cord).any():
        out["false_positive_voxels_mean_on_empty"] = float(pred[~has_cord].reshape((~has_cord).sum(), -1).sum(1).mean())
    return out


def evaluate_set(model, data: dict, normalisation: dict, threshold: float, group_by: str | None = "region",
                 targets: Sequence[str] = ("cord",), probs: np.ndarray | None = None) -> dict:
    """Dice on a fixed set, overall and per ``region`` (or contrast) label.

    For a multi-output model the scores are the cord channel's; the other channels (``targets``)
    add a pooled Dice each under ``"all"``. ``probs`` (from :func:`predict_patches`) may be
    given when the caller already has them.
    """
    if probs is None:
        probs = predict_patches(model, data["image"], normalisation)
    masks = data["mask"]
    extra = {}
    if probs.ndim == 5:
        for c, name in enumerate(targets[1:], start=1):
            extra[f"dice_pooled_{name}"] = dice_scores(probs[..., c], masks[..., c], threshold)["dice_pooled"]
        probs, masks = probs[..., 0], masks[..., 0]
        data = {**data, "mask": masks}
    result = {"all": {**dice_scores(probs, masks, threshold), **extra}}
    if group_by:
        for label in sorted(set(data[group_by].tolist())):
            sel = data[group_by] == label
            result[label] = dice_scores(probs[sel], data["mask"][sel], threshold)
    return result


def selection_score(val: dict, targets: Sequence[str] = ("cord",)) -> float:
    """The number that picks the best epoch: the cord's mean per-patch Dice (pooled when no
    patch has a cord), averaged with the other channels' pooled Dice for multi-output models."""
    cord = val["all"]["dice_mean"] if val["all"]["dice_mean"] is not None else val["all"]["dice_pooled"]
    others = [val["all"][f"dice_pooled_{name}"] for name in targets[1:]]
    return float(np.mean([cord, *others]))


# --------------------------------------------------------------------------------------------- loop


class _Prefetch:
    """Runs a sample iterator in a thread so patch preparation overlaps training."""

    _END = object()

    def __init__(self, iterator, maxsize: int):
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True)
        self._thread.start()

    def _run(self, iterator):
        try:
            for item in iterator:
                self._q.put(item)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._error = exc
        self._q.put(self._END)

    def get(self):
        item = self._q.get()
        if item is self._END:
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item


def cosine_lr(start: dict, seconds: float, recipe: Recipe, epoch: int | None = None) -> float:
    """Cosine decay from ``start["lr"]`` to ``min_lr``: by wall-clock time from ``start["seconds"]`` to
    the budget's end, or, without a time budget, by epochs from ``start["epoch"]`` (the last epoch done
    when the schedule began) to ``recipe.epochs``; ``epoch`` is the epoch just finished.

    >>> round(cosine_lr({"seconds": 0.0, "lr": 1e-3}, 50.0, Recipe(max_seconds=100.0, min_lr=0.0)), 6)
    0.0005
    >>> round(cosine_lr({"seconds": 0.0, "lr": 1e-3, "epoch": -1}, 0.0, Recipe(epochs=10, min_lr=0.0), epoch=4), 6)
    0.0005
    """
    if recipe.max_seconds is None:
        first = int(start.get("epoch", -1))
        if epoch is None or recipe.epochs - 1 <= first:
            return float(start["lr"])
        frac = min(max((epoch - first) / (recipe.epochs - 1 - first), 0.0), 1.0)
    elif recipe.max_seconds <= start["seconds"]:
        return float(start["lr"])
    else:
        frac = min(max((seconds - start["seconds"]) / (recipe.max_seconds - start["seconds"]), 0.0), 1.0)
    return float(recipe.min_lr + (start["lr"] - recipe.min_lr) * 0.5 * (1.0 + np.cos(np.pi * frac)))


@dataclass
class TrainResult:
    model: object
    history: list[dict]
    seconds: float
    steps: int
    epochs: int
    best_epoch: int | None
    run_dir: Path
    state: dict


def _save_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, run_dir / STATE)


def run_training(
    model,
    recipe: Recipe,
    producer: PatchProducer,
    task: TaskConfig,
    val_set: dict,
    run_dir: Path,
    *,
    resume: bool = False,
    argv: Sequence[str] = (),
    normalisation: dict | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    lr_override: float | None = None,
) -> TrainResult:
    """Train ``model`` (already built, or replaced by the checkpoint when resuming) epoch by epoch.

    Each epoch: ``steps_per_epoch`` Adam steps on the deterministic stream, then validation Dice on
    ``val_set``, plateau check, checkpoint (model + optimizer + state). Stops at ``recipe.epochs``
    or when the wall-clock budget (summed over resumed sessions) runs out.
    """
    import keras

    normalisation = dict(normalisation or DEFAULT_NORMALISATION)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stream = recipe.stream
    state_path = run_dir / STATE
    if state_path.exists() and not resume:
        raise UsageError(f"{run_dir} already holds a training run; pass --resume to continue it "
                         "or choose another --run-dir")
    if resume and state_path.exists():
        state = json.loads(state_path.read_text())
        _register_losses()
        model = keras.models.load_model(run_dir / CHECKPOINT, safe_mode=True)
        apply_freeze(model, recipe.freeze_prefixes)
        LOG.info("resuming %s after epoch %d (%.0f s done)", run_dir, state["epoch"], state["seconds"])
        state.setdefault("resumed_argv", []).append(list(argv))
    else:
        apply_freeze(model, recipe.freeze_prefixes)
        compile_model(model, recipe.lr, recipe.channel_weights)
        state = {"epoch": -1, "seconds": 0.0, "steps": 0, "history": [], "lr": recipe.lr,
                 "best_dice": None, "best_epoch": None, "since_best": 0, "argv": list(argv),
                 "recipe": recipe.as_dict(), "task": task.as_dict()}
    if resume and lr_override is not None:
        state["lr"] = float(lr_override)
        state["best_dice"], state["since_best"] = None, 0   # a new schedule: compare epochs from here on
    if recipe.schedule == "cosine":
        state.setdefault("cosine_from", {"seconds": float(state["seconds"]), "lr": float(state["lr"]),
                                         "epoch": int(state["epoch"])})
    start_epoch = state["epoch"] + 1
    model.optimizer.learning_rate.assign(state["lr"])
    t_session = time.monotonic()
    seconds_before = float(state["seconds"])

    def budget_left() -> bool:
        return recipe.max_seconds is None or seconds_before + time.monotonic() - t_session < recipe.max_seconds

    def sample_stream():
        for epoch in range(start_epoch, recipe.epochs):
            yield from epoch_samples(producer, stream, epoch, task.flip_axes, normalisation,
                                     chunksize=max(1, task.crops_per_view if task.fov_fraction else 1))

    prefetch = _Prefetch(sample_stream(), maxsize=4 * stream.batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="step", desc="train", file=sys.stderr, mininterval=5.0,
                   disable=not sys.stderr.isatty())
    try:
        for epoch in range(start_epoch, recipe.epochs):
            if not budget_left():
                break
            t_epoch = time.monotonic()
            losses, dices = [], []
            stopped_early = False
            for _ in range(stream.steps_per_epoch):
                batch = [prefetch.get() for _ in range(stream.batch_size)]
                x = np.stack([b[0] for b in batch])
                y = np.stack([b[1] for b in batch])
                logs = model.train_on_batch(x, y, return_dict=True)
                losses.append(float(logs["loss"]))
                dices.append(float(logs.get("soft_dice", np.nan)))
                state["steps"] += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
                if not budget_left():
                    stopped_early = True
                    break
            val = evaluate_set(model, val_set, normalisation, recipe.threshold, targets=task.targets)
            val_dice = selection_score(val, task.targets)
            lr = float(np.asarray(model.optimizer.learning_rate))
            row = {"epoch": epoch, "steps": state["steps"], "loss": float(np.mean(losses)),
                   "soft_dice": float(np.nanmean(dices)), "val_dice": float(val_dice), "lr": lr,
                   "seconds": seconds_before + time.monotonic() - t_session,
                   "epoch_seconds": time.monotonic() - t_epoch, "partial": stopped_early,
                   "val_regions": {k: v["dice_mean"] for k, v in val.items() if k != "all"},
                   **{k: v for k, v in val["all"].items() if k.startswith("dice_pooled_")}}
            state["history"].append(row)
            improved = state["best_dice"] is None or val_dice > state["best_dice"]
            if improved:
                state["best_dice"], state["best_epoch"], state["since_best"] = float(val_dice), epoch, 0
                if recipe.keep_best:
                    model.save_weights(run_dir / BEST_WEIGHTS)
            else:
                state["since_best"] += 1
                if (recipe.schedule == "plateau" and state["since_best"] >= recipe.plateau_patience
                        and lr > recipe.min_lr):
                    lr = max(lr * recipe.plateau_factor, recipe.min_lr)
                    model.optimizer.learning_rate.assign(lr)
                    state["since_best"] = 0
                    LOG.info("validation Dice plateau: learning rate -> %.2e", lr)
            if recipe.schedule == "cosine":
                model.optimizer.learning_rate.assign(cosine_lr(state["cosine_from"], row["seconds"], recipe,
                                                                epoch=epoch))
            state["lr"] = float(np.asarray(model.optimizer.learning_rate))
            state["epoch"] = epoch
            state["seconds"] = row["seconds"]
            model.save(run_dir / (CHECKPOINT + ".tmp.keras"))
            os.replace(run_dir / (CHECKPOINT + ".tmp.keras"), run_dir / CHECKPOINT)
            _save_state(run_dir, state)
            with open(run_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            LOG.info("epoch %d: loss %.4f, val Dice %.4f %s, lr %.1e, %.0f s (%.2f s/step)", epoch, row["loss"],
                     val_dice, {k: None if v is None else round(v, 3) for k, v in row["val_regions"].items()},
                     lr, row["seconds"], row["epoch_seconds"] / max(1, len(losses)))
            if on_epoch is not None:
                on_epoch(row)
            if stopped_early:
                break
    finally:
        if bar is not None:
            bar.close()
    if recipe.keep_best and (run_dir / BEST_WEIGHTS).exists():
        model.load_weights(run_dir / BEST_WEIGHTS)
    return TrainResult(model=model, history=state["history"], seconds=float(state["seconds"]),
                       steps=int(state["steps"]), epochs=int(state["epoch"]) + 1, best_epoch=state["best_epoch"],
                       run_dir=run_dir, state=state)


# --------------------------------------------------------------------------------------------- command


def default_pam50(explicit: Path | None) -> str | None:
    """``--pam50`` or ``$SCT_DIR/data/PAM50/template`` when it exists; None means phantom only."""
    if explicit is not None:
        if not Path(explicit).is_dir():
            raise UsageError(f"--pam50 {explicit} is not a folder")
        return str(Path(explicit).absolute())
    sct = os.environ.get("SCT_DIR")
    if sct and (Path(sct) / "data" / "PAM50" / "template").is_dir():
        return str(Path(sct) / "data" / "PAM50" / "template")
    return None


def _argv(args) -> list[str]:
    argv = getattr(args, "argv", None)
    if argv:
        return list(argv)
    return ["conus", *sys.argv[1:]]


def recipe_from_args(args, base: Recipe | None = None) -> Recipe:
    """Command-line overrides on top of a base recipe."""
    base = base or Recipe()
    stream = replace(base.stream,
                     batch_size=args.batch_size or base.stream.batch_size,
                     steps_per_epoch=args.steps or base.stream.steps_per_epoch,
                     seed=int(args.seed))
    threads = int(getattr(args, "threads", None) or os.environ.get("CONUS_TF_THREADS", 0) or min(2, os.cpu_count() or 1))
    workers = getattr(args, "workers", None)
    return replace(base,
                   arch=getattr(args, "architecture", None) or base.arch,
                   lr=args.lr or base.lr,
                   epochs=args.epochs or base.epochs,
                   max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes,
                   threads=threads,
                   workers=base.workers if workers is None else int(workers),
                   keep_best=bool(getattr(args, "keep_best", False)) or base.keep_best,
                   schedule=getattr(args, "schedule", None) or base.schedule,
                   channel_weights=_channel_weights(args, base),
                   stream=stream)


def _channel_weights(args, base: Recipe) -> tuple[float, ...] | None:
    weights = getattr(args, "loss_weights", None)
    if not weights:
        return base.channel_weights
    targets = TASKS[args.task].targets if getattr(args, "task", None) in TASKS else None
    if targets is not None and len(weights) != len(targets):
        raise UsageError(f"--loss-weights takes one weight per output ({', '.join(targets)}); got {len(weights)}")
    if any(w <= 0 for w in weights):
        raise UsageError("--loss-weights must be positive")
    return tuple(float(w) for w in weights)


def main_train(args) -> int:
    """``conus train --synthetic|--data BIDS_DIR --out DIR [--task segmentation|centerline] ...``."""
    task = TASKS[args.task]
    if getattr(args, "regions", None):
        if not args.synthetic:
            raise UsageError("--regions only applies to --synthetic training")
        # a specialist: crops from these regions only, monitored on those that hold a cord
        # (a region named twice is drawn twice as often)
        monitored = tuple(dict.fromkeys(r for r in args.regions if r != "below_conus")) or task.val_regions
        task = replace(task, regions=tuple(args.regions), val_regions=monitored)
    name = args.name or Path(args.out).name
    run_dir = Path(getattr(args, "run_dir", None) or Path("runs") / name)
    recipe = recipe_from_args(args)
    argv = _argv(args)
    pam50 = default_pam50(getattr(args, "pam50", None))
    normalisation = dict(DEFAULT_NORMALISATION)

    if args.synthetic:
        source = SyntheticSource(task, pam50_dir=pam50, engine=getattr(args, "engine", None) or "default")
        data_desc = {"kind": "synthetic", **source.describe(),
                     "note": "PAM50 label maps (85 %) + procedural phantom (15 %)" if pam50 else "procedural phantom only"}
        val_source = SyntheticSource(task, pam50_dir=pam50, fov=False)
    else:
        from bids_app.training.finetune import labelled_bids_sources

        source, val_source, data_desc = labelled_bids_sources(args.data, task, seed=int(args.seed))
    LOG.info("training %s (%s) on %s; run folder %s", name, task.task, data_desc.get("kind"), run_dir)

    # worker processes are forked before TensorFlow is imported
    producer = PatchProducer(source, workers=recipe.workers)
    try:
        if args.synthetic:
            per_region = {region: SyntheticSource(task, pam50_dir=pam50, region=region, fov=False)
                          for region in task.val_regions}
            # 24 monitored crops in all, at least 8 per region (a specialist's one region gets 24)
            val_set = _region_val_set(run_dir, per_region, n=max(8, 24 // len(per_region)))
        else:
            seeds = list(range(VALIDATION_SEED, VALIDATION_SEED + getattr(val_source, "n_patches", 16)))
            val_set = load_or_build_set(run_dir / "val.npz", PatchProducer(val_source, workers=0), seeds)

        from bids_app.training.networks import build_network

        configure_tensorflow(recipe.threads, recipe.stream.seed)
        model = build_network(recipe.arch, outputs=len(task.targets))
        init_from = getattr(args, "init_from", None)
        if init_from and not args.resume:
            from bids_app.bundle import load_bundle

            start = load_bundle(init_from)
            copied = warm_start(model, start.load_model())
            LOG.info("warm start from %s: %d layers copied", init_from, len(copied))
            # kept in the run folder so that a resumed run still records where it started
            (run_dir / INIT_FROM_FILE).write_text(json.dumps(
                {"name": start.name, "path": str(init_from), "sha256": start.sha256, "layers_copied": len(copied)}))
        LOG.info("%s: %d parameters, %d TF threads, %d data workers", recipe.arch, model.count_params(),
                 recipe.threads, recipe.workers)
        result = run_training(model, recipe, producer, task, val_set, run_dir, resume=args.resume, argv=argv,
                              normalisation=normalisation, lr_override=args.lr if args.resume else None)
    finally:
        producer.close()
    from bids_app.training.export import export_bundle, validation_report

    if args.synthetic:
        validation = validation_report(result.model, task, pam50, run_dir, recipe.threshold, normalisation)
    else:
        validation = {"heldout_subjects": evaluate_set(result.model, val_set, normalisation, recipe.threshold,
                                                       group_by=None)["all"]}
    from bids_app.registry import SHIPPED_BUNDLES

    description = SHIPPED_BUNDLES.get(name, {}).get("description") or f"{task.task} 3D U-Net trained by conus train"
    init_file = run_dir / INIT_FROM_FILE
    extra = {"init_from": json.loads(init_file.read_text())} if init_file.is_file() else None
    bundle = export_bundle(result, Path(args.out), name=name, task=task, recipe=recipe, data=data_desc,
                           validation=validation, normalisation=normalisation, description=description,
                           extra_training=extra)
    LOG.info("wrote bundle %s (sha256 %s)", bundle.path, bundle.sha256[:12])
    print(f"bundle written: {bundle.path}  ({result.steps} steps, {result.seconds:.0f} s)")
    return 0


def _region_val_set(run_dir: Path, per_region: dict[str, SyntheticSource], n: int = 8) -> dict:
    """Validation set monitored each epoch: ``n`` held-out crops per region, cached in the run folder."""
    parts = []
    for ri, (region, source) in enumerate(per_region.items()):
        seeds = [VALIDATION_SEED + 10_000 * ri + i for i in range(n)]
        data = load_or_build_set(run_dir / f"val_{region}.npz", PatchProducer(source, workers=0), seeds)
        data["region"] = np.array([region] * len(seeds))
        parts.append(data)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
