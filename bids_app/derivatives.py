"""The derivatives folder: output names, dataset_description.json, .bidsignore, provenance.

Names follow the spinal cord community's spine-generic convention rather than the BIDS
``_mask`` suffix, so that conus outputs can be used directly as labels by SCT and by
``conus finetune``. For a run ``sub-01_ses-a_acq-sag_T2w.nii.gz`` (stem ``S``) the outputs live in
``OUTPUT_DIR/sub-01/ses-a/anat/``:

=============================  =====================================================
``S_label-SC_seg.nii.gz``      cord mask (uint8 0/1, header of the source image)
``S_label-SC_seg.json``        sidecar: Sources, model, parameters, seconds, CordFound,
                               provenance (written last: it marks the run complete)
``S_label-centerline_seg``     centerline mask (``.nii.gz``) and ``S_desc-centerline.tsv``
``S_desc-metrics.json``        Dice report (when a reference mask exists)
``S_desc-slicemetrics.tsv``    per-slice metrics; ``S_desc-morphometry.tsv`` morphometry
``S_desc-qc.png``              QC picture
``S_label-discs_dlabel``       disc labels (``.nii.gz``), ``S_desc-discs.tsv``, ``S_desc-levels.tsv``
``S_label-SC_dseg``            region split (``.nii.gz`` + ``.tsv``)
=============================  =====================================================

A failing run writes ``OUTPUT_DIR/sub-01/log/S_error.json``.

Every file is written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bids_app import __version__
from bids_app.bids_io import Run
from bids_app.errors import CannotCreateOutputError, UsageError
from bids_app.image_io import atomic_write_text

PIPELINE_NAME = "conus"
CONTAINER_ENV = "CONUS_CONTAINER_IMAGE"
SIDECAR_SCHEMA = 1

BIDSIGNORE_LINES = (
    # patterns as bids-validator-deno 3 matches them (checked: it ignores "*_desc-*" but not
    # "*_desc-*.tsv", and "**/log" but not "*/log/")
    "*_label-SC_seg.*",
    "*_label-SC_dseg.*",
    "*_label-centerline_seg.*",
    "*_label-discs_dlabel.*",
    "*_desc-*",
    "**/log",
    "group",
    "compare",
)


@dataclass(frozen=True)
class OutputPaths:
    """Every path conus may write for one run (nothing is created by building this)."""

    anat_dir: Path
    mask: Path
    sidecar: Path
    centerline_mask: Path
    centerline_tsv: Path
    metrics_json: Path
    slice_metrics_tsv: Path
    morphometry_tsv: Path
    morphometry_levels_tsv: Path
    qc_png: Path
    discs: Path
    discs_tsv: Path
    levels_tsv: Path
    dseg: Path
    dseg_tsv: Path
    error_record: Path

    def products(self) -> list[Path]:
        """All per-run output files except the sidecar and the error record."""
        skip = {"anat_dir", "sidecar", "error_record"}
        return [getattr(self, f.name) for f in fields(self) if f.name not in skip]


def output_paths(output_dir: Path, run: Run) -> OutputPaths:
    """The output paths of ``run`` under ``output_dir`` (spine-generic names, see module doc)."""
    anat = Path(output_dir) / run.relative_dir
    stem = run.run_id

    def name(tail: str) -> Path:
        return anat / f"{stem}{tail}"

    return OutputPaths(
        anat_dir=anat,
        mask=name("_label-SC_seg.nii.gz"),
        sidecar=name("_label-SC_seg.json"),
        centerline_mask=name("_label-centerline_seg.nii.gz"),
        centerline_tsv=name("_desc-centerline.tsv"),
        metrics_json=name("_desc-metrics.json"),
        slice_metrics_tsv=name("_desc-slicemetrics.tsv"),
        morphometry_tsv=name("_desc-morphometry.tsv"),
        morphometry_levels_tsv=name("_desc-morphometrylevels.tsv"),
        qc_png=name("_desc-qc.png"),
        discs=name("_label-discs_dlabel.nii.gz"),
        discs_tsv=name("_desc-discs.tsv"),
        levels_tsv=name("_desc-levels.tsv"),
        dseg=name("_label-SC_dseg.nii.gz"),
        dseg_tsv=name("_label-SC_dseg.tsv"),
        error_record=Path(output_dir) / f"sub-{run.subject}" / "log" / f"{stem}_error.json",
    )


def check_output_dir(bids_dir: Path, output_dir: Path) -> None:
    """Refuse an OUTPUT_DIR equal to BIDS_DIR or inside its raw data (UsageError, exit 64).

    Anything under ``BIDS_DIR/derivatives/<name>`` is fine; ``BIDS_DIR/derivatives/conus`` is
    the suggested location. Symbolic links are resolved before comparing.
    """
    bids = Path(bids_dir).resolve()
    out = Path(output_dir).resolve()
    suggestion = bids / "derivatives" / PIPELINE_NAME
    if out == bids:
        raise UsageError(f"OUTPUT_DIR must not be BIDS_DIR; use for example {suggestion}", path=output_dir)
    if out.is_relative_to(bids):
        rel = out.relative_to(bids).parts
        if len(rel) < 2 or rel[0] != "derivatives":
            raise UsageError(
                f"OUTPUT_DIR is inside the raw data of BIDS_DIR; nothing may be written there. "
                f"Use a folder under {bids / 'derivatives'}, for example {suggestion}", path=output_dir)


def prepare_output_dir(output_dir: Path) -> None:
    """Create OUTPUT_DIR and check it is writable; CannotCreateOutputError (exit 73) otherwise."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".conus-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CannotCreateOutputError(f"cannot create or write OUTPUT_DIR ({exc.strerror or exc})",
                                      path=output_dir) from exc


