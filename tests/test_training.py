"""Training, resuming, fine-tuning presets and the shipped bundles' recorded phantom Dice."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest

from bids_app import registry
from bids_app.errors import UsageError
from bids_app.training.dataset import (
    TASKS,
    VALIDATION_SEED,
    ArraySource,
    PatchProducer,
    StreamConfig,
    SyntheticSource,
    TaskConfig,
    build_set,
    epoch_samples,
    epoch_seeds,
    grid_patches,
)
from bids_app.training.finetune import PRESETS, main_finetune
from bids_app.training.networks import CONTRACTION_PREFIXES, is_contraction_layer, unet3d
from bids_app.training.train import Recipe, apply_freeze, compile_model, configure_tensorflow, run_training

PATCH = (16, 16, 16)


def tube_phantom(shape=(24, 28, 40), radius=3.0, seed=0):
    """A bright tube along z with a random lateral position and a tapered lower end, on noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cx, cy = shape[0] / 2 + rng.uniform(-3, 3), shape[1] / 2 + rng.uniform(-3, 3)
    taper = np.clip((z - 6) / 8.0, 0, 1)  # the tube narrows to nothing at its inferior end
    mask = ((x - cx) ** 2 + (y - cy) ** 2 <= (radius * taper) ** 2).astype(np.uint8)
    image = 100 + 8 * rng.standard_normal(shape) + 60 * mask
    return image.astype(np.float32), mask


def _source(seeds=(0, 1)):
    vols = [tube_phantom(seed=s) for s in seeds]
    return ArraySource([v[0] for v in vols], [v[1] for v in vols], PATCH)


TASK = TaskConfig(task="segmentation", spacing=(1.0, 1.0, 1.0), patch_size=PATCH)


def _recipe(epochs, **over):
    stream = StreamConfig(batch_size=2, steps_per_epoch=6, reuse=2, chunk=4, seed=3)
    return replace(Recipe(lr=3e-3, epochs=epochs, threads=1, workers=0, plateau_patience=100, stream=stream), **over)


@pytest.fixture(scope="module")
def val_set():
    return build_set(PatchProducer(_source(seeds=(7,)), workers=0), range(VALIDATION_SEED, VALIDATION_SEED + 4))


def test_stream_is_deterministic_and_disjoint_from_validation():
    stream = StreamConfig(batch_size=2, steps_per_epoch=3, reuse=2, chunk=2, seed=1)
    producer = PatchProducer(_source(), workers=0)
    a = [x for x, _ in epoch_samples(producer, stream, 4, (0, 1, 2), None)]
    b = [x for x, _ in epoch_samples(producer, stream, 4, (0, 1, 2), None)]
    assert len(a) == stream.samples_per_epoch == 6
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not set(epoch_seeds(stream, 4)) & set(epoch_seeds(stream, 5))
    assert max(epoch_seeds(stream, 10_000)) < VALIDATION_SEED


def test_grid_patches_cover_the_cord():
    image, mask = tube_phantom()
    patches = grid_patches(image, mask, PATCH, overlap=3)
    assert patches and all(p[0].shape == PATCH for p in patches)
    assert sum(int(m.sum()) for _, m in patches) >= int(mask.sum())


