"""Tiny synthetic BIDS datasets built in code, and a test-only segmenter.

Nothing here ships with conus. Each image is a small volume (default 20x20x24 voxels) with a
bright tube (the "cord") along the axis that points head-foot in scanner space, on a dim noisy
background; its reference mask (the tube) is written to ``derivatives/labels`` in
spine-generic naming. Headers can be plain RAS, oblique, sagittal PSR, qform-only, or with
qfac -1, so that the pipeline is exercised beyond ``eye(4)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

CORD_VALUE = 1000.0
BACKGROUND = 100.0
HEADERS = ("plain", "oblique", "psr", "qform_only", "sform_only", "qfac_neg", "thick")


@dataclass(frozen=True)
class ImageSpec:
    """One image of a synthetic dataset (entities other than sub/ses go in ``entities``)."""

    sub: str
    ses: str | None = None
    suffix: str = "T2w"
    entities: dict[str, str] = field(default_factory=dict, hash=False)
    header: str = "plain"
    shape: tuple[int, int, int] = (20, 20, 24)
    cord: bool = True
    reference: bool = True
    discs: bool = False
    reference_style: str = "_label-SC_seg"
    seed: int = 0

    @property
    def stem(self) -> str:
        """BIDS file name stem, entities in the order given (sub, ses first)."""
        parts = [f"sub-{self.sub}"] + ([f"ses-{self.ses}"] if self.ses else [])
        parts += [f"{k}-{v}" for k, v in self.entities.items()]
        return "_".join(parts + [self.suffix])

    @property
    def anat(self) -> Path:
        """``sub-<l>/[ses-<s>/]anat`` relative folder."""
        rel = Path(f"sub-{self.sub}")
        return (rel / f"ses-{self.ses}" if self.ses else rel) / "anat"


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles (degrees) about x, then y, then z."""
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def header_affine(kind: str) -> tuple[np.ndarray, int]:
    """(affine, index of the voxel axis along the cord) for a header ``kind`` of :data:`HEADERS`.

    Kinds: ``plain`` RAS 1x1x1.5 mm (codes 1/1), ``oblique`` rotated 17 degrees (qform 2, sform 1),
    ``psr`` sagittal stored P-S-R (qfac -1), ``qform_only`` (2/0), ``sform_only`` (0/2),
    ``qfac_neg`` R-A-I (qfac -1), ``thick`` 0.5x0.5x7.5 mm axial.
    """
    if kind in ("plain", "qform_only", "sform_only", "qfac_neg"):
        linear, long_axis = np.diag([1.0, 1.0, 1.5]), 2
    elif kind == "oblique":
        linear, long_axis = rotation(17.0, 0.0, 0.0) @ np.diag([0.9, 0.9, 1.2]), 2
    elif kind == "psr":   # sagittal stored P-S-R: axis0 -> posterior, axis1 -> superior, axis2 -> right
        linear = np.array([[0.0, 0.0, 3.0], [-0.8, 0.0, 0.0], [0.0, 0.8, 0.0]])
        long_axis = 1
    elif kind == "thick":
        linear, long_axis = np.diag([0.5, 0.5, 7.5]), 2
    else:
        raise ValueError(f"unknown header kind {kind!r}")
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [-10.0, 12.0, -30.0]
    if kind == "qfac_neg":
        affine[:3, 2] *= -1.0
    return affine, long_axis


def make_nifti(data: np.ndarray, kind: str = "plain", dtype=np.int16) -> nib.Nifti1Image:
    """A NIfTI image with the header of ``kind`` (qform/sform codes vary with the kind)."""
    affine, _ = header_affine(kind)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    if kind == "qform_only":
        img.header.set_qform(affine, code=2)
        img.header.set_sform(affine, code=0)
    elif kind == "sform_only":
        img.header.set_qform(affine, code=0)
        img.header.set_sform(affine, code=2)
    elif kind == "oblique":
        img.header.set_qform(affine, code=2)
        img.header.set_sform(affine, code=1)
    else:
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
    return img


