"""Training-time augmentation of (image, mask) patches (pure numpy, seeded).

The synthetic engine already randomises anatomy, contrast and artefacts; what is added here is
what any data source benefits from, including real scans in fine-tuning: random flips of the
spatial axes (also what flip test-time augmentation relies on).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def random_flips(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, axes: Sequence[int] = (0, 1, 2), p: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Flip image and mask together along each of ``axes`` with probability ``p``."""
    flip = tuple(int(a) for a in axes if rng.random() < p)
    if not flip:
        return image, mask
    return np.ascontiguousarray(np.flip(image, flip)), np.ascontiguousarray(np.flip(mask, flip))
