"""Synthetic spine MRI engine: label-map templates (PAM50 or a procedural phantom), random
deformations, SynthSeg-style intensities and acquisition artefacts.

Public API::

    from bids_app.synth import generate_crop, generate_sample, SynthSample, LABELS

The generator (numpy/scipy) is imported on first use, so that light modules of the package
(``labels``, ``features``) can feed the command line without slowing ``conus --help``.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "REGIONS": "bids_app.synth.generator",
    "SynthSample": "bids_app.synth.generator",
    "generate_crop": "bids_app.synth.generator",
    "generate_sample": "bids_app.synth.generator",
    "CORD_LABELS": "bids_app.synth.labels",
    "LABELS": "bids_app.synth.labels",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bids_app.synth' has no attribute {name!r}")