def tube_volume(shape, long_axis: int, radius: float = 3.0, cord: bool = True, seed: int = 0):
    """(image, mask): a bright straight tube along ``long_axis`` on a noisy dim background."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    across = [a for a in range(3) if a != long_axis]
    centre = [(shape[a] - 1) / 2.0 for a in across]
    dist2 = sum((grids[a] - c) ** 2 for a, c in zip(across, centre, strict=True))
    mask = (dist2 <= radius**2).astype(np.uint8) if cord else np.zeros(shape, np.uint8)
    image = BACKGROUND + 10.0 * rng.standard_normal(shape) + (CORD_VALUE - BACKGROUND) * mask
    return image, mask


def write_dataset_description(root: Path, name: str = "conus test dataset", dataset_type: str = "raw") -> None:
    """A minimal valid ``dataset_description.json``."""
    desc = {"Name": name, "BIDSVersion": "1.9.0", "DatasetType": dataset_type, "Authors": ["conus tests"]}
    if dataset_type == "derivative":
        desc["GeneratedBy"] = [{"Name": "manual"}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(desc, indent=2) + "\n")


def write_image(root: Path, spec: ImageSpec) -> Path:
    """Write one image of ``spec`` (and its reference files) into the dataset at ``root``."""
    _, long_axis = header_affine(spec.header)
    image, mask = tube_volume(spec.shape, long_axis, cord=spec.cord, seed=spec.seed)
    path = root / spec.anat / f"{spec.stem}.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(make_nifti(image, spec.header), path)
    labels = root / "derivatives" / "labels" / spec.anat
    if spec.reference:
        labels.mkdir(parents=True, exist_ok=True)
        nib.save(make_nifti(mask, spec.header, np.uint8), labels / f"{spec.stem}{spec.reference_style}.nii.gz")
    if spec.discs:
        discs = np.zeros(spec.shape, np.uint8)
        centre = [s // 2 for s in spec.shape]
        for value, frac in ((3, 0.75), (5, 0.35)):
            point = list(centre)
            point[long_axis] = int(frac * spec.shape[long_axis])
            discs[tuple(point)] = value
        labels.mkdir(parents=True, exist_ok=True)
        nib.save(make_nifti(discs, spec.header, np.uint8), labels / f"{spec.stem}_label-discs_dlabel.nii.gz")
    return path


def build_dataset(root: Path, specs: list[ImageSpec]) -> Path:
    """A valid BIDS dataset at ``root`` with the given images, participants.tsv and README."""
    root = Path(root)
    write_dataset_description(root)
    (root / "README").write_text("Synthetic tubes for conus tests: a bright cord on a dim background.\n" * 3)
    subjects = sorted({s.sub for s in specs})
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    write_dataset_description(root / "derivatives" / "labels", "reference labels", "derivative")
    for spec in specs:
        write_image(root, spec)
    return root


def simple_dataset(root: Path, subjects=("01", "02"), **spec_options) -> Path:
    """One T2w image per subject (same options for each)."""
    return build_dataset(root, [ImageSpec(sub=s, seed=i, **spec_options) for i, s in enumerate(subjects)])


# --------------------------------------------------------------------------------------------
# test-only segmenter (same interface as bids_app.inference.segment_image)


@dataclass(frozen=True)
class ThresholdCenterline:
    """Duck-typed centerline: ``points_mm`` (N, 3) ordered along the tube."""

    points_mm: np.ndarray | None


@dataclass(frozen=True)
class ThresholdResult:
    """Duck-typed SegmentationResult."""

    mask: np.ndarray
    cord_found: bool
    centerline: ThresholdCenterline | None
    conus_tip_mm: np.ndarray | None
    seconds: dict
    warnings: list
    model_info: dict


THRESHOLD_MODEL = {"name": "test-threshold", "sha256": "0" * 64}


def threshold_segmenter(loaded, options, reference=None) -> ThresholdResult:
    """Segment the bright tube by thresholding halfway between background and cord.

    The centerline is the mask's centroid per slice along its longest axis, in scanner mm.
    """
    data = loaded.data
    mask = (data > (CORD_VALUE + BACKGROUND) / 2.0).astype(np.uint8)
    found = bool(mask.any())
    centerline, tip = None, None
    if found:
        idx = np.argwhere(mask)
        axis = int(np.argmax(idx.max(axis=0) - idx.min(axis=0)))
        points = []
        for k in np.unique(idx[:, axis]):
            points.append(idx[idx[:, axis] == k].mean(axis=0))
        vox = np.array(points)
        mm = vox @ loaded.affine[:3, :3].T + loaded.affine[:3, 3]
        if mm[0, 2] > mm[-1, 2]:
            mm = mm[::-1]
        centerline, tip = ThresholdCenterline(mm), mm[0]
    return ThresholdResult(mask, found, centerline, tip, {"segment": 0.0}, [], dict(THRESHOLD_MODEL))


threshold_segmenter.model_info = THRESHOLD_MODEL


def failing_segmenter(loaded, options, reference=None):
    """A segmenter that raises, for error-record tests."""
    raise RuntimeError(f"test failure on {loaded.path.name}")


failing_segmenter.model_info = THRESHOLD_MODEL
