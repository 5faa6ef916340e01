"""Synthetic spine MRI engine: label-map templates (PAM50 or a procedural phantom), random
deformations, SynthSeg-style intensities and acquisition artefacts.

Public API::

    from bids_app.synth import generate_crop, generate_sample, SynthSample, LABELS
"""

from __future__ import annotations

from bids_app.synth.generator import REGIONS, SynthSample, generate_crop, generate_sample
from bids_app.synth.labels import CORD_LABELS, LABELS

__all__ = ["CORD_LABELS", "LABELS", "REGIONS", "SynthSample", "generate_crop", "generate_sample"]
