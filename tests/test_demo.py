"""``conus demo OUT`` end to end with the shipped models (about a minute: the only such test).

The demo builds a synthetic lumbosacral BIDS dataset (procedural phantoms, no external data),
runs the participant level with the shipped default models and then the group level. The Dice
floor was measured with the shipped models (value in the comment) and set with a margin.
"""

from __future__ import annotations

import csv
import json

from bids_app import cli, demo, registry

#: Mean Dice over the demo runs (group/metrics.tsv, row "mean"); measured 0.823 (0.877, 0.795, 0.797)
#: with seg-general 1.0.0 (155 min) and centerline-coarse; the minimum per run 0.795.
DEMO_MEAN_DICE_FLOOR = 0.75
DEMO_MIN_DICE_FLOOR = 0.70


def _rows(path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {row["run"]: row for row in csv.DictReader(fh, delimiter="\t")}


def test_demo_runs_end_to_end(tmp_path, capsys):
    folder = registry.models_dir() / registry.default_bundle("segmentation")
    assert folder.is_dir(), f"shipped model missing: {folder} (the shipped bundles must be committed)"
    assert cli.main(["demo", str(tmp_path), "-q"]) == 0
    assert "conus demo finished" in capsys.readouterr().out

    out = tmp_path / "bids" / "derivatives" / "conus"
    images = sorted((tmp_path / "bids").glob("sub-*/anat/sub-*.nii.gz"))
    assert len(images) == demo.DEMO_SUBJECTS
    for image in images:
        stem = image.name[: -len(".nii.gz")]
        anat = out / image.parent.relative_to(tmp_path / "bids")
        for tail in ("_label-SC_seg.nii.gz", "_label-SC_seg.json", "_desc-qc.png", "_desc-metrics.json"):
            assert (anat / f"{stem}{tail}").is_file(), f"{stem}{tail}"
        assert (anat / f"{stem}_desc-qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        sidecar = json.loads((anat / f"{stem}_label-SC_seg.json").read_text())
        assert sidecar["CordFound"] is True, stem   # every demo phantom has a cord in view
        assert sidecar["ReferenceMask"] is not None

    group = out / "group"
    assert (group / "dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (group / "index.html").read_text()
    assert all(f"{img.name[: -len('.nii.gz')]}_desc-qc.png" in html for img in images)
    rows = _rows(group / "metrics.tsv")
    runs = [r for r in rows if r.startswith("sub-")]
    assert len(runs) == demo.DEMO_SUBJECTS
    assert {"min", "max", "mean", "median"} <= set(rows)
    assert float(rows["mean"]["dice"]) >= DEMO_MEAN_DICE_FLOOR, rows["mean"]["dice"]
    assert float(rows["min"]["dice"]) >= DEMO_MIN_DICE_FLOOR, rows["min"]["dice"]
