"""A pre-generated pool of training crops on disk, for when on-the-fly generation is too slow.

``write_crop_pool(folder, n, seed, ...)`` writes shards ``crops-00000.npz`` … holding
``image`` (float16), ``cord`` (uint8) and ``seed`` arrays; ``iter_crop_pool(folder)`` yields
``(image float32, cord uint8)`` pairs.  Crop ``i`` uses seed ``seed + i``, so a pool is
reproducible and two pools with disjoint seed ranges never share a sample.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bids_app.errors import CannotCreateOutputError, InputMissingError
from bids_app.synth.generator import generate_crop


def write_crop_pool(folder, n: int, seed: int, *, shard_size: int = 256, **crop_kwargs) -> list[Path]:
    """Generate ``n`` crops (seeds ``seed … seed+n-1``) into npz shards; returns the shard paths.

    ``crop_kwargs`` go to :func:`~bids_app.synth.generator.generate_crop` (patch_size,
    spacing, pam50_dir, contrast, region, ...).  Shards are written atomically; an existing
    complete shard is kept, so an interrupted run resumes where it stopped.
    """
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotCreateOutputError(f"cannot create the pool folder: {exc}", path=out) from exc
    paths = []
    for start in range(0, n, shard_size):
        path = out / f"crops-{start // shard_size:05d}.npz"
        paths.append(path)
        if path.is_file():
            continue
        seeds = np.arange(seed + start, seed + min(start + shard_size, n))
        samples = [generate_crop(int(s), **crop_kwargs) for s in seeds]
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, image=np.stack([s.image for s in samples]).astype(np.float16),
                 cord=np.stack([s.cord for s in samples]), seed=seeds)
        os.replace(tmp, path)
    return paths


def iter_crop_pool(folder) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(image float32, cord uint8)`` from every shard of a pool, in seed order."""
    shards = sorted(Path(folder).glob("crops-*.npz"))
    if not shards:
        raise InputMissingError("no crops-*.npz shards in the pool folder", path=folder)
    for shard in shards:
        with np.load(shard) as z:
            images, cords = z["image"], z["cord"]
        for img, cord in zip(images, cords, strict=True):
            yield img.astype(np.float32), cord