def test_training_steps_reduce_the_loss_and_resume(tmp_path, val_set):
    configure_tensorflow(1, 0)
    model = unet3d(base_filters=4, depth=2, norm="instance")
    result = run_training(model, _recipe(3), PatchProducer(_source(), workers=0), TASK, val_set, tmp_path / "run",
                          progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.steps == 18 and (tmp_path / "run" / "checkpoint.keras").is_file()
    with pytest.raises(UsageError, match="--resume"):
        run_training(unet3d(base_filters=4, depth=2), _recipe(4), PatchProducer(_source(), workers=0), TASK, val_set,
                     tmp_path / "run", progress=False)
    resumed = run_training(unet3d(base_filters=4, depth=2), _recipe(4), PatchProducer(_source(), workers=0), TASK,
                           val_set, tmp_path / "run", resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3] and resumed.steps == 24
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4 and json.loads(log[-1])["epoch"] == 3


def test_thesis_preset_matches_the_protocol():
    p = PRESETS["thesis"]
    assert p.freeze_prefixes == CONTRACTION_PREFIXES == ("enc", "bottleneck")
    assert (p.lr, p.batch_size, p.flip_axes, p.patch_overlap) == (1e-5, 5, (0, 1, 2), 3)
    assert (p.plateau_factor, p.plateau_patience, p.keep_best) == (0.5, 10, True)


def test_freezing_the_contraction_path(val_set):
    configure_tensorflow(1, 0)
    model = unet3d(base_filters=2, depth=2)
    frozen = apply_freeze(model, PRESETS["thesis"].freeze_prefixes)
    compile_model(model, 1e-2)
    assert frozen and all(is_contraction_layer(n) for n in frozen)
    for layer in model.layers:
        assert layer.trainable == (not is_contraction_layer(layer.name)), layer.name
    trainable = {id(w) for w in model.trainable_weights}
    enc_weights = [w for layer in model.layers if is_contraction_layer(layer.name) for w in layer.weights]
    assert enc_weights and not any(id(w) in trainable for w in enc_weights)
    before = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers}
    x = val_set["image"][:2, ..., None]
    y = val_set["mask"][:2, ..., None].astype(np.float32)
    for _ in range(3):
        model.train_on_batch((x - x.mean()) / x.std(), y)
    changed = {layer.name for layer in model.layers
               if any(not np.array_equal(a, np.array(b)) for a, b in zip(before[layer.name], layer.get_weights(),
                                                                          strict=True))}
    assert changed, "nothing trained"
    assert all(not is_contraction_layer(n) for n in changed)
    assert any(n.startswith("dec") for n in changed)


def test_finetune_on_a_bids_dataset(tmp_path):
    from bids_app.bundle import load_bundle, write_bundle
    from tests.fixtures import simple_dataset

    bids = simple_dataset(tmp_path / "bids", subjects=("01", "02", "03", "04"))
    configure_tensorflow(1, 0)
    base_model = unet3d(base_filters=2, depth=1, name="tiny")
    meta = {"name": "tiny-base", "version": "0", "task": "segmentation", "architecture": "unet3d-tiny",
            "spacing": [1.0, 1.0, 1.5], "patch_size": [8, 8, 8],
            "normalisation": {"method": "percentile_zscore", "percentiles": [0.5, 99.5], "scope": "patch"},
            "threshold": 0.5}
    base = write_bundle(tmp_path / "base", base_model, meta)
    args = argparse.Namespace(from_model=str(base.path), data=bids, preset="thesis", out=tmp_path / "tuned",
                              name=None, steps=2, epochs=2, batch_size=None, lr=None, max_minutes=None,
                              resume=False, run_dir=tmp_path / "ft-run", threads=1, seed=0,
                              argv=["conus", "finetune", "--from", str(base.path)])
    assert main_finetune(args) == 0
    tuned = load_bundle(tmp_path / "tuned")
    tr = tuned.metadata["training"]
    assert tr["preset"] == "thesis" and tr["from_bundle"]["sha256"] == base.sha256
    assert tr["argv"][:2] == ["conus", "finetune"] and tr["recipe"]["lr"] == 1e-5
    assert tr["recipe"]["stream"]["batch_size"] == 5
    val = tuned.metadata["validation"]["validation_subjects"]
    assert set(val["before"]["per_run"]) == set(val["after"]["per_run"])
    assert not set(tr["data"]["train_subjects"]) & set(tr["data"]["validation_subjects"])
    # the frozen contraction path is bit-identical to the base model's
    base_net, tuned_net = base.load_model(), tuned.load_model()
    for layer in base_net.layers:
        same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(),
                                                        tuned_net.get_layer(layer.name).get_weights(), strict=True))
        if is_contraction_layer(layer.name):
            assert same, layer.name


