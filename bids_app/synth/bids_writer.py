"""Write synthetic samples as a BIDS dataset with spine-generic reference labels.

Layout (``conus synth OUT_DIR --n N --seed S``)::

    OUT_DIR/dataset_description.json, participants.tsv, participants.json, README
    OUT_DIR/sub-001/anat/sub-001_T2w.nii.gz (+ .json)
    OUT_DIR/derivatives/labels/dataset_description.json
    OUT_DIR/derivatives/labels/sub-001/anat/sub-001_T2w_label-SC_seg.nii.gz
    OUT_DIR/derivatives/labels/sub-001/anat/sub-001_T2w_label-discs_dlabel.nii.gz
    OUT_DIR/derivatives/labels/sub-001/anat/sub-001_T2w_label-SC_seg.json  (synthetic truth: conus tip...)

Each image is stored with a random voxel-axis order and flips (random orientation codes,
e.g. PSR or LAS), the labels on the same grid with the same header.  Disc labels are
single voxels (SCT values, 60 = conus).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bids_app.errors import CannotCreateOutputError, UsageError
from bids_app.synth.generator import REGIONS, SOURCES, SynthSample, generate_sample
from bids_app.synth.intensity import CONTRASTS
from bids_app.synth.labels import disc_name

SUFFIX = {"T2w": "T2w", "T1w": "T1w", "T2starw": "T2starw", "random": "T2w"}
_TIMING = {  # (RepetitionTime s, EchoTime s) typical of each suffix
    "T2w": (2.0, 0.12), "T1w": (0.6, 0.01), "T2starw": (0.55, 0.015),
}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def random_orientation(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random voxel-axis permutation and flips: ``(perm, flips)`` (RAS axis per voxel axis)."""
    return rng.permutation(3), rng.random(3) < 0.5


def reorient_sample(data: np.ndarray, affine: np.ndarray, perm, flips) -> tuple[np.ndarray, np.ndarray]:
    """Store RAS-ordered ``data`` with voxel axis ``i`` = RAS axis ``perm[i]``, flipped where
    ``flips[i]``; returns (new data, new affine) describing the same scanner positions."""
    out = np.transpose(data, perm)
    new = np.zeros((4, 4))
    new[3, 3] = 1.0
    origin = affine[:3, 3].copy()
    for i, (p, f) in enumerate(zip(perm, flips, strict=True)):
        col = affine[:3, p]
        if f:
            out = np.flip(out, axis=i)
            origin = origin + col * (data.shape[p] - 1)
            col = -col
        new[:3, i] = col
    new[:3, 3] = origin
    return np.ascontiguousarray(out), new


def _nifti(data: np.ndarray, affine: np.ndarray, dtype, code: int):
    import nibabel as nib

    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    img.header.set_xyzt_units("mm", "sec")
    return img


def _save(img, path: Path) -> None:
    import nibabel as nib

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def _disc_volume(sample: SynthSample) -> np.ndarray:
    """Single-voxel disc labels (SCT values) on the sample's grid."""
    out = np.zeros(sample.image.shape, np.uint8)
    inv = np.linalg.inv(sample.affine)
    for value, xyz in sample.discs:
        v = np.round(inv[:3, :3] @ xyz + inv[:3, 3]).astype(int)
        if np.all(v >= 0) and np.all(v < np.array(out.shape)):
            out[tuple(v)] = value
    return out


