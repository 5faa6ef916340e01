"""Load and validate NIfTI images, write masks with the source's exact header, write files atomically.

Rules implemented here (see docs/ARCHITECTURE.md):

* The affine is nibabel's: the sform when ``sform_code > 0``, otherwise the qform when
  ``qform_code > 0``, otherwise nibabel's fallback (pixdim scaling, with a warning).
  When both codes are set and the two matrices disagree, the sform is used, with a warning.
* A 4-D file with a single volume is squeezed to 3-D; several volumes, fewer than 3 dimensions,
  an empty dimension, non-positive or non-finite zooms and a non-invertible affine are refused
  with :class:`~bids_app.errors.BadDataError` naming the file.
* Non-finite voxels: fewer than 50 % are set to 0 (with a warning), more is an error.
* :func:`save_like` copies the source header untouched (srow, quatern, qoffset, pixdim with qfac,
  qform/sform codes) and only changes the data type and shape bookkeeping.
* Every write goes through a temporary file in the destination folder and :func:`os.replace`,
  so a killed or failed write never leaves a partial file under the final name.
"""

from __future__ import annotations

import gzip
import os
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_app.errors import BadDataError, CannotCreateOutputError, ConusIOError, InputMissingError

#: Largest share of non-finite voxels that is repaired (set to 0) instead of refused.
MAX_NONFINITE_FRACTION = 0.5
#: Tolerance (mm) when comparing two affines (qform vs sform, mask grid vs image grid).
AFFINE_ATOL_MM = 1e-3


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A validated 3-D image.

    ``img`` is the image object as nibabel loaded it (header untouched), except for masks that
    :func:`load_mask` resampled to another grid, where it is a new image on that grid.
    ``data`` is float32 for images and uint8 0/1 for masks. ``affine`` is the matrix nibabel
    uses (sform if sform_code > 0 else qform, else the fallback). ``zooms`` are the header's
    voxel sizes of the three spatial axes in native order.
    """

    path: Path
    img: nib.Nifti1Image
    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]
    warnings: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of ``data``."""
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# loading


def _open_nifti(path: Path) -> nib.Nifti1Image:
    """nibabel.load with our errors: missing file -> InputMissingError, anything else -> BadDataError."""
    if not path.exists():
        raise InputMissingError("file not found", path=path)
    if path.is_dir():
        raise BadDataError("is a directory, not a NIfTI file", path=path)
    try:
        img = nib.load(str(path))
    except FileNotFoundError as exc:
        raise InputMissingError(f"cannot open: {exc}", path=path) from exc
    except Exception as exc:  # nibabel raises many types for a broken file
        raise BadDataError(f"not a readable NIfTI file ({type(exc).__name__}: {exc})", path=path) from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise BadDataError(f"not a NIfTI image (nibabel read it as {type(img).__name__})", path=path)
    return img


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """The 3-D shape after squeezing trailing singleton dimensions; refuse anything else."""
    if len(shape) < 3:
        raise BadDataError(f"image has {len(shape)} dimension(s) {shape}; a 3-D image is required", path=path)
    if any(n == 0 for n in shape):
        raise BadDataError(f"image has an empty dimension: shape {shape}", path=path)
    extra = shape[3:]
    if any(n != 1 for n in extra):
        raise BadDataError(
            f"image is {len(shape)}-D with shape {shape}; only one volume is supported "
            "(split the series or pick one volume)",
            path=path,
        )
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _read_data(img: nib.Nifti1Image, path: Path, shape3: tuple[int, int, int]) -> np.ndarray:
    """Read the voxel data as float32 3-D; a truncated or corrupt file raises BadDataError."""
    try:
        raw = np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, MemoryError) as exc:
        raise BadDataError(f"cannot read voxel data (truncated or corrupt file?): {exc}", path=path) from exc
    if raw.dtype.kind not in "biuf":
        raise BadDataError(f"unsupported voxel data type {raw.dtype}", path=path)
    return np.asarray(raw, dtype=np.float32).reshape(shape3)


def _raw_zooms(img: nib.Nifti1Image, path: Path) -> tuple[float, ...]:
    """pixdim[1:4] as stored on disk: nibabel's load silently "fixes" zero or negative voxel sizes."""
    try:
        with nib.openers.ImageOpener(str(path)) as fobj:
            raw = type(img.header).from_fileobj(fobj, check=False)
    except Exception as exc:
        raise BadDataError(f"cannot re-read the header: {exc}", path=path) from exc
    return tuple(float(z) for z in raw["pixdim"][1:4])


