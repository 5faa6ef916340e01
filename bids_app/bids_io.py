"""BIDS queries: find the anatomical runs to process and their reference masks / disc labels.

pybids is imported lazily so that ``import bids_app.cli`` stays fast. Runs are identified by
*all* the entities in their file name (``run_id`` is the file name without extension), so two
runs never collide even when they differ only by ``acq``, ``rec``, ``ce``, ``run``...

Reference files are looked up, for a run whose file name stem is ``S``, in
``BIDS_DIR/derivatives/labels/<sub>/[<ses>/]anat/`` (or ``--reference-dir`` with the same layout,
or flat) under these names, first match wins:

* cord masks: ``S_label-SC_seg`` (spine-generic), ``S_seg-manual`` (older spine-generic),
  ``S_label-SC_mask`` (BIDS);
* disc labels: ``S_label-discs_dlabel`` (spine-generic), ``S_labels-disc-manual`` (older).

A folder without ``dataset_description.json`` (including an empty folder) is not a BIDS dataset:
:class:`~bids_app.errors.InputMissingError` (exit 66).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_app.config import ParticipantConfig
from bids_app.errors import BidsValidationError, InputMissingError, NoMatchError, UsageError

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
REFERENCE_MASK_SUFFIXES = ("_label-SC_seg", "_seg-manual", "_label-SC_mask")
DISC_LABEL_SUFFIXES = ("_label-discs_dlabel", "_labels-disc-manual")
LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")

# BIDS entity keys as written in file names -> pybids query names.
_PYBIDS_NAMES = {
    "sub": "subject", "ses": "session", "task": "task", "acq": "acquisition", "ce": "ceagent",
    "rec": "reconstruction", "dir": "direction", "run": "run", "echo": "echo", "flip": "flip",
    "inv": "inversion", "mt": "mt", "part": "part", "chunk": "chunk",
}


@dataclass(frozen=True)
class Run:
    """One anatomical image to segment, with everything found about it.

    ``entities`` holds every ``key-value`` pair of the file name in order (``sub``, ``ses``,
    ``acq``, ``rec``, ``run``, ``ce``...); ``suffix`` is the contrast (``T2w``...); ``run_id`` is
    the file name without its extension, unique within a dataset.
    """

    path: Path
    entities: dict[str, str] = field(hash=False)
    suffix: str
    run_id: str
    reference_mask: Path | None = None
    disc_labels: Path | None = None

    @property
    def subject(self) -> str:
        """Bare subject label (no ``sub-``)."""
        return self.entities["sub"]

    @property
    def session(self) -> str | None:
        """Bare session label or None."""
        return self.entities.get("ses")

    @property
    def relative_dir(self) -> Path:
        """``sub-<l>/[ses-<s>/]anat`` — the folder of this run relative to a dataset root."""
        rel = Path(f"sub-{self.subject}")
        if self.session is not None:
            rel = rel / f"ses-{self.session}"
        return rel / "anat"


def strip_extension(name: str) -> str:
    """File name without its NIfTI extension (``.nii.gz`` or ``.nii``) or other extension."""
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name.rsplit(".", 1)[0] if "." in name else name


def parse_bids_name(name: str) -> tuple[dict[str, str], str]:
    """Split a BIDS file name into (entities in order, suffix).

    >>> parse_bids_name("sub-01_ses-a_acq-sag_run-2_T2w.nii.gz")
    ({'sub': '01', 'ses': 'a', 'acq': 'sag', 'run': '2'}, 'T2w')
    """
    parts = strip_extension(name).split("_")
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if not sep or not key or not value:
            raise UsageError(f"not a BIDS file name (bad entity {part!r})", path=name)
        entities[key] = value
    if "sub" not in entities:
        raise UsageError("not a BIDS file name (no sub- entity)", path=name)
    return entities, parts[-1]


def normalise_label(label: str, prefix: str) -> str:
    """Strip an optional ``sub-``/``ses-`` prefix and check the label is alphanumeric.

    The prefix is removed with ``startswith`` (never ``lstrip``, which would eat leading
    characters such as the ``s`` of ``sub-s01``). Raises :class:`UsageError` (exit 64) for an
    empty label or one containing ``/``, ``..`` or any non-alphanumeric character.
    """
    bare = label[len(prefix):] if label.startswith(prefix) else label
    if not LABEL_RE.match(bare):
        raise UsageError(
            f"invalid label {label!r}: BIDS labels are alphanumeric (no '/', '..', '-', '_' or spaces)"
        )
    return bare


def check_dataset(bids_dir: Path) -> None:
    """Refuse a missing folder, an empty folder, or one without ``dataset_description.json``.

    All three raise :class:`InputMissingError` (exit 66) naming the folder.
    """
    if not bids_dir.exists():
        raise InputMissingError("BIDS_DIR does not exist", path=bids_dir)
    if not bids_dir.is_dir():
        raise InputMissingError("BIDS_DIR is not a folder", path=bids_dir)
    if not any(bids_dir.iterdir()):
        raise InputMissingError("BIDS_DIR is empty: not a BIDS dataset", path=bids_dir)
    desc = bids_dir / "dataset_description.json"
    if not desc.is_file():
        raise InputMissingError(
            "not a BIDS dataset: dataset_description.json is missing at its top level", path=bids_dir
        )


def load_filter_file(path: Path) -> dict[str, Any]:
    """Read a ``--bids-filter-file``; anything but a JSON object raises UsageError (exit 64).

    Two forms are accepted: a flat object of entity filters applied to every contrast
    (``{"acquisition": "sag"}``), or an object keyed by contrast (``{"T2w": {"run": 1}}``, keys
    case-insensitive, as fMRIPrep's per-modality filters). ``null`` means "entity absent" and
    ``"*"`` "entity present with any value".
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the --bids-filter-file: {exc.strerror}", path=path) from exc
    try:
        filters = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--bids-filter-file is not valid JSON ({exc.msg} at line {exc.lineno})",
                         path=path) from exc
    if not isinstance(filters, dict):
        raise UsageError("--bids-filter-file must hold a JSON object", path=path)
    return filters


