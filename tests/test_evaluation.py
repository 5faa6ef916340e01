"""Pure helpers of the evaluation scripts (evaluation/ is not a package: loaded from its file)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

EVALUATION = Path(__file__).resolve().parent.parent / "evaluation"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"evaluation_{name}", EVALUATION / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def proof():
    return _load("finetune_proof")


def test_parse_family_presets_and_overrides(proof):
    default = proof.parse_family(proof.DEFAULT_FAMILY)
    assert default == {**proof.FAMILIES[proof.DEFAULT_FAMILY], "name": proof.DEFAULT_FAMILY}
    assert default["strength"] > 1.0                      # outside the training range by default
    spec = proof.parse_family("strength=2.2, contrast=T1w")
    assert spec["strength"] == 2.2 and spec["contrast"] == "T1w" and spec["region"] == "lumbosacral"
    assert spec["name"] == f"{proof.DEFAULT_FAMILY},strength=2.2,contrast=T1w"
    assert proof.parse_family("lumbosacral-phantom-strong-t1,contrast=none")["contrast"] is None
    for bad in ("elbow", "region=elbow", "strength=-1", "contrast=PD", "colour=red", "strength"):
        with pytest.raises(ValueError):
            proof.parse_family(bad)


def test_dataset_seeds_never_share_subject_seeds(proof):
    seeds = [s for seed in range(4) for s in proof.dataset_seeds(seed)]
    assert len(set(seeds)) == len(seeds)
    # conus synth: subject i of dataset seed d has seed d * 100003 + i (and uses +1, +2)
    subjects = [{d * 100003 + i + k for i in range(50) for k in range(3)} for d in seeds]
    assert all(not (a & b) for i, a in enumerate(subjects) for b in subjects[i + 1:])
    assert min(seeds) * 100003 > 5_000_000               # beyond training and held-out crop seeds


def test_paired_summary(proof):
    before = {"a": 0.5, "b": 0.6, "c": 0.7, "d": 0.8, "e": None}
    after = {"a": 0.7, "b": 0.6, "c": 0.6, "d": 0.9, "e": 0.9, "f": 0.1}
    s = proof.paired_summary(before, after)
    assert s["n"] == 4 and s["runs"] == ["a", "b", "c", "d"]     # only cases scored on both sides
    assert (s["n_improved"], s["n_worse"], s["n_equal"]) == (2, 1, 1)
    assert s["mean_before"] == pytest.approx(0.65) and s["mean_after"] == pytest.approx(0.7)
    assert s["mean_diff"] == pytest.approx(0.05) and s["median_diff"] == pytest.approx(0.05)
    assert 0.0 < s["wilcoxon_p"] <= 1.0
    same = proof.paired_summary({"a": 0.5, "b": 0.4}, {"a": 0.5, "b": 0.4})
    assert same["mean_diff"] == 0.0 and same["wilcoxon_p"] is None
    assert proof.paired_summary({"a": float("nan")}, {"a": 0.3}) == {"n": 0, "runs": []}


def test_markdown_report_lists_every_case(proof):
    runs_b = {"sub-001_T2w": {"contrast": "T2w", "dice": 0.5, "dice_lumbosacral": None}}
    runs_a = {"sub-001_T2w": {"contrast": "T2w", "dice": 0.75, "dice_lumbosacral": 0.7}}
    result = {"family": proof.parse_family(proof.DEFAULT_FAMILY), "base": {"runs": runs_b},
              "finetuned": {"runs": runs_a},
              "summary": {"dice": proof.paired_summary({"x": 0.5}, {"x": 0.75}),
                          "dice_lumbosacral": proof.paired_summary({}, {})}}
    text = proof.markdown_report(result)
    assert "| sub-001_T2w | T2w | 0.5000 | 0.7500 | +0.2500 | n/a | 0.7000 |" in text
    assert "| dice | 1 | 0.5000 | 0.7500 |" in text and "| dice_lumbosacral | 0 |" in text


def test_engine_ablation_commands_and_table(tmp_path):
    abl = _load("engine_ablation")
    args = abl.parse_args([str(tmp_path), "--pam50", "/pam50", "--arms", "no-artefacts:3", "--epochs", "4"])
    cmd = abl.train_command(args, "no-artefacts:3")
    # every arm: the same recipe, its own engine variant and seed, step-budgeted (no time budget)
    assert cmd[cmd.index("--engine") + 1] == "no-artefacts" and cmd[cmd.index("--seed") + 1] == "3"
    assert cmd[cmd.index("--epochs") + 1] == "4" and "--max-minutes" not in cmd and "--resume" not in cmd
    run_dir, bundle = abl.arm_dirs(tmp_path, "no-artefacts:3")
    assert bundle == tmp_path / "no-artefacts-s3" / "bundle"
    run_dir.mkdir(parents=True)
    (run_dir / "state.json").write_text("{}")
    assert abl.train_command(args, "no-artefacts:3")[-1] == "--resume"   # a killed arm resumes
    timed = abl.parse_args([str(tmp_path), "--pam50", "/pam50", "--architecture", "thesis", "--max-minutes", "30"])
    cmd = abl.train_command(timed, "full:1")          # architectures compared at equal wall-clock time
    assert cmd[cmd.index("--max-minutes") + 1] == "30.0" and "--epochs" not in cmd
    assert cmd[cmd.index("--architecture") + 1] == "thesis" and "--architecture" not in abl.train_command(args, "full:1")
    results = {"full:1": {"steps": 500, "train_seconds": 1500, "real_dice": {"sub-1_T2w": 0.9, "sub-2_T1w": 0.7},
                          "phantom_dice": {"cervical": 0.8, "thoracic": 0.6, "lumbosacral": 0.4}}}
    lines = abl.table(results).splitlines()
    assert lines[0].split(" | ")[3:5] == ["T2w", "T1w"]
    assert lines[2] == "| full:1 | 500 | 25 | 0.900 | 0.700 | 0.800 | 0.800 | 0.600 | 0.400 | 0.600 |"


def test_body_labels_are_matched_to_the_midpoint_of_their_discs():
    levels = _load("eval_levels")
    # a tilted chain of discs 2..5 (C1-C2 .. C4-C5), superior first, 17 mm apart
    direction = np.array([0.0, 0.2, -1.0]) / np.linalg.norm([0.0, 0.2, -1.0])
    discs = np.array([10.0, 0.0, 40.0]) + np.outer(np.arange(4) * 17.0, direction)
    shuffled = discs[[2, 0, 3, 1]]
    values = np.array([4, 2, 5, 3])                        # identities follow the shuffle
    bodies = np.array([(discs[1] + discs[2]) / 2 + [1.0, 0, 0],   # C3 body, 1 mm off the midpoint
                       discs[2] + 0.25 * (discs[3] - discs[2]),    # C4 body, a quarter of the way down
                       discs[0] + 5 * direction * -1])             # above the chain: no upper disc
    rows = levels.match_body_labels(bodies, [3, 4, 1], shuffled, values)
    assert rows[0]["error_mm"] == pytest.approx(1.0) and rows[0]["fraction"] == pytest.approx(0.5)
    assert rows[0]["identity_ok"] is True
    assert rows[1]["fraction"] == pytest.approx(0.25) and rows[1]["error_mm"] == pytest.approx(0.25 * 17)
    assert rows[1]["identity_ok"] is True
    assert rows[2]["error_mm"] is None and rows[2]["identity_ok"] is None
    wrong = levels.match_body_labels(bodies[:1], [3], shuffled, values + 1)
    assert wrong[0]["identity_ok"] is False
    unnamed = levels.match_body_labels(bodies[:1], [3], shuffled, None)
    assert unnamed[0]["identity_ok"] is None and unnamed[0]["error_mm"] == pytest.approx(1.0)
    assert levels.match_body_labels(bodies[:1], [3], shuffled[:1], None)[0]["error_mm"] is None


def test_identity_diagnosis_helpers():
    diag = _load("identity_diagnosis")
    z = lambda v: np.array([0.0, 0.0, float(v)])  # noqa: E731
    truth = [(25, z(0)), (24, z(35)), (23, z(70))]            # L5-S1 .. L3-L4, sacrum in view
    assert diag.oracle_flags(truth) == (True, False)
    points = np.array([z(-40), z(1), z(36), z(120)])          # one in the sacrum, one far above
    assert diag.drop_beyond(points, truth)[:, 2].tolist() == [1.0, 36.0, 120.0]
    errors = diag.detection_errors(points, truth)
    assert errors == {"false_above": 1, "false_below": 1, "false_inside": 0, "missed": 1}
    # identities count only when the nearest detection carries the true value
    assert diag.identity_hits(points, [None, 25, 24, 22], truth) == 2
    assert diag.identity_hits(points, None, truth) == 0
    # a wrong value on a detected disc is counted apart from a skip (L3-L4 detected, named 22)
    assert diag.identity_hits(points, [None, 25, 24, 22], truth, wrong=True) == 0
    assert diag.identity_hits(points, [None, 24, 23, 22], truth, wrong=True) == 2
    rows = [{"discs_true": 3, "model": 0, "oracle_anchors": 2, "oracle_anchors_drop_beyond": 3,
             "wrong_oracle_anchors": 1, **errors}]
    summary = diag.summarise(rows)
    assert summary["identities_oracle_anchors"] == pytest.approx(2 / 3)
    assert summary["wrong_oracle_anchors"] == pytest.approx(1 / 3) and summary["wrong_model"] == 0
    assert summary["identities_oracle_anchors_drop_beyond"] == 1.0 and summary["views_with_false_beyond_extremes"] == 1
