"""Model bundles: a folder holding a trained network and everything needed to use it faithfully.

Layout of ``models/<name>/``::

    metadata.json       name, version, task, architecture, spacing, patch size, normalisation,
                        threshold, training recipe (argv, seed, steps, seconds, data), framework
                        versions, validation metrics
    model.keras         the weights (Keras 3 format, loaded with safe_mode=True)
    README.md           model card
    training_curves.png loss / Dice curves
    SHA256SUMS          "<sha256>  <file>" for every other file

Loading verifies every checksum and refuses a mismatch (:class:`BundleError`, exit 65).
TensorFlow/Keras is imported only when the network itself is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_app.errors import BundleError

WEIGHTS_NAME = "model.keras"
METADATA_NAME = "metadata.json"
SUMS_NAME = "SHA256SUMS"
CARD_NAME = "README.md"
MAX_BUNDLE_BYTES = 10 * 1024 * 1024
TASKS = ("segmentation", "centerline", "spine")
REQUIRED_KEYS = ("name", "version", "task", "architecture", "spacing", "patch_size", "normalisation",
                 "threshold", "weights")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_sums(path: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise BundleError(f"malformed line {lineno} in {SUMS_NAME}", path=path)
        name = parts[1].strip().lstrip("*")
        if "/" in name or "\\" in name or name in (".", ".."):
            raise BundleError(f"{SUMS_NAME} lists a file outside the bundle: {name!r}", path=path)
        sums[name] = parts[0].lower()
    return sums


@dataclass(frozen=True)
class Bundle:
    """A verified model bundle. ``sha256`` is the digest of its SHA256SUMS manifest, so it changes
    whenever the weights *or* the metadata (threshold, spacing...) change."""

    path: Path
    metadata: dict
    weights_path: Path
    sha256: str
    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    threshold: float
    normalisation: dict
    task: str
    weights_sha256: str = field(default="")

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def outputs(self) -> tuple[str, ...]:
        """Names of the output channels in order (``("cord",)`` for a one-channel model)."""
        return tuple(self.metadata.get("outputs") or ("cord",))

    def channel(self, name: str) -> int | None:
        """Index of output channel ``name``, or None when the model does not predict it."""
        return self.outputs.index(name) if name in self.outputs else None

    def load_model(self):
        """The Keras model (TensorFlow imported here; safe_mode on, not compiled)."""
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras

        try:
            return keras.models.load_model(self.weights_path, compile=False, safe_mode=True)
        except Exception as exc:  # noqa: BLE001 - keras raises many types for a bad file
            raise BundleError(f"cannot load the network: {type(exc).__name__}: {exc}", path=self.weights_path) from exc

    def predict_fn(self, model=None) -> Callable[[np.ndarray], np.ndarray]:
        """A batch predictor for :func:`bids_app.segment.sliding_window_predict`.

        Takes raw intensities ``(B, X, Y, Z, 1)``; each patch is normalised as in training (see
        ``normalisation``) and the cord probabilities come back as float32 of the same shape.
        """
        from bids_app.segment import normalise_batch

        net = self.load_model() if model is None else model
        spec = dict(self.normalisation)

        def predict(batch: np.ndarray) -> np.ndarray:
            x = normalise_batch(np.asarray(batch, dtype=np.float32), spec)
            return np.asarray(net(x, training=False), dtype=np.float32)

        return predict


def resolve_bundle_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped bundle name (see :mod:`bids_app.registry`) or a folder → the bundle folder."""
    from bids_app import registry

    text = str(name_or_path)
    if text in registry.SHIPPED_BUNDLES:
        return registry.bundle_folder(text)
    path = Path(text)
    if path.is_dir():
        return path
    if path.name == METADATA_NAME and path.is_file():
        return path.parent
    raise BundleError(
        f"model {text!r} is neither a shipped model ({', '.join(registry.SHIPPED_BUNDLES)}) nor a bundle folder")