def _filters_for(contrast: str, filters: dict[str, Any], contrasts: Iterable[str]) -> dict[str, Any]:
    """Entity filters that apply to ``contrast`` (see :func:`load_filter_file`)."""
    lowered = {c.lower() for c in contrasts}
    if filters and all(k.lower() in lowered for k in filters):
        per = {k.lower(): v for k, v in filters.items()}
        selected = per.get(contrast.lower(), {})
        if not isinstance(selected, dict):
            raise UsageError(f"--bids-filter-file: the entry for {contrast} must be an object")
        return dict(selected)
    return dict(filters)


def _to_pybids(filters: dict[str, Any]) -> dict[str, Any]:
    """Translate JSON filters to pybids query arguments (short entity names, null, "*")."""
    from bids.layout import Query

    out: dict[str, Any] = {}
    for key, value in filters.items():
        name = _PYBIDS_NAMES.get(key, key)
        if value is None:
            value = Query.NONE
        elif value == "*":
            value = Query.ANY
        out[name] = value
    return out


def get_layout(bids_dir: Path):
    """A fast pybids layout of the raw data (no validation, no derivatives, no metadata index)."""
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    indexer = BIDSLayoutIndexer(validate=False, index_metadata=False,
                                ignore=[re.compile(r"^/(code|sourcedata|derivatives|stimuli)/"),
                                        re.compile(r"/\.")])
    return BIDSLayout(str(bids_dir), validate=False, derivatives=False, indexer=indexer)


def reference_roots(cfg: ParticipantConfig) -> list[Path]:
    """Folders searched for reference masks and disc labels, in priority order."""
    roots = []
    if cfg.reference_dir is not None:
        roots.append(Path(cfg.reference_dir))
    roots.append(Path(cfg.bids_dir) / "derivatives" / "labels")
    return roots