def _check_zooms(img: nib.Nifti1Image, path: Path) -> tuple[float, float, float]:
    zooms = _raw_zooms(img, path)
    if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        raise BadDataError(f"voxel sizes must be positive and finite, got {zooms}", path=path)
    return zooms  # type: ignore[return-value]


def _choose_affine(header: nib.Nifti1Header, path: Path) -> tuple[np.ndarray, list[str]]:
    """nibabel's rule (sform if code > 0, else qform if code > 0, else fallback) plus warnings."""
    warnings: list[str] = []
    s_code = int(header["sform_code"])
    q_code = int(header["qform_code"])
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    if s_code <= 0 and q_code <= 0:
        warnings.append(
            "qform_code and sform_code are both 0: no scanner coordinates in the header; "
            "using nibabel's fallback affine from the voxel sizes"
        )
    elif s_code > 0 and q_code > 0:
        qform = header.get_qform()
        if not np.allclose(qform, affine, atol=AFFINE_ATOL_MM, rtol=0):
            diff = float(np.max(np.abs(qform - affine)))
            warnings.append(
                f"qform and sform disagree (max difference {diff:.3g}); using the sform "
                f"(sform_code={s_code}) as nibabel does"
            )
    if not np.all(np.isfinite(affine)):
        raise BadDataError("affine contains non-finite values", path=path)
    linear = affine[:3, :3]
    sizes = np.sqrt((linear**2).sum(axis=0))
    if np.any(sizes <= 0) or abs(np.linalg.det(linear)) <= 1e-8 * float(np.prod(sizes)):
        raise BadDataError(f"affine is not invertible:\n{affine}", path=path)
    return affine, warnings


def _repair_nonfinite(data: np.ndarray, path: Path) -> tuple[np.ndarray, list[str]]:
    """Set non-finite voxels to 0 when they are fewer than 50 %, else refuse the image."""
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return data, []
    fraction = n_bad / data.size
    if fraction >= MAX_NONFINITE_FRACTION:
        raise BadDataError(f"{100 * fraction:.1f} % of the voxels are NaN or infinite", path=path)
    data = data.copy()
    data[bad] = 0.0
    return data, [f"{100 * fraction:.2g} % non-finite voxels ({n_bad}) set to 0"]


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Load and validate a NIfTI image; data is float32, 3-D, on the native voxel grid.

    Raises :class:`InputMissingError` if the file does not exist and :class:`BadDataError`
    for any file that cannot be used (see the module docstring for the rules).
    """
    path = Path(path)
    img = _open_nifti(path)
    shape3 = _spatial_shape(tuple(int(n) for n in img.shape), path)
    zooms = _check_zooms(img, path)
    affine, warnings = _choose_affine(img.header, path)
    data = _read_data(img, path, shape3)
    data, more = _repair_nonfinite(data, path)
    warnings.extend(more)
    return LoadedImage(path=path, img=img, data=data, affine=affine, zooms=zooms, warnings=tuple(warnings))


def same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = AFFINE_ATOL_MM) -> bool:
    """True when two voxel grids have the same shape and (within ``atol`` mm) the same affine."""
    return tuple(shape_a) == tuple(shape_b) and bool(
        np.allclose(np.asarray(affine_a), np.asarray(affine_b), atol=atol, rtol=0)
    )


def load_mask(path: str | os.PathLike, like: LoadedImage | None = None) -> LoadedImage:
    """Load a mask binarised at 0.5 (uint8 0/1).

    When ``like`` is given and the mask's grid differs from it, the mask is resampled onto
    ``like``'s grid with nearest neighbour (voxels outside the mask's field of view become 0),
    a warning says so, and ``img``/``affine``/``zooms`` then describe ``like``'s grid.
    """
    from bids_app.geometry import resample_to_grid  # local import: geometry imports nothing from here

    loaded = load_image(path)
    mask = (loaded.data > 0.5).astype(np.uint8)
    if like is None or same_grid(mask.shape, loaded.affine, like.data.shape, like.affine):
        return LoadedImage(loaded.path, loaded.img, mask, loaded.affine, loaded.zooms, loaded.warnings)
    resampled = resample_to_grid(
        mask.astype(np.float32), loaded.affine, like.data.shape, like.affine, order=0, cval=0.0
    )
    mask = (resampled > 0.5).astype(np.uint8)
    header = like.img.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(mask, like.affine, header)
    note = (
        f"mask grid {loaded.data.shape} differs from the image grid {like.data.shape}; "
        f"resampled the mask to the image grid with nearest neighbour (source: {loaded.path.name})"
    )
    return LoadedImage(loaded.path, img, mask, like.affine.copy(), like.zooms, loaded.warnings + (note,))


# --------------------------------------------------------------------------------------------
# writing


def _tmp_name(path: Path) -> Path:
    """A unique hidden temporary name next to ``path`` (same folder, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, os.replace).

    The parent folder is created if needed. A failed or killed write leaves ``path`` either
    absent or with its previous content. File mode follows the umask (like ``open``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotCreateOutputError(f"cannot create folder: {exc}", path=path.parent) from exc
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except PermissionError as exc:
        raise CannotCreateOutputError(f"cannot write: {exc}", path=path) from exc
    except OSError as exc:
        raise ConusIOError(f"cannot write: {exc}", path=path) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ConusIOError(f"write failed: {exc}", path=path) from exc
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _source_spatial_shape(source: nib.Nifti1Image) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in source.shape)
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise BadDataError(f"source image shape {shape} is not 3-D (or 4-D with one volume)")
    return shape[:3]  # type: ignore[return-value]


