"""Label identities of the synthetic engine and the SCT/PAM50 disc-value convention.

The multi-label map of every :class:`~bids_app.synth.generator.SynthSample` uses ``LABELS``.
The spinal cord itself is ``cord`` (white matter and anything not grey matter) plus
``cord_gm``; :data:`CORD_LABELS` lists both.  Values ``>= BACKGROUND_BLOB_FIRST`` are random
background tissue blobs (SynthSeg-style) that keep the background from ever being empty.

Disc values follow SCT/PAM50: value ``n`` is the disc just above vertebra ``n``
(C1=1 … C7=7, T1=8 … T12=19, L1=20 … L5=24, S1=25), so 3 = C2-C3, 17 = T9-T10,
21 = L1-L2, 25 = L5-S1; 60 marks the conus medullaris.
"""

from __future__ import annotations

LABELS: dict[str, int] = {
    "background": 0,
    "cord": 1,
    "csf": 2,
    "cord_gm": 3,
    "filum": 4,
    "cauda_equina": 5,
    "vertebral_body": 6,
    "posterior_elements": 7,
    "disc_annulus": 8,
    "disc_nucleus": 9,
    "epidural_fat": 10,
    "paraspinal_muscle": 11,
    "subcutaneous_fat": 12,
    "sacrum": 13,
    "ligament": 14,
    "air": 15,
    "body_tissue": 16,
}
BACKGROUND_BLOB_FIRST = 20
N_BACKGROUND_BLOBS = 9
N_LABELS = BACKGROUND_BLOB_FIRST + N_BACKGROUND_BLOBS

CORD_LABELS: tuple[int, ...] = (LABELS["cord"], LABELS["cord_gm"])
CANAL_CONTENT_LABELS: tuple[int, ...] = (
    LABELS["cord"], LABELS["cord_gm"], LABELS["csf"], LABELS["filum"], LABELS["cauda_equina"],
)
CONUS_VALUE = 60

VERTEBRA_NAMES: tuple[str, ...] = (
    tuple(f"C{i}" for i in range(1, 8)) + tuple(f"T{i}" for i in range(1, 13))
    + tuple(f"L{i}" for i in range(1, 6)) + ("S1",)
)


def vertebra_name(value: int) -> str:
    """Name of vertebra ``value`` (1 = C1 … 24 = L5, 25 = S1)."""
    if not 1 <= value <= len(VERTEBRA_NAMES):
        raise ValueError(f"no vertebra with value {value}")
    return VERTEBRA_NAMES[value - 1]


def disc_name(value: int) -> str:
    """Name of the disc with SCT value ``value`` (the disc just above vertebra ``value``).

    ``disc_name(3) == "C2-C3"``, ``disc_name(21) == "L1-L2"``, ``disc_name(60) == "conus"``.
    Value 1 has no disc above it; SCT uses it for the top of C1 (the pontomedullary level),
    named ``"C1"`` here.
    """
    if value == CONUS_VALUE:
        return "conus"
    if value == 1:
        return "C1"
    return f"{vertebra_name(value - 1)}-{vertebra_name(value)}"