@pytest.mark.parametrize("name", registry.bundle_names())
def test_shipped_bundle_reproduces_its_recorded_phantom_dice(name):
    """Inference of a shipped bundle on its fixed phantom crops gives the Dice in its metadata (± 0.01).

    The crops (seeded ``generate_crop(source="phantom")``, see the metadata) ship inside the bundle,
    covered by its checksums, so the check does not depend on later changes to the synthetic engine.
    """
    from bids_app.bundle import load_bundle
    from bids_app.metrics import dice

    b = load_bundle(name)
    record = b.metadata["validation"]["phantom_fixed"]
    assert record["generate_crop"]["source"] == "phantom"
    with np.load(b.path / record["file"]) as data:
        images, masks, seeds = data["image"].astype(np.float32), data["mask"], data["seed"].tolist()
    if masks.ndim == 5:  # multi-output model: channel 0 is the cord
        masks = masks[..., 0]
    assert seeds == record["generate_crop"]["seeds"]
    predict = b.predict_fn()
    scores = [dice(predict(img[None, ..., None])[0, ..., 0] >= b.threshold, m > 0)
              for img, m in zip(images, masks, strict=True) if m.any()]
    assert len(scores) == record["n_with_cord"] > 0
    assert float(np.mean(scores)) == pytest.approx(record["dice_mean"], abs=0.01)


def test_labelled_bids_sources_split_by_subject(tmp_path):
    from bids_app.training.finetune import labelled_bids_sources, load_labelled_bids
    from tests.fixtures import simple_dataset

    bids = simple_dataset(tmp_path / "bids", subjects=("01", "02", "03", "04"), header="psr")
    task = TaskConfig(task="segmentation", spacing=(1.0, 1.0, 1.0), patch_size=PATCH)
    volumes = load_labelled_bids(bids, task.spacing)
    assert len(volumes) == 4
    for v in volumes:  # RAS working grid at the model spacing: the sagittal PSR tube now runs along z
        assert v.image.shape == v.mask.shape and v.mask.any()
        zs = np.nonzero(v.mask.any(axis=(0, 1)))[0]
        assert zs.max() - zs.min() + 1 > 0.8 * v.mask.shape[2]
    source, val_source, desc = labelled_bids_sources(bids, task, seed=0)
    assert not set(desc["train_subjects"]) & set(desc["validation_subjects"])
    assert len(desc["train_subjects"]) == 3 and len(desc["validation_subjects"]) == 1
    image, mask, _ = source(5)
    assert image.shape == PATCH and mask.shape == PATCH
    assert val_source.n_patches >= 1 and any(val_source(i)[1].any() for i in range(val_source.n_patches))


def test_loss_sums_the_dice_of_each_channel():
    """A perfect channel adds no Dice loss, an all-wrong channel adds ~1; BCE is shared."""
    import keras  # noqa: F401  (the loss is registered with Keras)

    from bids_app.training.train import _register_losses

    loss_fn, _metric = _register_losses()
    truth = np.zeros((1, 8, 8, 8, 2), np.float32)
    truth[0, 2:6, 2:6, 2:6, :] = 1.0
    perfect = truth.copy()
    wrong_second = truth.copy()
    wrong_second[..., 1] = 1.0 - truth[..., 1]
    one_channel = float(loss_fn(truth[..., :1], perfect[..., :1]))
    two_perfect = float(loss_fn(truth, np.clip(perfect, 1e-6, 1 - 1e-6)))
    two_wrong = float(loss_fn(truth, np.clip(wrong_second, 1e-6, 1 - 1e-6)))
    assert one_channel < 0.01 and two_perfect < 0.01
    # the wrong channel costs its full Dice loss (~1), not half of it as an average would
    assert two_wrong - two_perfect > 0.95


