"""Training data: patch sources, the per-epoch patch stream, and fixed validation sets.

A *source* maps an integer seed to one ``(image, mask)`` patch (float32 raw intensities, uint8
mask) of the task's patch size at the task's spacing. Two sources exist:

- :class:`SyntheticSource`: the synthetic engine (``bids_app.synth``), either a crop around the
  cord (``generate_crop``) or, for a share ``fov_fraction`` of the patches, a patch cut at a
  random place from a whole coarse field of view (``generate_sample``), which teaches the coarse
  centerline model what "no cord here" looks like far from the spine.
- :class:`ArraySource`: patches cut from labelled volumes already in memory (real scans for
  ``train --data`` / ``finetune``, and tiny phantoms in tests).

The stream (:func:`epoch_samples`) is a pure function of (seed, epoch): a run killed after epoch
``e`` restarts at ``e + 1`` with exactly the data it would have seen. The task configuration
(spacing, patch size, crop policy) is data, so the segmentation and the coarse centerline model
share all of this code.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from bids_app.segment import normalise_intensity, window_starts
from bids_app.training.augment import random_flips

LOG = logging.getLogger("conus.training")

#: seed ranges: training seeds are < VALIDATION_SEED; held-out sets live far above
VALIDATION_SEED = 1_000_000       # monitored every epoch (in-range, per region)
REPORT_SEED = 1_100_000           # final report, in-range
OUT_OF_RANGE_SEED = 2_000_000     # final report, deformation/size ranges beyond training
PHANTOM_SEED = 3_000_000          # fixed phantom set recorded in metadata and checked by a test


@dataclass(frozen=True)
class TaskConfig:
    """What a model sees: task, grid and how training patches are drawn."""

    task: str                                   # "segmentation" | "centerline"
    spacing: tuple[float, float, float]         # mm, RAS working axes
    patch_size: tuple[int, int, int]
    regions: tuple[str | None, ...] = (None,)   # generate_crop regions (None: the engine's mix)
    contrasts: tuple[str | None, ...] = (None,)
    fov_fraction: float = 0.0                   # share of patches cut from whole coarse views
    crops_per_view: int = 8                     # patches cut from one whole view
    strength: float = 1.0                       # synthetic deformation/size range (1 = training)
    flip_axes: tuple[int, ...] = (0, 1, 2)
    val_regions: tuple[str, ...] = ("cervical", "thoracic", "lumbosacral")
    targets: tuple[str, ...] = ("cord",)        # output channels (bids_app.synth.targets.TARGETS)

    @property
    def multi_target(self) -> bool:
        return self.targets != ("cord",)

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


#: the coarse whole-view grid shared by the centerline and spine tasks
_COARSE = TaskConfig(
    task="centerline",
    spacing=(1.5, 1.5, 1.5),
    patch_size=(64, 64, 64),
    fov_fraction=0.3,
    val_regions=("cervical", "thoracic", "lumbosacral", "below_conus"),
)

TASKS: dict[str, TaskConfig] = {
    "segmentation": TaskConfig(task="segmentation", spacing=(0.5, 0.5, 1.0), patch_size=(64, 64, 48)),
    "centerline": _COARSE,
    # coarse whole-view model with three outputs: cord heatmap (centerline), disc tissue and the
    # C2/sacrum anchors (vertebral levels); half the crops are whole-view patches. Half of the
    # cord crops are centred on an anchor (the engine's own crop mix never reaches the sacrum from
    # a lumbosacral crop: about 1 patch in 5 held an anchor), and two validation regions measure them.
    "spine": replace(_COARSE, task="spine", fov_fraction=0.5, targets=("cord", "discs", "anchors"),
                     regions=(None, None, "craniocervical", "sacral"),
                     val_regions=(*_COARSE.val_regions, "craniocervical", "sacral")),
}


@dataclass(frozen=True)
class StreamConfig:
    """How many patches an epoch holds and how they are reused."""

    batch_size: int = 4
    steps_per_epoch: int = 50
    reuse: int = 2          # each new patch appears this many times per epoch (different flips)
    chunk: int = 16         # new patches are shuffled within chunks of this many
    seed: int = 0

    @property
    def samples_per_epoch(self) -> int:
        return self.batch_size * self.steps_per_epoch

    @property
    def new_per_epoch(self) -> int:
        return -(-self.samples_per_epoch // self.reuse)


def _crop_or_pad(vol: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """``vol[start:start+size]`` where the window may reach outside the array (padded with fill).

    Trailing axes beyond the three spatial ones (channels) are kept whole.
    """
    out = np.full(tuple(size) + vol.shape[3:], fill, dtype=vol.dtype)
    src, dst = [], []
    for a in range(3):
        s0, s1 = start[a], start[a] + size[a]
        c0, c1 = max(s0, 0), min(s1, vol.shape[a])
        if c1 <= c0:
            return out
        src.append(slice(c0, c1))
        dst.append(slice(c0 - s0, c1 - s0))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def random_window(rng: np.random.Generator, shape: Sequence[int], size: Sequence[int]) -> tuple[int, ...]:
    """A uniformly random window start; windows larger than the array stay around it."""
    starts = []
    for n, p in zip(shape, size, strict=True):
        lo, hi = min(0, n - p), max(0, n - p)
        starts.append(int(rng.integers(lo, hi + 1)))
    return tuple(starts)


@dataclass
class SyntheticSource:
    """Seed -> (image, mask) patch from the synthetic engine, following a :class:`TaskConfig`."""

    task: TaskConfig
    pam50_dir: str | None = None
    source: str | None = None     # generate_crop's source (None: PAM50/phantom mix, phantom without PAM50)
    strength: float | None = None
    region: str | None = None     # fixes the region (validation sets); None: from task.regions
    fov: bool | None = None       # force / forbid whole-view patches (None: task.fov_fraction)
    engine: str = "default"       # engine variant (bids_app.synth.features.ABLATIONS)
    _view_cache: dict = field(default_factory=dict, repr=False)

    def describe(self) -> dict:
        return {"engine": "bids_app.synth", "pam50_dir": self.pam50_dir, "source": self.source or "auto",
                "strength": self.strength or self.task.strength, "region": self.region,
                "engine_variant": self.engine}

    def __call__(self, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
        from bids_app.synth import generate_crop, generate_sample
        from bids_app.synth.features import features_named

        t = self.task
        features = features_named(self.engine)
        group = seed // t.crops_per_view
        grng = np.random.default_rng([int(group), 7919])
        use_fov = grng.random() < t.fov_fraction if self.fov is None else self.fov
        rng = np.random.default_rng([int(seed), 104729])
        region = self.region if self.region is not None else t.regions[int(rng.integers(len(t.regions)))]
        contrast = t.contrasts[int(rng.integers(len(t.contrasts)))]
        strength = self.strength or t.strength
        if not use_fov:
            s = generate_crop(int(seed), patch_size=t.patch_size, spacing=t.spacing, pam50_dir=self.pam50_dir,
                              contrast=contrast, region=region, source=self.source, strength=strength,
                              features=features)
            return s.image.astype(np.float32), self._targets(s), {"region": s.region, "contrast": s.contrast}
        # a whole coarse view, shared by the crops_per_view consecutive seeds of a group
        if group not in self._view_cache:
            src = self.source or ("pam50" if self.pam50_dir and grng.random() < 0.85 else "phantom")
            self._view_cache.clear()
            view = generate_sample(int(group) + 5_000_000, source=src, pam50_dir=self.pam50_dir,
                                   region=None, contrast=contrast, spacing=t.spacing, strength=strength,
                                   features=features)
            self._view_cache[group] = (view, self._targets(view))
        view, targets = self._view_cache[group]
        start = random_window(rng, view.image.shape, t.patch_size)
        fill = float(view.image.min())
        image = _crop_or_pad(view.image.astype(np.float32), start, t.patch_size, fill)
        mask = _crop_or_pad(targets, start, t.patch_size, 0)
        return image, mask, {"region": f"view-{view.region}", "contrast": view.contrast}

    def _targets(self, sample) -> np.ndarray:
        """The mask (X, Y, Z) of a one-output task (the cord or another single target), or
        (X, Y, Z, C) channels for several targets (as the model's outputs: one channel is squeezed)."""
        if self.task.targets == ("cord",):
            return sample.cord.astype(np.uint8)
        from bids_app.synth.targets import target_channels

        y = target_channels(sample, self.task.targets)
        return y[..., 0] if y.shape[-1] == 1 else y


@dataclass
class ArraySource:
    """Seed -> patch cut from labelled volumes held in memory (already on the task's grid).

    A patch is centred on a random cord voxel with probability ``p_cord`` (jittered by up to a
    quarter patch), otherwise placed anywhere, so the network also sees what lies around.
    """

    volumes: list[np.ndarray]
    masks: list[np.ndarray]
    patch_size: tuple[int, int, int]
    p_cord: float = 0.8
    names: list[str] | None = None

    def describe(self) -> dict:
        return {"engine": "arrays", "n_volumes": len(self.volumes), "names": self.names}

    def __call__(self, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
        rng = np.random.default_rng([int(seed), 15485863])
        i = int(rng.integers(len(self.volumes)))
        vol, mask = self.volumes[i], self.masks[i]
        cord = np.argwhere(mask > 0)
        if len(cord) and rng.random() < self.p_cord:
            centre = cord[int(rng.integers(len(cord)))]
            jitter = rng.uniform(-0.25, 0.25, 3) * np.asarray(self.patch_size)
            start = tuple(int(c - p // 2 + j) for c, p, j in zip(centre, self.patch_size, jitter, strict=True))
        else:
            start = random_window(rng, vol.shape, self.patch_size)
        image = _crop_or_pad(vol.astype(np.float32), start, self.patch_size, float(vol.min()))
        label = _crop_or_pad(mask.astype(np.uint8), start, self.patch_size, 0)
        return image, label, {"region": "data", "volume": i}


def grid_patches(volume: np.ndarray, mask: np.ndarray, patch_size: Sequence[int], overlap: int,
                 margin: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """All patches of a sliding-window grid over the cord's bounding box (+ ``margin`` voxels).

    ``overlap`` is in voxels (the thesis extracted training patches with a 3-slice overlap).
    """
    cord = np.argwhere(mask > 0)
    if len(cord) == 0:
        return []
    lo = np.maximum(cord.min(0) - margin, 0)
    hi = np.minimum(cord.max(0) + margin + 1, volume.shape)
    out = []
    starts = [window_starts(int(hi[a] - lo[a]), int(patch_size[a]), min(overlap, int(patch_size[a]) - 1))
              for a in range(3)]
    fill = float(volume.min())
    for i in starts[0]:
        for j in starts[1]:
            for k in starts[2]:
                s = (int(lo[0] + i), int(lo[1] + j), int(lo[2] + k))
                out.append((_crop_or_pad(volume.astype(np.float32), s, patch_size, fill),
                            _crop_or_pad(mask.astype(np.uint8), s, patch_size, 0)))
    return out


def prepare(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None, flip_axes: Sequence[int],
            normalisation: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """Augment (when ``rng`` is given) and normalise one patch; returns (X, Y, Z, 1) float32 pair."""
    if rng is not None and flip_axes:
        image, mask = random_flips(image, mask, rng, flip_axes)
    image = normalise_intensity(image, normalisation)
    target = mask if mask.ndim == 4 else mask[..., None]
    return image[..., None].astype(np.float32), target.astype(np.float32)


_WORKER_SOURCE = None


def _init_worker(source) -> None:
    global _WORKER_SOURCE
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    _WORKER_SOURCE = source


def _safe_call(source, seed: int):
    """Run ``source(seed)``; on failure retry with derived seeds so one bad draw cannot stop a run."""
    for attempt in range(5):
        s = seed if attempt == 0 else seed + 7_000_000 * attempt
        try:
            return source(s)
        except Exception as exc:  # noqa: BLE001 - the engine may raise anything; log and redraw
            LOG.warning("synthetic draw %d failed (%s: %s); redrawing", s, type(exc).__name__, exc)
    raise RuntimeError(f"patch source failed 5 times from seed {seed}")


def _worker_call(seed: int):
    return _safe_call(_WORKER_SOURCE, seed)


class PatchProducer:
    """Generates patches for a list of seeds, in order, in ``workers`` processes (0: inline).

    Create it before TensorFlow is imported: workers are forked and never touch TensorFlow. Each
    worker keeps its own copy of the source (and of its whole-view cache).
    """

    def __init__(self, source, workers: int = 1):
        self.source = source
        self.workers = workers
        self._pool = None
        if workers > 0:
            ctx = multiprocessing.get_context("fork")
            self._pool = ctx.Pool(workers, initializer=_init_worker, initargs=(source,))

    def imap(self, seeds: Sequence[int], chunksize: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
        seeds = [int(s) for s in seeds]
        if self._pool is None:
            return (_safe_call(self.source, s) for s in seeds)
        return self._pool.imap(_worker_call, seeds, chunksize=chunksize)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def epoch_seeds(stream: StreamConfig, epoch: int) -> list[int]:
    """Training seeds of ``epoch`` (disjoint across epochs, all below :data:`VALIDATION_SEED`)."""
    base = stream.seed * 10_000 + epoch * stream.new_per_epoch
    seeds = [base + i for i in range(stream.new_per_epoch)]
    if seeds[-1] >= VALIDATION_SEED:
        seeds = [s % VALIDATION_SEED for s in seeds]
    return seeds


def epoch_samples(producer: PatchProducer, stream: StreamConfig, epoch: int, flip_axes: Sequence[int],
                  normalisation: dict | None, chunksize: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield exactly ``stream.samples_per_epoch`` augmented, normalised samples for ``epoch``.

    New patches arrive in chunks; each chunk is repeated ``reuse`` times and shuffled with a
    generator seeded by (seed, epoch, chunk), each repetition with its own random flips.
    """
    rng = np.random.default_rng([stream.seed, epoch, 31337])
    emitted = 0
    chunk: list[tuple[np.ndarray, np.ndarray]] = []

    def flush():
        nonlocal emitted
        order = [i for _ in range(stream.reuse) for i in range(len(chunk))]
        rng.shuffle(order)
        for i in order:
            if emitted >= stream.samples_per_epoch:
                return
            emitted += 1
            yield prepare(chunk[i][0], chunk[i][1], rng, flip_axes, normalisation)

    for image, mask, _info in producer.imap(epoch_seeds(stream, epoch), chunksize=chunksize):
        chunk.append((image, mask))
        if len(chunk) == stream.chunk:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


def tf_dataset(source, *, seed: int = 0, batch_size: int = 4, flip_axes: Sequence[int] = (0, 1, 2),
               normalisation: dict | None = None, channels: int = 1):
    """An endless ``tf.data.Dataset`` of ``(image, target)`` batches drawn on the fly from ``source``
    (e.g. a :class:`SyntheticSource`), for Keras ``fit`` or any tf.data pipeline.

    Element ``i`` comes from seed ``seed * 10_000 + i`` (as :func:`epoch_seeds` numbers them), with
    random flips seeded by (seed, i), so the stream is deterministic. Shapes: images
    ``(batch, X, Y, Z, 1)``, targets ``(batch, X, Y, Z, channels)``, float32. ``conus train`` uses
    :class:`PatchProducer` instead (worker processes, resumable epochs); this adapter is for users
    who want the engine inside their own TensorFlow code.
    """
    import tensorflow as tf

    probe, _, _ = source(seed * 10_000)
    shape = tuple(int(v) for v in probe.shape)

    def generate():
        i = 0
        while True:
            image, mask, _info = _safe_call(source, seed * 10_000 + i)
            rng = np.random.default_rng([int(seed), i, 271828])
            yield prepare(image, mask, rng, flip_axes, normalisation)
            i += 1

    spec = (tf.TensorSpec(shape + (1,), tf.float32), tf.TensorSpec(shape + (int(channels),), tf.float32))
    return tf.data.Dataset.from_generator(generate, output_signature=spec).batch(batch_size)


def build_set(producer: PatchProducer, seeds: Sequence[int]) -> dict:
    """Materialise a fixed patch set: {"image": (N,X,Y,Z) raw, "mask": (N,X,Y,Z), "region", "contrast"}."""
    images, masks, regions, contrasts = [], [], [], []
    for image, mask, info in producer.imap(list(seeds)):
        images.append(image)
        masks.append(mask)
        regions.append(str(info.get("region", "")))
        contrasts.append(str(info.get("contrast", "")))
    return {"image": np.stack(images).astype(np.float32), "mask": np.stack(masks).astype(np.uint8),
            "region": np.array(regions), "contrast": np.array(contrasts), "seed": np.array(list(seeds))}


def load_or_build_set(path, producer: PatchProducer, seeds: Sequence[int]) -> dict:
    """Cached :func:`build_set` (an ``.npz`` under the run folder), rebuilt when the seeds differ."""
    from pathlib import Path

    path = Path(path)
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            cached = {k: data[k] for k in data.files}
        if list(cached["seed"]) == list(seeds):
            return cached
    data = build_set(producer, seeds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **data)
    os.replace(tmp, path)
    return data
