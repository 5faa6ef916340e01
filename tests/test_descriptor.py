"""The Boutiques descriptor mirrors the BIDS App parser, validates, and runs conus via bosh.

Also checks that the version is the same everywhere: ``conus --version``, the descriptor,
the Dockerfile's image label and dataset_description.json's GeneratedBy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fixtures import simple_dataset

from bids_app import __version__, errors
from bids_app.bids_io import bids_uri
from bids_app.cli import ANALYSIS_LEVELS, get_bids_parser, get_tools_parser, main
from bids_app.derivatives import dataset_description

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DESCRIPTOR = REPO / "descriptor.json"
INVOCATION = REPO / "invocation.json"
BIDS_HEAD = ["[BIDS_DIR]", "[OUTPUT_DIR]", "[ANALYSIS_LEVEL]", "[PARTICIPANT_LABEL]", "[SESSION_LABEL]"]
OUTPUT_INPUTS = {"output_dir_name": "String", "participant_level_analysis_dir": "File"}


def load_descriptor() -> dict:
    return json.loads(DESCRIPTOR.read_text(encoding="utf-8"))


def bosh_executable() -> str:
    """The ``bosh`` script installed next to this interpreter (the venv's)."""
    return str(Path(sys.executable).with_name("bosh"))


# --------------------------------------------------------------------------------------------
# expected inputs, built from the real parser


def _type_of(action: argparse.Action) -> tuple[str, bool | None]:
    """(Boutiques type, integer-ness for numbers) of an argparse action.

    Flags: store_true and count actions. Files: ``type=Path``. Numbers: a type function that
    turns "1" into an int or float (integer when it refuses "0.5"). Everything else: String.
    """
    if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction)):
        return "Flag", None
    if action.type is Path:
        return "File", None
    if action.type in (None, str):
        return "String", None
    try:
        one = action.type("1")
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return "String", None
    if isinstance(one, bool) or not isinstance(one, int | float):
        return "String", None
    try:
        action.type("0.5")
    except (argparse.ArgumentTypeError, ValueError):
        return "Number", True
    return "Number", False