def test_channel_weighted_loss_equals_the_plain_loss_at_unit_weights_and_scales_one_channel():
    from bids_app.training.train import _register_losses, make_loss

    plain, _metric = _register_losses()
    rng = np.random.default_rng(0)
    truth = (rng.random((2, 8, 8, 8, 3)) > 0.7).astype(np.float32)
    pred = np.clip(rng.random((2, 8, 8, 8, 3)), 1e-3, 1 - 1e-3).astype(np.float32)
    unit = make_loss((1.0, 1.0, 1.0))
    assert float(unit(truth, pred)) == pytest.approx(float(plain(truth, pred)), rel=1e-4)
    # weighting the third channel by 4 adds 3x that channel's own (Dice + BCE/3) term, nothing else
    per_channel = [float(make_loss((1.0,))(truth[..., c:c + 1], pred[..., c:c + 1])) for c in range(3)]
    weighted = float(make_loss((1.0, 1.0, 4.0))(truth, pred))
    dice3 = per_channel[2] - float(np.mean(-(truth[..., 2] * np.log(pred[..., 2])
                                              + (1 - truth[..., 2]) * np.log(1 - pred[..., 2]))))
    bce3 = per_channel[2] - dice3
    assert weighted - float(unit(truth, pred)) == pytest.approx(3 * (dice3 + bce3 / 3), rel=1e-3)
    assert make_loss(None).__name__ == "dice_bce_loss"


def test_loss_weights_option_is_checked_and_recorded():
    from bids_app.cli import get_tools_parser
    from bids_app.errors import UsageError
    from bids_app.training.train import recipe_from_args

    parse = get_tools_parser().parse_args
    args = parse(["train", "--synthetic", "--task", "spine", "--out", "x", "--loss-weights", "1", "1", "5"])
    recipe = recipe_from_args(args)
    assert recipe.channel_weights == (1.0, 1.0, 5.0)
    assert recipe.as_dict()["channel_weights"] == [1.0, 1.0, 5.0]
    assert recipe_from_args(parse(["train", "--synthetic", "--out", "x"])).channel_weights is None
    with pytest.raises(UsageError, match="one weight per output"):
        recipe_from_args(parse(["train", "--synthetic", "--task", "spine", "--out", "x", "--loss-weights", "2"]))
    with pytest.raises(UsageError, match="positive"):
        recipe_from_args(parse(["train", "--synthetic", "--out", "x", "--loss-weights", "0"]))


def test_selection_score_weighs_every_output():
    from bids_app.training.train import selection_score

    val = {"all": {"dice_mean": 0.8, "dice_pooled": 0.7, "dice_pooled_discs": 0.4, "dice_pooled_anchors": 0.3}}
    assert selection_score(val) == pytest.approx(0.8)
    assert selection_score(val, ("cord", "discs", "anchors")) == pytest.approx(0.5)
    empty = {"all": {"dice_mean": None, "dice_pooled": 1.0}}
    assert selection_score(empty) == pytest.approx(1.0)


def test_train_records_the_bundle_it_was_warm_started_from(tmp_path):
    """``conus train --init-from`` writes the starting bundle's name and sha256 into the metadata."""
    from bids_app.bundle import load_bundle
    from bids_app.cli import main
    from tests.fixtures import simple_dataset

    bids = simple_dataset(tmp_path / "bids", subjects=("01", "02", "03", "04"))
    start = load_bundle("seg-general")
    rc = main(["train", "--data", str(bids), "--init-from", "seg-general", "--out", str(tmp_path / "warm"),
               "--run-dir", str(tmp_path / "run"), "--steps", "1", "--epochs", "1", "--batch-size", "1",
               "--threads", "1", "--workers", "0", "-q"])
    assert rc == 0
    init = load_bundle(tmp_path / "warm").metadata["training"]["init_from"]
    assert init["sha256"] == start.sha256 and init["name"] == "seg-general" and init["layers_copied"] > 10