def _as_dtype(data: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    """Cast to ``dtype``; integer outputs must hold integral values in range (no silent truncation)."""
    arr = np.asarray(data)
    if arr.dtype == np.bool_:
        return arr.astype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        as_float = arr.astype(np.float64)
        if arr.size and (
            not np.all(np.isfinite(as_float))
            or as_float.min() < info.min
            or as_float.max() > info.max
            or np.any(as_float != np.round(as_float))
        ):
            raise BadDataError(
                f"data (range {as_float.min():.3g}..{as_float.max():.3g}) does not fit {np.dtype(dtype).name} "
                "exactly; binarise or round it first",
                path=path,
            )
    return arr.astype(dtype)


def save_like(
    data: np.ndarray, source: nib.Nifti1Image | LoadedImage, path: str | os.PathLike, dtype=np.uint8
) -> Path:
    """Write ``data`` on ``source``'s native grid with ``source``'s exact header; atomic write.

    The header is a copy of the source's: srow_x/y/z, quatern_b/c/d, qoffset_x/y/z, pixdim
    (qfac included), qform_code and sform_code are identical; only the data type, the 3-D
    dimensions and the scaling (none) change. ``data`` must have the source's spatial shape
    (a 4-D source with one volume counts as 3-D). ``.nii`` and ``.nii.gz`` are supported; the
    gzip stream has no timestamp so identical inputs give identical files.
    """
    path = Path(path)
    img = source.img if isinstance(source, LoadedImage) else source
    shape3 = _source_spatial_shape(img)
    if tuple(np.shape(data)) != shape3:
        raise BadDataError(
            f"data shape {np.shape(data)} differs from the source's spatial shape {shape3}", path=path
        )
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise CannotCreateOutputError("output name must end in .nii or .nii.gz", path=path)
    out = _as_dtype(data, np.dtype(dtype), path)
    header = img.header.copy()
    header.set_data_shape(shape3)
    header.set_data_dtype(out.dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = 0
    header["cal_max"] = 0
    new = type(img)(out, None, header)  # affine None: nibabel leaves the copied header alone
    _check_header_kept(new.header, img.header, path)
    raw = new.to_bytes()
    atomic_write_bytes(path, gzip.compress(raw, compresslevel=6, mtime=0) if name.endswith(".gz") else raw)
    return path


#: Header fields that must be byte-identical between a source and any mask written from it.
GEOMETRY_FIELDS = (
    "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c", "quatern_d",
    "qoffset_x", "qoffset_y", "qoffset_z", "qform_code", "sform_code",
)  # fmt: skip


def _check_header_kept(new: nib.Nifti1Header, old: nib.Nifti1Header, path: Path) -> None:
    """Guard: nibabel must not have touched any geometry field (it can when affine and header differ)."""
    for field in GEOMETRY_FIELDS:
        if not np.array_equal(new[field], old[field]):
            raise ConusIOError(f"internal error: header field {field} changed while writing", path=path)
    if not np.array_equal(new["pixdim"][:4], old["pixdim"][:4]):
        raise ConusIOError("internal error: pixdim changed while writing", path=path)