def _default_of(action: argparse.Action):
    """The default bosh must pass on, or None when the option is simply left out."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction)):
        return None
    if action.default in (None, [], ()):
        return None
    return list(action.default) if isinstance(action.default, list | tuple) else action.default


def expected_inputs() -> dict[str, dict]:
    """dest -> {flag, type, integer, list, choices, default, optional} from get_bids_parser()."""
    expected = {}
    for action in get_bids_parser()._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        kind, integer = _type_of(action)
        longs = [o for o in action.option_strings if o.startswith("--")]
        choices = list(ANALYSIS_LEVELS) if action.dest == "analysis_level" else action.choices
        expected[action.dest] = {
            "flag": longs[0] if longs else None,
            "type": kind,
            "integer": integer,
            "list": action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1),
            "choices": None if choices is None else list(choices),
            "default": _default_of(action),
            "optional": not action.required,
        }
    return expected


def described(inp: dict) -> dict:
    """The same properties read from a descriptor input."""
    return {
        "flag": inp.get("command-line-flag"),
        "type": inp["type"],
        "integer": inp.get("integer", False) if inp["type"] == "Number" else None,
        "list": bool(inp.get("list", False)),
        "choices": inp.get("value-choices"),
        "default": inp.get("default-value"),
        "optional": bool(inp.get("optional", False)),
    }


# --------------------------------------------------------------------------------------------
# descriptor checks


def test_descriptor_passes_bosh_validate_bids():
    result = subprocess.run([bosh_executable(), "validate", "--bids", str(DESCRIPTOR)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BIDS validation OK" in result.stdout + result.stderr


def test_descriptor_mirrors_the_bids_parser():
    """Drift test: each parser option has exactly one input with the same flag, type, list-ness,
    choices and default, and the descriptor has no input the parser does not know."""
    desc = load_descriptor()
    inputs = {inp["id"]: inp for inp in desc["inputs"]}
    expected = expected_inputs()

    # OUTPUT_DIR: a required String (the folder conus gets) and an optional File (the same folder,
    # declared for platforms that stage existing folders), sharing one value-key.
    for input_id, kind in OUTPUT_INPUTS.items():
        out = inputs.pop(input_id)
        assert out["type"] == kind and out["value-key"] == "[OUTPUT_DIR]" and "command-line-flag" not in out
    assert inputs_order_ok(desc)
    assert load_input(desc, "output_dir_name")["optional"] is False
    assert expected.pop("output_dir")["type"] == "File"

    assert sorted(inputs) == sorted(expected), "descriptor inputs differ from get_bids_parser() options"
    mismatches = {dest: (described(inputs[dest]), want) for dest, want in expected.items()
                  if described(inputs[dest]) != want}
    assert not mismatches, json.dumps(mismatches, indent=1, default=str)
    for dest, inp in inputs.items():
        assert inp["value-key"] == f"[{dest.upper()}]"


def load_input(desc: dict, input_id: str) -> dict:
    return next(inp for inp in desc["inputs"] if inp["id"] == input_id)


def inputs_order_ok(desc: dict) -> bool:
    """bosh substitutes a shared value-key with the first input that has a value and removes it
    for the first one that has none: the String must come before the File."""
    ids = [inp["id"] for inp in desc["inputs"]]
    return ids.index("output_dir_name") < ids.index("participant_level_analysis_dir")


def test_descriptor_groups_mirror_the_parser_argument_groups():
    skip = (argparse._HelpAction, argparse._VersionAction)
    parser_groups = {g.title.lower(): [a.dest for a in g._group_actions if not isinstance(a, skip)]
                     for g in get_bids_parser()._action_groups}
    groups = load_descriptor()["groups"]
    assert groups
    for group in groups:
        assert group["members"] == parser_groups[group["name"].lower()]


def test_descriptor_numeric_minimums_match_the_parser():
    """A declared minimum is accepted by the parser's type and the value just below is refused."""
    parser = {a.dest: a for a in get_bids_parser()._actions}
    for inp in load_descriptor()["inputs"]:
        if "minimum" not in inp:
            continue
        convert = parser[inp["id"]].type
        convert(str(inp["minimum"]))
        below = inp["minimum"] - 1 if inp.get("integer") else inp["minimum"] - 0.01
        with pytest.raises(argparse.ArgumentTypeError):
            convert(str(below))


def test_descriptor_command_line_holds_every_value_key_once():
    desc = load_descriptor()
    command = desc["command-line"]
    assert command.startswith("mkdir -p [OUTPUT_DIR]; conus " + " ".join(BIDS_HEAD))
    keys = {inp["value-key"] for inp in desc["inputs"]}
    tail = command.split("; ", 1)[1]
    assert sorted(re.findall(r"\[[A-Z_]+\]", tail)) == sorted(keys)
    assert [o["path-template"] for o in desc["output-files"]] == ["[OUTPUT_DIR]"]


def test_descriptor_mirrors_no_tool_option():
    """Options that exist only in the tools parser (demo/synth/train/finetune) stay out."""
    bids_dests = {a.dest for a in get_bids_parser()._actions}
    tool_dests: set[str] = set()
    for action in get_tools_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                tool_dests |= {a.dest for a in sub._actions}
    ids = {inp["id"] for inp in load_descriptor()["inputs"]}
    assert not (ids & (tool_dests - bids_dests))


def test_descriptor_error_codes_match_errors_module():
    codes = {c["code"] for c in load_descriptor()["error-codes"]}
    documented = {value for name, value in vars(errors).items() if name.startswith("EXIT_") and value != 0}
    assert codes == documented