def _find_first(roots: list[Path], relative_dir: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for root in roots:
        for folder in (root / relative_dir, root):
            for suffix in suffixes:
                for ext in NIFTI_EXTENSIONS:
                    candidate = folder / f"{stem}{suffix}{ext}"
                    if candidate.is_file():
                        return candidate
    return None


def make_run(path: Path, roots: list[Path]) -> Run:
    """Build a :class:`Run` for one image file, discovering its reference files under ``roots``."""
    path = Path(path)
    entities, suffix = parse_bids_name(path.name)
    run_id = strip_extension(path.name)
    rel = Path(f"sub-{entities['sub']}") / (f"ses-{entities['ses']}" if "ses" in entities else "") / "anat"
    return Run(
        path=path, entities=entities, suffix=suffix, run_id=run_id,
        reference_mask=_find_first(roots, rel, run_id, REFERENCE_MASK_SUFFIXES),
        disc_labels=_find_first(roots, rel, run_id, DISC_LABEL_SUFFIXES),
    )


def find_runs(cfg: ParticipantConfig) -> list[Run]:
    """All runs selected by the configuration, sorted by ``run_id``.

    Raises :class:`InputMissingError` (66) when BIDS_DIR is not a dataset,
    :class:`NoMatchError` (18) for an unknown participant or session (with the available labels)
    or when the filters select nothing.
    """
    bids_dir = Path(cfg.bids_dir)
    check_dataset(bids_dir)
    layout = get_layout(bids_dir)
    subjects = sorted(layout.get_subjects())
    if not subjects:
        raise NoMatchError("no sub-* folders found in the BIDS dataset", path=bids_dir)
    unknown = [p for p in cfg.participant_labels if p not in subjects]
    if unknown:
        raise NoMatchError(
            f"participant(s) not found: {', '.join('sub-' + u for u in unknown)}; "
            f"available: {', '.join('sub-' + s for s in subjects)}", path=bids_dir)
    chosen = list(cfg.participant_labels) or subjects
    if cfg.session_labels:
        sessions = sorted(layout.get_sessions(subject=chosen))
        missing = [s for s in cfg.session_labels if s not in sessions]
        if missing:
            raise NoMatchError(
                f"session(s) not found: {', '.join('ses-' + m for m in missing)}; available for the "
                f"selected participants: {', '.join('ses-' + s for s in sessions) or 'none'}",
                path=bids_dir)

    files: set[str] = set()
    for contrast in cfg.contrasts:
        query: dict[str, Any] = {
            "subject": chosen, "datatype": "anat", "suffix": contrast,
            "extension": list(NIFTI_EXTENSIONS), "return_type": "filename",
        }
        if cfg.session_labels:
            query["session"] = list(cfg.session_labels)
        query.update(_to_pybids(_filters_for(contrast, cfg.bids_filters, cfg.contrasts)))
        try:
            files.update(layout.get(**query))
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--bids-filter-file: {exc}", path=cfg.bids_filter_file) from exc
    if not files:
        raise NoMatchError(
            f"no {'/'.join(cfg.contrasts)} images matched the selection "
            f"(participants: {', '.join(chosen)}"
            + (f"; sessions: {', '.join(cfg.session_labels)}" if cfg.session_labels else "")
            + (f"; filters: {json.dumps(cfg.bids_filters)}" if cfg.bids_filters else "") + ")",
            path=bids_dir)
    roots = reference_roots(cfg)
    runs = [make_run(Path(f), roots) for f in files]
    by_id: dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: (r.run_id, not r.path.name.endswith(".nii.gz"))):
        by_id.setdefault(run.run_id, run)   # .nii.gz preferred over a duplicate .nii
    return sorted(by_id.values(), key=lambda r: r.run_id)


def bids_uri(path: Path, bids_dir: Path, dataset: str = "raw") -> str:
    """``bids:<dataset>:<relative path>`` for a file inside ``bids_dir``, else an absolute path."""
    try:
        rel = Path(path).resolve().relative_to(Path(bids_dir).resolve())
    except ValueError:
        return str(Path(path).resolve())
    return f"bids:{dataset}:{rel.as_posix()}"


def _validator_executable() -> str | None:
    """Path of the ``bids-validator-deno`` CLI: next to this Python first, then on PATH."""
    local = Path(sys.executable).parent / "bids-validator-deno"
    if local.is_file():
        return str(local)
    return shutil.which("bids-validator-deno")


def validate_dataset(bids_dir: Path, timeout: float = 900.0) -> str:
    """Run ``bids-validator-deno`` on ``bids_dir`` (offline, warnings ignored).

    Returns the validator's report on success; raises :class:`BidsValidationError` (exit 16)
    with the report when the dataset is invalid, or when the validator cannot run.
    """
    exe = _validator_executable()
    if exe is None:
        raise BidsValidationError(
            "bids-validator-deno is not installed; install it (it is a conus dependency) "
            "or pass --skip_bids_validator")
    env = dict(os.environ, NO_COLOR="1")
    home = env.get("HOME")
    if not home or not os.access(home, os.W_OK):
        env.setdefault("DENO_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "conus-deno"))
    try:
        proc = subprocess.run([exe, "--ignoreWarnings", str(bids_dir)], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BidsValidationError(f"the BIDS validator could not run: {exc}") from exc
    report = _strip_ansi(proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise BidsValidationError(
            f"BIDS validation failed (pass --skip_bids_validator to bypass it):\n{report}", path=bids_dir)
    return report


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