def load_bundle(name_or_path: str | os.PathLike) -> Bundle:
    """Find, verify (every checksum in SHA256SUMS) and describe a bundle; raises BundleError (65)."""
    folder = resolve_bundle_path(name_or_path)
    sums_path = folder / SUMS_NAME
    meta_path = folder / METADATA_NAME
    for required in (sums_path, meta_path):
        if not required.is_file():
            raise BundleError(f"incomplete model bundle: {required.name} is missing", path=folder)
    sums = _read_sums(sums_path)
    if METADATA_NAME not in sums:
        raise BundleError(f"{SUMS_NAME} does not cover {METADATA_NAME}", path=folder)
    for name, expected in sums.items():
        target = folder / name
        if not target.is_file():
            raise BundleError(f"file listed in {SUMS_NAME} is missing: {name}", path=folder)
        actual = sha256_file(target)
        if actual != expected:
            raise BundleError(f"checksum mismatch for {name} (expected {expected[:12]}…, got {actual[:12]}…): "
                              "the bundle was modified or corrupted; refusing to use it", path=folder)
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"unreadable {METADATA_NAME}: {exc}", path=folder) from exc
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise BundleError(f"{METADATA_NAME} lacks {', '.join(missing)}", path=folder)
    if metadata["task"] not in TASKS:
        raise BundleError(f"unknown task {metadata['task']!r} in {METADATA_NAME}", path=folder)
    weights = metadata["weights"]
    if weights not in sums:
        raise BundleError(f"{SUMS_NAME} does not cover the weights {weights}", path=folder)
    spacing = tuple(float(v) for v in metadata["spacing"])
    patch = tuple(int(v) for v in metadata["patch_size"])
    if len(spacing) != 3 or len(patch) != 3 or min(spacing) <= 0 or min(patch) <= 0:
        raise BundleError("spacing and patch_size must be 3 positive numbers", path=folder)
    return Bundle(
        path=folder,
        metadata=metadata,
        weights_path=folder / weights,
        sha256=sha256_file(sums_path),
        spacing=spacing,  # type: ignore[arg-type]
        patch_size=patch,  # type: ignore[arg-type]
        threshold=float(metadata["threshold"]),
        normalisation=dict(metadata["normalisation"]),
        task=str(metadata["task"]),
        weights_sha256=sums[weights],
    )


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def render_model_card(metadata: Mapping) -> str:
    """A short model card (Markdown) generated from the metadata."""
    tr = metadata.get("training", {})
    lines = [
        f"# {metadata['name']} (v{metadata['version']})",
        "",
        str(metadata.get("description", "")),
        "",
        "## Use",
        "",
        f"- task: **{metadata['task']}**; architecture: `{metadata['architecture']}` "
        f"({metadata.get('parameters', '?')} parameters)",
        f"- input: RAS working grid resampled to {tuple(metadata['spacing'])} mm; patches "
        f"{tuple(metadata['patch_size'])} voxels; normalisation `{json.dumps(metadata['normalisation'])}`",
        f"- output: cord probability, threshold {metadata['threshold']}",
        "",
        "## Training",
        "",
        f"- command: `{' '.join(tr.get('argv', []))}`",
        f"- data: {json.dumps(tr.get('data', {}))}",
        f"- seed {tr.get('seed')}, {tr.get('steps')} steps, {tr.get('epochs')} epochs, "
        f"{_fmt(tr.get('seconds'))} s wall-clock on {tr.get('hardware', 'CPU')}",
        f"- frameworks: {json.dumps(metadata.get('framework', {}))}",
        "",
        "## Validation (Dice at the bundle threshold, computed on CPU)",
        "",
    ]
    table = [(k, v) for k, v in metadata.get("validation", {}).items() if isinstance(v, Mapping) and "n" in v]
    if table:
        lines += ["| set | patches (with cord) | Dice mean | median | min | pooled | by contrast |",
                  "|---|---|---|---|---|---|---|"]
        for set_name, r in table:
            contrast = ", ".join(f"{c} {_fmt(d)}" for c, d in (r.get("by_contrast") or {}).items())
            lines.append(f"| {set_name} | {r.get('n')} ({r.get('n_with_cord')}) | {_fmt(r.get('dice_mean'))} | "
                         f"{_fmt(r.get('dice_median'))} | {_fmt(r.get('dice_min'))} | {_fmt(r.get('dice_pooled'))} "
                         f"| {contrast} |")
        lines += ["", "Sets:", ""]
        lines += [f"- {k}: {v.get('description', '')}" for k, v in table]
    for set_name, result in metadata.get("validation", {}).items():
        if (set_name, result) in table:
            continue
        lines.append(f"- {set_name}: {json.dumps(result, default=str) if isinstance(result, Mapping) else _fmt(result)}")
    lines += ["", "## Limits", "", str(metadata.get("limits", "Trained on synthetic images only; "
              "check results on your data (QC pictures) before relying on them.")), ""]
    return "\n".join(lines)


def write_bundle(out_dir: str | os.PathLike, model, metadata: dict, extra_files: Mapping[str, Path] | None = None
                 ) -> Bundle:
    """Write a complete bundle atomically (temporary folder + rename) and return it verified.

    ``model`` is a Keras model (saved without optimizer state); ``metadata`` must hold
    :data:`REQUIRED_KEYS` except ``weights``; ``extra_files`` maps bundle file names to files to
    copy (e.g. the curve PNG). A model card is rendered from the metadata unless one is given.
    Refuses bundles larger than 10 MB. Only ``train``/``finetune`` call this.
    """
    out = Path(out_dir)
    extra = dict(extra_files or {})
    meta = dict(metadata)
    meta["weights"] = WEIGHTS_NAME
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise BundleError(f"metadata lacks {', '.join(missing)}", path=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is read by other users (container)
    try:
        _save_weights_only(model, tmp / WEIGHTS_NAME)
        for name, src in extra.items():
            shutil.copyfile(src, tmp / name)
        (tmp / METADATA_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False, default=_json_default) + "\n")
        if CARD_NAME not in extra:
            (tmp / CARD_NAME).write_text(render_model_card(meta))
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        (tmp / SUMS_NAME).write_text("".join(f"{sha256_file(tmp / n)}  {n}\n" for n in files))
        size = sum(p.stat().st_size for p in tmp.iterdir())
        if size > MAX_BUNDLE_BYTES:
            raise BundleError(f"bundle is {size / 1e6:.1f} MB, above the 10 MB limit", path=out)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_bundle(out)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _save_weights_only(model, path: Path) -> None:
    """Save ``model`` without optimizer or compile state (smaller, loads with compile=False)."""
    import keras

    clone = keras.Model.from_config(model.get_config())  # a fresh, uncompiled copy (no optimizer state)
    clone.set_weights(model.get_weights())
    clone.save(path)