def test_example_invocation_is_valid():
    result = subprocess.run([bosh_executable(), "invocation", str(DESCRIPTOR), "-i", str(INVOCATION)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# version everywhere


def test_version_is_the_same_everywhere(tmp_path, capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"conus {__version__}"

    desc = load_descriptor()
    assert desc["tool-version"] == __version__
    assert desc["container-image"]["image"].endswith(f":{__version__}")

    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert 'org.opencontainers.image.version="${CONUS_VERSION}"' in dockerfile
    # the build fails unless the label's build argument equals bids_app.__version__
    assert re.search(r'test "\$\(python -c .import bids_app; print\(bids_app.__version__\).\)" = '
                     r'"\$\{CONUS_VERSION\}"', dockerfile)
    assert 'CONUS_CONTAINER_IMAGE="conus:${CONUS_VERSION}"' in dockerfile

    bids = simple_dataset(tmp_path / "bids", subjects=("01",))
    generated = dataset_description(bids)["GeneratedBy"][0]
    assert generated["Name"] == "conus" and generated["Version"] == __version__


def test_dataset_description_records_the_container_image(tmp_path, monkeypatch):
    monkeypatch.setenv("CONUS_CONTAINER_IMAGE", f"conus:{__version__}")
    bids = simple_dataset(tmp_path / "bids", subjects=("01",))
    generated = dataset_description(bids)["GeneratedBy"][0]
    assert generated["Container"]["Tag"] == load_descriptor()["container-image"]["image"]


# --------------------------------------------------------------------------------------------
# bosh exec launch


SHIM = """#!{python}
# Test-only `conus`: the real command line, with the tests' threshold segmenter plugged into
# the participant level (the shipped models are not needed to test the descriptor).
import sys
sys.path.insert(0, {tests!r})
from fixtures import threshold_segmenter
from bids_app import pipeline
_real = pipeline.run_participant_level
pipeline.run_participant_level = lambda cfg, segment_fn=None, runs=None: _real(cfg, threshold_segmenter, runs)
from bids_app.cli import main
raise SystemExit(main())
"""


@pytest.fixture
def conus_on_path(tmp_path, monkeypatch) -> Path:
    """A `conus` executable first on PATH that runs the real CLI with the test segmenter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "conus"
    shim.write_text(SHIM.format(python=sys.executable, tests=str(TESTS)))
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return shim


def _launch(invocation: dict, path: Path) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(invocation))
    return subprocess.run([bosh_executable(), "exec", "launch", "--no-container", str(DESCRIPTOR), str(path)],
                          capture_output=True, text=True, timeout=300, cwd=path.parent)


def test_bosh_exec_launch_runs_participant_and_group_level(tmp_path, conus_on_path):
    bids = simple_dataset(tmp_path / "bids", subjects=("01", "02", "03"))
    out = bids / "derivatives" / "conus"
    invocation = json.loads(INVOCATION.read_text(encoding="utf-8"))
    invocation.update(bids_dir=str(bids), output_dir_name=str(out))   # labels 01 and sub-02

    result = _launch(invocation, tmp_path / "participant.json")
    assert result.returncode == 0, result.stdout + result.stderr

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Version"] == __version__
    for label in ("01", "02"):
        anat = out / f"sub-{label}" / "anat"
        mask_path = anat / f"sub-{label}_T2w_label-SC_seg.nii.gz"
        sidecar = json.loads((anat / f"sub-{label}_T2w_label-SC_seg.json").read_text())
        assert sidecar["CordFound"] is True
        assert sidecar["Sources"] == [bids_uri(bids / f"sub-{label}" / "anat" / f"sub-{label}_T2w.nii.gz", bids)]
        assert all((anat / name).is_file() for name in sidecar["Outputs"])
        mask = np.asarray(nib.load(mask_path).dataobj)
        reference = np.asarray(nib.load(bids / "derivatives" / "labels" / f"sub-{label}" / "anat"
                                        / f"sub-{label}_T2w_label-SC_seg.nii.gz").dataobj)
        assert np.array_equal(mask, reference)
    assert not (out / "sub-03").exists(), "a participant that was not asked for was processed"

    group = {"bids_dir": str(bids), "output_dir_name": str(out), "participant_level_analysis_dir": str(out),
             "analysis_level": "group", "skip_bids_validator": True}
    result = _launch(group, tmp_path / "group.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "group" / "metrics.tsv").is_file() and (out / "group" / "index.html").is_file()


def test_bosh_exec_launch_reports_conus_exit_codes(tmp_path, conus_on_path):
    bids = simple_dataset(tmp_path / "bids", subjects=("01",))
    invocation = {"bids_dir": str(bids), "output_dir_name": str(tmp_path / "out"), "analysis_level": "participant",
                  "participant_label": ["99"], "skip_bids_validator": True}
    result = _launch(invocation, tmp_path / "unknown.json")
    assert result.returncode == errors.EXIT_NO_MATCH, result.stdout + result.stderr
