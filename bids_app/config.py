"""Frozen configuration objects built by the command line and passed to the library.

Every option of the BIDS App form of ``conus`` ends up in :class:`ParticipantConfig`; the
library never reads ``argparse`` namespaces or the environment for its options.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_CONTRASTS: tuple[str, ...] = ("T2w", "T1w", "T2starw")
"""Suffixes processed when ``--contrast`` is not given."""

DEFAULT_SPLIT_LEVEL = "T9-T10"
"""Disc at which ``--split`` separates the cervicothoracic from the lumbosacral cord."""

DEFAULT_OVERLAP = 0.33
"""Sliding-window overlap (fraction of the patch). 0.33 measured the same Dice as 0.5 on the real
development scans (0.955 / 0.831 / 0.946 vs 0.952 / 0.831 / 0.946) and on 8 synthetic views (no
per-view change above 0.004), with fewer windows."""


@dataclass(frozen=True)
class ParticipantConfig:
    """All options of one ``conus BIDS_DIR OUTPUT_DIR {participant,group}`` invocation.

    Paths are :class:`~pathlib.Path` objects, labels are tuples of bare labels (without the
    ``sub-``/``ses-`` prefix). ``bids_filters`` is the parsed ``--bids-filter-file`` content
    (a plain dict, so the config stays picklable for worker processes).
    """

    bids_dir: Path
    output_dir: Path
    analysis_level: str = "participant"
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    bids_filter_file: Path | None = None
    bids_filters: dict[str, Any] = field(default_factory=dict, hash=False)
    contrasts: tuple[str, ...] = DEFAULT_CONTRASTS
    n_cpus: int = 1
    work_dir: Path | None = None
    skip_bids_validator: bool = False
    overwrite: bool = False
    verbosity: int = 0
    """-1 with ``-q``, 0 by default, +1 per ``-v``."""
    reference_dir: Path | None = None
    dry_run: bool = False
    model: str | None = None
    """A shipped bundle name or a bundle path; None means the default shipped model."""
    centerline_model: str | None = None
    """Centerline bundle name or path; None means the default shipped centerline model."""
    centerline: str = "auto"
    centerline_file: Path | None = None
    tta: bool = False
    overlap: float | int = DEFAULT_OVERLAP
    """Sliding-window overlap: a fraction of the patch (float < 1) or a number of voxels (int)."""
    levels: str = "labels"
    split: bool = False
    split_level: str = DEFAULT_SPLIT_LEVEL
    lumbosacral_model: str | None = None
    """Segmentation bundle for the cord below the split disc (region-aware); None: one model."""
    compare: tuple[Path, ...] = ()

    @property
    def quiet(self) -> bool:
        """True when ``-q`` was given (no progress bar, warnings and errors only)."""
        return self.verbosity < 0

    def with_changes(self, **changes: Any) -> ParticipantConfig:
        """Return a copy with some fields replaced (the config itself is immutable)."""
        return replace(self, **changes)

    def processing_parameters(self) -> dict[str, Any]:
        """The options that change a run's outputs (recorded in provenance, used for skip logic).

        Paths of user-supplied files are recorded as strings; their content hashes are added by
        the pipeline.
        """
        keys = ("model", "centerline_model", "centerline", "tta", "overlap", "levels", "split", "split_level",
                "lumbosacral_model")
        params: dict[str, Any] = {k: getattr(self, k) for k in keys}
        params["centerline_file"] = None if self.centerline_file is None else str(self.centerline_file)
        return params

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view of every option (paths as strings, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[f.name] = value
        return out