def dataset_description(bids_dir: Path) -> dict[str, Any]:
    """The derivative ``dataset_description.json`` content (deterministic for a given setup)."""
    generated: dict[str, Any] = {"Name": PIPELINE_NAME, "Version": __version__}
    image = os.environ.get(CONTAINER_ENV)
    if image:
        generated["Container"] = {"Type": "docker", "Tag": image}
    bids = Path(bids_dir).resolve()
    source: dict[str, Any] = {"URL": bids.as_uri()}
    try:
        raw = json.loads((bids / "dataset_description.json").read_text(encoding="utf-8"))
        if isinstance(raw, dict) and raw.get("DatasetDOI"):
            source["DOI"] = raw["DatasetDOI"]
    except (OSError, ValueError):
        pass
    return {
        "Name": "conus spinal cord segmentation",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": bids.as_uri()},
    }


def _write_if_changed(path: Path, text: str) -> bool:
    """Atomically write ``text`` unless the file already holds exactly it. Returns True if written.

    Safe with concurrent writers: each one replaces the file atomically with the same content,
    so a reader sees either the old complete file or the new complete file.
    """
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)
    return True


def write_dataset_files(output_dir: Path, bids_dir: Path) -> None:
    """Write ``dataset_description.json`` and ``.bidsignore`` into OUTPUT_DIR (idempotent).

    Refuses (UsageError, exit 64) an OUTPUT_DIR that already holds another pipeline's dataset,
    such as ``derivatives/labels``: conus never writes into someone else's derivatives.
    """
    out = Path(output_dir)
    desc_path = out / "dataset_description.json"
    if desc_path.exists():
        try:
            existing = json.loads(desc_path.read_text(encoding="utf-8"))
            names = [g.get("Name") for g in existing.get("GeneratedBy", []) if isinstance(g, dict)]
        except (OSError, ValueError, AttributeError):
            names = []
        if PIPELINE_NAME not in names:
            raise UsageError("OUTPUT_DIR already holds a dataset not generated by conus; "
                             "choose another OUTPUT_DIR", path=desc_path)
    _write_if_changed(desc_path, json.dumps(dataset_description(bids_dir), indent=2) + "\n")
    _write_if_changed(out / ".bidsignore", "\n".join(BIDSIGNORE_LINES) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build_provenance(run: Run, parameters: dict[str, Any], model_sha256: str | None,
                     centerline_file: Path | None = None) -> dict[str, Any]:
    """What a run's outputs depend on: inputs (sha256), model (sha256), parameters, version."""
    return {
        "InputSHA256": sha256_file(run.path),
        "ReferenceSHA256": None if run.reference_mask is None else sha256_file(run.reference_mask),
        "DiscLabelsSHA256": None if run.disc_labels is None else sha256_file(run.disc_labels),
        "CenterlineFileSHA256": None if centerline_file is None else sha256_file(centerline_file),
        "ModelSHA256": model_sha256,
        "Parameters": parameters,
        "ConusVersion": __version__,
    }


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(paths: OutputPaths, provenance: dict[str, Any]) -> bool:
    """True when the run's sidecar exists, its provenance equals ``provenance`` (compared as
    JSON) and every output the sidecar lists exists. The sidecar is written last, so its
    presence means the run finished."""
    sidecar = read_json(paths.sidecar)
    if sidecar is None:
        return False
    stored = sidecar.get("Provenance")
    if _as_json(stored) != _as_json(provenance):
        return False
    outputs = sidecar.get("Outputs")
    if not isinstance(outputs, list) or not outputs:
        return False
    return all((paths.anat_dir / name).is_file() for name in outputs)


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Atomically write a JSON object (indented, keys in insertion order)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")
    return Path(path)


def write_tsv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    """Atomically write a tab-separated table (``n/a`` for None, floats with 6 significant digits)."""

    def fmt(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value)

    lines = ["\t".join(header)] + ["\t".join(fmt(v) for v in row) for row in rows]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)


def write_error_record(paths: OutputPaths, run: Run, error: BaseException, exit_code: int,
                       trace: str) -> Path:
    """Write ``sub-<l>/log/<run_id>_error.json`` for a failed run."""
    record = {
        "RunID": run.run_id,
        "Input": str(run.path),
        "ErrorType": type(error).__name__,
        "Message": str(error),
        "ExitCode": exit_code,
        "Traceback": trace,
        "ConusVersion": __version__,
        "Time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_json(paths.error_record, record)


def remove_stale(paths: list[Path]) -> None:
    """Delete files that a previous, different computation left behind (missing ones ignored)."""
    for path in paths:
        try:
            Path(path).unlink()
        except FileNotFoundError:
            pass


def _json_default(value: Any) -> Any:
    """JSON encoder for numpy scalars/arrays and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