def test_cosine_schedule_by_epochs_without_a_time_budget(tmp_path, val_set):
    """Without --max-minutes, --schedule cosine decays over the epochs (the engine ablation's arms)."""
    configure_tensorflow(1, 0)
    result = run_training(unet3d(base_filters=4, depth=2), _recipe(4, schedule="cosine", min_lr=0.0),
                          PatchProducer(_source(), workers=0), TASK, val_set, tmp_path / "run", progress=False)
    lrs = [h["lr"] for h in result.history]
    expected = [3e-3 * 0.5 * (1 + np.cos(np.pi * e / 4)) for e in range(4)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-4)


def test_train_engine_variant_reaches_the_generator():
    from bids_app.cli import get_tools_parser
    from bids_app.synth import generate_crop
    from bids_app.synth.features import Features

    args = get_tools_parser().parse_args(["train", "--synthetic", "--out", "x", "--engine", "no-deformation"])
    assert args.engine == "no-deformation"
    assert get_tools_parser().parse_args(["train", "--synthetic", "--out", "x"]).engine == "default"
    source = SyntheticSource(TASKS["segmentation"], source="phantom", engine="no-deformation")
    assert source.describe()["engine_variant"] == "no-deformation"
    image, mask, _ = source(5)
    ref = generate_crop(5, patch_size=(64, 64, 48), spacing=(0.5, 0.5, 1.0), source="phantom",
                        features=Features(artefacts=True, deformation=False))  # one feature off the full engine
    np.testing.assert_array_equal(image, ref.image)
    np.testing.assert_array_equal(mask, ref.cord)


def test_train_regions_make_a_specialist(monkeypatch, tmp_path):
    """``--regions`` draws crops from those regions only and monitors the ones that hold a cord."""
    from bids_app import cli
    from bids_app.synth.generator import CROP_REGIONS
    from bids_app.training import train

    assert cli.CROP_REGIONS == CROP_REGIONS
    seen = {}

    def fake_source(task, **kwargs):
        seen.setdefault("task", task)
        raise RuntimeError("stop here")

    monkeypatch.setattr(train, "SyntheticSource", fake_source)
    args = cli.get_tools_parser().parse_args(["train", "--synthetic", "--out", str(tmp_path / "b"),
                                              "--regions", "lumbosacral", "below_conus"])
    with pytest.raises(RuntimeError, match="stop here"):
        train.main_train(args)
    assert seen["task"].regions == ("lumbosacral", "below_conus") and seen["task"].val_regions == ("lumbosacral",)
    args = cli.get_tools_parser().parse_args(["train", "--data", str(tmp_path), "--out", str(tmp_path / "b"),
                                              "--regions", "lumbosacral"])
    with pytest.raises(UsageError, match="--regions"):
        train.main_train(args)


def test_tf_dataset_streams_the_engine_deterministically():
    """The synthetic engine inside a tf.data pipeline: shapes, types, same seed -> same batches."""
    from bids_app.training.dataset import tf_dataset

    task = replace(TASKS["segmentation"], patch_size=(24, 24, 16))
    source = SyntheticSource(task, source="phantom", region="lumbosacral")
    a = [(x.numpy(), y.numpy()) for x, y in tf_dataset(source, seed=2, batch_size=2).take(2)]
    b = [(x.numpy(), y.numpy()) for x, y in tf_dataset(source, seed=2, batch_size=2).take(2)]
    assert a[0][0].shape == (2, 24, 24, 16, 1) and a[0][1].shape == (2, 24, 24, 16, 1)
    assert a[0][0].dtype == np.float32 and set(np.unique(a[0][1])) <= {0.0, 1.0}
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], a[1][0])
    # element 0 is the source's seed-20000 patch (possibly flipped), normalised
    image, mask, _ = source(20_000)
    assert a[0][1][0].sum() == mask.sum()