def _choices(value, known, what: str) -> list[str] | None:
    """None, one name or a list of names (drawn from per subject), each checked against ``known``."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    for name in names:
        if name not in known:
            raise UsageError(f"unknown {what} {name!r}; choose from {', '.join(known)}")
    return names or None


def write_synthetic_bids(out_dir, n: int, seed: int, pam50_dir=None, region=None,
                         contrast=None, *, source: str = "pam50",
                         strength: float = 1.0) -> list[Path]:
    """Write ``n`` synthetic subjects to the BIDS folder ``out_dir``; returns the image paths.

    With ``source="pam50"`` PAM50 label maps are used when ``pam50_dir`` is given (or
    ``$SCT_DIR`` has them), the procedural phantom otherwise; ``source="phantom"`` always uses
    the phantom.  ``strength`` scales the deformation/size ranges (1 = training ranges, > 1
    reaches outside them).  Subject ``i`` uses the seed ``seed * 100003 + i``. ``region`` and
    ``contrast`` are one name or a list of names drawn from per subject (None: the engine's mix;
    contrast: T2w, T1w or T2starw).
    """
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    regions = _choices(region, REGIONS, "region")
    contrasts = _choices(contrast, CONTRASTS, "contrast")
    root = Path(out_dir)
    labels_root = root / "derivatives" / "labels"
    try:
        labels_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotCreateOutputError(f"cannot create the output folder: {exc}", path=root) from exc
    from bids_app import __version__

    _write_json(root / "dataset_description.json", {
        "Name": "conus synthetic spine MRI", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": "conus synth", "Version": __version__}],
        "License": "CC0", "Authors": ["conus synthetic engine"],
    })
    _write_json(labels_root / "dataset_description.json", {
        "Name": "conus synthetic spine MRI: reference labels", "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "conus synth", "Version": __version__,
                         "Description": "exact synthetic truth (cord mask and disc labels)"}],
    })
    _atomic_write(root / "README", (
        b"Synthetic spine MRI written by `conus synth` (SynthSeg-style images rendered from "
        b"PAM50 label maps or a procedural phantom). Reference labels follow spine-generic naming "
        b"in derivatives/labels: _label-SC_seg (cord) and _label-discs_dlabel (SCT disc values).\n"))
    _write_json(root / "participants.json", {
        "participant_id": {"Description": "synthetic subject"},
        "seed": {"Description": "generator seed"},
        "region": {"Description": "field of view"},
        "contrast": {"Description": "intensity preset"},
        "source": {"Description": "label-map source: pam50 or phantom"},
    })
    rows = ["participant_id\tseed\tregion\tcontrast\tsource"]
    paths = []
    width = max(3, len(str(n)))
    for i in range(n):
        sub = f"sub-{i + 1:0{width}d}"
        sseed = int(seed) * 100003 + i
        pick = np.random.default_rng(sseed + 2)
        ci = str(pick.choice(contrasts if contrasts else ["T2w", "T1w", "T2starw"]))
        ri = None if regions is None else str(regions[int(pick.integers(len(regions)))])
        sample = generate_sample(sseed, source=source, pam50_dir=pam50_dir, region=ri, contrast=ci,
                                 strength=strength)
        suffix = SUFFIX[sample.contrast]
        rng = np.random.default_rng(sseed + 1)
        perm, flips = random_orientation(rng)
        code = int(rng.choice([1, 2]))
        img, aff = reorient_sample(sample.image, sample.affine, perm, flips)
        cord, _ = reorient_sample(sample.cord, sample.affine, perm, flips)
        discs, _ = reorient_sample(_disc_volume(sample), sample.affine, perm, flips)
        anat = root / sub / "anat"
        lab = labels_root / sub / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        lab.mkdir(parents=True, exist_ok=True)
        scale = 1000.0
        image_path = anat / f"{sub}_{suffix}.nii.gz"
        _save(_nifti(np.round(img * scale), aff, np.int16, code), image_path)
        tr, te = _TIMING[suffix]
        _write_json(anat / f"{sub}_{suffix}.json", {
            "RepetitionTime": tr, "EchoTime": te, "MagneticFieldStrength": 3,
            "Manufacturer": "conus synthetic", "AcquisitionType": sample.meta["acquisition"],
            "SliceThickness": float(max(sample.meta["voxel"])) if sample.meta["acquisition"] != "iso" else float(sample.meta["voxel"][0]),
        })
        _save(_nifti(cord, aff, np.uint8, code), lab / f"{sub}_{suffix}_label-SC_seg.nii.gz")
        _save(_nifti(discs, aff, np.uint8, code), lab / f"{sub}_{suffix}_label-discs_dlabel.nii.gz")
        _write_json(lab / f"{sub}_{suffix}_label-SC_seg.json", {
            "Sources": [f"bids::{sub}/anat/{image_path.name}"],
            "SpatialReference": f"bids::{sub}/anat/{image_path.name}",
            "Description": "synthetic truth",
            "Region": sample.region, "Contrast": sample.contrast, "Seed": sseed, "Strength": float(strength),
            "ConusTipMm": None if sample.conus_tip_mm is None else [round(float(v), 3) for v in sample.conus_tip_mm],
            "Discs": {disc_name(v): [round(float(c), 3) for c in xyz] for v, xyz in sample.discs},
        })
        _write_json(lab / f"{sub}_{suffix}_label-discs_dlabel.json", {
            "Sources": [f"bids::{sub}/anat/{image_path.name}"],
            "Description": "single-voxel disc labels, SCT values (n = disc above vertebra n; 60 = conus)",
        })
        rows.append(f"{sub}\t{sseed}\t{sample.region}\t{sample.contrast}\t{sample.meta['source']}")
        paths.append(image_path)
    _atomic_write(root / "participants.tsv", ("\n".join(rows) + "\n").encode())
    return paths


def main_synth(args) -> int:
    """Entry point of ``conus synth OUT_DIR --n N --seed S [--pam50 DIR] [--region R] [--contrast C]``.

    ``args`` is the namespace of ``cli.get_tools_parser()`` (``output_dir``, ``n``, ``seed``,
    ``pam50``, ``source``, ``strength``, ``region`` and ``contrast`` lists). Returns 0; errors are
    raised as ``bids_app.errors`` exceptions.
    """
    from bids_app.training.train import default_pam50

    pam50 = default_pam50(getattr(args, "pam50", None))
    source = args.source or "pam50"
    contrast = [c for c in (args.contrast or []) if c != "random"] or None
    paths = write_synthetic_bids(args.output_dir, n=int(args.n), seed=int(args.seed), pam50_dir=pam50,
                                 region=args.region, contrast=contrast, source=source,
                                 strength=float(args.strength))
    print(f"wrote {len(paths)} synthetic subjects to {args.output_dir}")
    return 0
