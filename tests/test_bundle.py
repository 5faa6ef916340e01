"""Model bundles: writing, checksum verification, refusal of tampered bundles, registry."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bids_app import bundle as bundle_mod
from bids_app import registry
from bids_app.bundle import SUMS_NAME, load_bundle, write_bundle
from bids_app.errors import EXIT_BAD_DATA, BundleError


def _metadata(**over):
    meta = {"name": "tiny", "version": "0.0.1", "task": "segmentation", "architecture": "unet3d-test",
            "spacing": [1.0, 1.0, 1.0], "patch_size": [8, 8, 8],
            "normalisation": {"method": "percentile_zscore", "percentiles": [0.5, 99.5], "scope": "patch"},
            "threshold": 0.5, "training": {"argv": ["conus", "train", "--test"], "seed": 0},
            "validation": {"phantom_fixed": {"dice_mean": 0.5}}}
    meta.update(over)
    return meta


@pytest.fixture(scope="module")
def tiny_model():
    from bids_app.training.networks import unet3d

    return unet3d(base_filters=2, depth=1, name="tiny")


@pytest.fixture()
def tiny_bundle(tmp_path, tiny_model):
    return write_bundle(tmp_path / "tiny", tiny_model, _metadata())


def test_write_and_load_roundtrip(tiny_bundle, tiny_model):
    b = load_bundle(tiny_bundle.path)
    assert b.task == "segmentation" and b.spacing == (1.0, 1.0, 1.0) and b.patch_size == (8, 8, 8)
    assert b.threshold == 0.5 and b.weights_path.name == "model.keras"
    files = sorted(p.name for p in b.path.iterdir())
    assert files == ["README.md", "SHA256SUMS", "metadata.json", "model.keras"]
    sums = (b.path / SUMS_NAME).read_text()
    assert "metadata.json" in sums and "model.keras" in sums and "README.md" in sums
    card = (b.path / "README.md").read_text()
    assert "conus train --test" in card and "tiny" in card
    x = np.random.default_rng(0).random((2, 8, 8, 8, 1)).astype(np.float32)
    pred = b.predict_fn()(x)
    assert pred.shape == x.shape and pred.dtype == np.float32
    ref = b.predict_fn(model=tiny_model)(x)
    np.testing.assert_allclose(pred, ref, atol=1e-5)


@pytest.mark.parametrize("target", ["model.keras", "metadata.json", "README.md"])
def test_tampered_bundle_is_refused(tiny_bundle, target):
    path = tiny_bundle.path / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch") as err:
        load_bundle(tiny_bundle.path)
    assert err.value.exit_code == EXIT_BAD_DATA == 65


def test_metadata_edit_is_refused(tiny_bundle):
    meta_path = tiny_bundle.path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["threshold"] = 0.1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(tiny_bundle.path)


def test_incomplete_bundles_are_refused(tiny_bundle, tmp_path):
    (tiny_bundle.path / "model.keras").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tiny_bundle.path)
    with pytest.raises(BundleError):
        load_bundle(tmp_path / "does-not-exist")
    with pytest.raises(BundleError, match="neither a shipped model"):
        load_bundle("no-such-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="SHA256SUMS"):
        load_bundle(empty)


def test_manifest_cannot_point_outside(tiny_bundle):
    sums = tiny_bundle.path / SUMS_NAME
    sums.write_text(sums.read_text() + f"{'0' * 64}  ../etc/passwd\n")
    with pytest.raises(BundleError, match="outside"):
        load_bundle(tiny_bundle.path)


def test_sha256_changes_with_metadata(tmp_path, tiny_model):
    a = write_bundle(tmp_path / "a", tiny_model, _metadata())
    b = write_bundle(tmp_path / "b", tiny_model, _metadata(threshold=0.4))
    assert a.sha256 != b.sha256  # the manifest digest covers the metadata, not only the weights


def test_write_refuses_big_or_incomplete(tmp_path, tiny_model, monkeypatch):
    with pytest.raises(BundleError, match="lacks"):
        write_bundle(tmp_path / "x", tiny_model, {"name": "x"})
    monkeypatch.setattr(bundle_mod, "MAX_BUNDLE_BYTES", 1000)
    with pytest.raises(BundleError, match="10 MB"):
        write_bundle(tmp_path / "big", tiny_model, _metadata())
    assert not (tmp_path / "big").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".big")]


def test_rewrite_replaces_atomically(tmp_path, tiny_model):
    first = write_bundle(tmp_path / "m", tiny_model, _metadata(version="1"))
    second = write_bundle(tmp_path / "m", tiny_model, _metadata(version="2"))
    assert second.metadata["version"] == "2" and first.path == second.path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_registry_and_bundle_modules_do_not_import_tensorflow():
    code = ("import sys, bids_app.registry, bids_app.bundle, bids_app.segment; "
            "bids_app.registry.bundle_names(); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_entries_are_consistent():
    for task in registry.TASKS:
        n_default = sum(e["default"] for e in registry.SHIPPED_BUNDLES.values() if e["task"] == task)
        assert n_default == 1 if task in registry.REQUIRED_ROLES else n_default <= 1
        default = registry.default_bundle(task, required=task in registry.REQUIRED_ROLES)
        assert default is None or registry.SHIPPED_BUNDLES[default]["task"] == task
    assert set(registry.bundle_names()) == set(registry.SHIPPED_BUNDLES)
    assert all(registry.SHIPPED_BUNDLES[n]["task"] == "centerline" for n in registry.bundle_names("centerline"))
    with pytest.raises(BundleError):
        registry.bundle_folder("nope")


def test_levels_role_is_optional(monkeypatch):
    entries = {n: e for n, e in registry.SHIPPED_BUNDLES.items() if e["task"] != "levels"}
    monkeypatch.setattr(registry, "SHIPPED_BUNDLES", entries)
    assert registry.default_bundle("levels", required=False) is None
    with pytest.raises(BundleError):
        registry.default_bundle("levels")
    assert registry.serves("levels", "spine") and not registry.serves("levels", "centerline")


@pytest.mark.parametrize("name", sorted(registry.SHIPPED_BUNDLES))
def test_shipped_bundles_verify_and_fit_the_size_limit(name):
    b = load_bundle(name)
    entry = registry.SHIPPED_BUNDLES[name]
    assert registry.serves(entry["task"], b.task) and b.metadata["name"] == name   # e.g. a spine model as centerline
    assert sum(p.stat().st_size for p in b.path.iterdir()) <= 10 * 1024 * 1024
    training = b.metadata["training"]
    assert training["argv"][:2] in (["conus", "train"], ["conus", "finetune"])
    assert training["steps"] > 0 and training["seconds"] > 0
    assert (b.path / "training_curves.png").is_file()
