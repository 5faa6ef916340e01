"""The ``conus`` command line: the BIDS App form and the tools (demo, synth, train, finetune).

``conus BIDS_DIR OUTPUT_DIR {participant,group} [options]`` follows the BIDS Apps contract;
``conus demo|synth|train|finetune ...`` are tools whose implementations live in other modules
and are imported only when the tool runs. :func:`main` routes on the first word.

Exit codes (also in the README): 0 ok; 1 at least one run failed; 16 BIDS validation failed;
17 unknown analysis level; 18 filters matched nothing (or unknown participant/session);
64 usage error (argparse errors included, never 2); 65 bad data; 66 input missing;
73 cannot create output; 74 I/O error.

Only this module turns exceptions into exit codes. Nothing here imports TensorFlow or pybids
at import time, so ``conus --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from bids_app import __version__
from bids_app.config import DEFAULT_CONTRASTS, DEFAULT_OVERLAP, DEFAULT_SPLIT_LEVEL, ParticipantConfig
from bids_app.errors import (
    EXIT_OK,
    ConusError,
    InputMissingError,
    UnknownAnalysisLevelError,
    UsageError,
)
from bids_app.synth.features import ABLATIONS

LOG = logging.getLogger("conus")
ANALYSIS_LEVELS = ("participant", "group")
TOOLS = ("demo", "synth", "train", "finetune")
CONTRASTS = ("T2w", "T1w", "T2starw")
ENGINE_VARIANTS = tuple(ABLATIONS)
CROP_REGIONS = ("cervical", "thoracic", "lumbosacral", "below_conus")   # bids_app.synth.generator's
SPLIT_LEVEL_RE = re.compile(r"^[CTLS][0-9]{1,2}-[CTLS][0-9]{1,2}$")

#: tool name -> (module, function) called with the parsed argparse namespace; returns an exit code.
TOOL_ENTRY_POINTS = {
    "demo": ("bids_app.demo", "run_demo"),
    "synth": ("bids_app.synth.bids_writer", "main_synth"),
    "train": ("bids_app.training.train", "main_train"),
    "finetune": ("bids_app.training.finetune", "main_finetune"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors raised as :class:`UsageError` (exit 64), never exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: {message}")


# --------------------------------------------------------------------------------------------
# argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _overlap(text: str) -> float | int:
    """A fraction of the patch in [0, 1) (``0.5``) or a whole number of voxels (``3``)."""
    try:
        if re.fullmatch(r"[0-9]+", text):
            return int(text)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fractional overlap must be in [0, 1)")
    return value


def _split_level(text: str) -> str:
    if not SPLIT_LEVEL_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a disc name such as T9-T10 or T12-L1")
    return text


def _model_names(role: str = "segmentation") -> list[str]:
    """Shipped bundle names for ``role`` (empty when the registry is not installed)."""
    try:
        registry = importlib.import_module("bids_app.registry")
    except ImportError:
        return []
    return list(registry.bundle_names(role))


def _model_of(role: str):
    def parse(text: str) -> str:
        """A shipped bundle name for ``role`` or an existing bundle folder."""
        names = _model_names(role)
        if text in names or Path(text).exists():
            return text
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a shipped {role} model ({', '.join(names) or 'none installed'}) "
            "nor an existing path")

    return parse


_model = _model_of("segmentation")
_centerline_model = _model_of("centerline")


# --------------------------------------------------------------------------------------------
# parsers


def get_bids_parser() -> ArgumentParser:
    """The BIDS App parser: ``conus BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

    This is the only parser mirrored by the Boutiques descriptor.
    """
    parser = ArgumentParser(
        prog="conus",
        description="conus: spinal cord segmentation down to the conus medullaris (BIDS App). "
        "Tools: conus demo|synth|train|finetune --help.",
        epilog="Exit codes: 0 ok, 1 a run failed, 16 BIDS invalid, 17 unknown analysis level, "
        "18 nothing matched, 64 usage, 65 bad data, 66 input missing, 73 cannot create output, 74 I/O error.",
    )
    parser.add_argument("bids_dir", type=Path, help="root folder of a BIDS dataset")
    parser.add_argument("output_dir", type=Path,
                        help="output folder (e.g. BIDS_DIR/derivatives/conus; never inside the raw data)")
    parser.add_argument("analysis_level", metavar="{participant,group}",
                        help="participant: segment each run; group: gather the participant reports")
    bids = parser.add_argument_group("BIDS selection")
    bids.add_argument("--participant_label", "--participant-label", nargs="+", default=[], metavar="LABEL",
                      help="participants to process ('01' or 'sub-01'); default: all")
    bids.add_argument("--session_label", "--session-label", nargs="+", default=[], metavar="LABEL",
                      help="sessions to process ('a' or 'ses-a'); default: all")
    bids.add_argument("--bids-filter-file", "--bids_filter_file", type=Path, metavar="FILE",
                      help="JSON pybids entity filters, flat or keyed by contrast")
    bids.add_argument("--contrast", nargs="+", choices=CONTRASTS, default=list(DEFAULT_CONTRASTS),
                      help="image suffixes to segment (default: %(default)s)")
    bids.add_argument("--skip_bids_validator", "--skip-bids-validator", action="store_true",
                      help="do not run bids-validator-deno on BIDS_DIR")
    bids.add_argument("--reference-dir", "--reference_dir", type=Path, metavar="DIR",
                      help="folder with reference masks / disc labels (default: BIDS_DIR/derivatives/labels)")
    run = parser.add_argument_group("processing")
    run.add_argument("--model", type=_model, metavar="NAME_OR_PATH",
                     help=f"segmentation model: a shipped name ({', '.join(_model_names()) or 'none'}) "
                     "or a bundle folder (default: the best shipped model)")
    run.add_argument("--centerline-model", "--centerline_model", type=_centerline_model, metavar="NAME_OR_PATH",
                     help=f"centerline model for --centerline auto: a shipped name "
                     f"({', '.join(_model_names('centerline')) or 'none'}) or a bundle folder (default: the "
                     "shipped default); a spine bundle here also gives --levels auto its discs")
    run.add_argument("--centerline", choices=("auto", "reference"), default="auto",
                     help="auto: model + global fit; reference: from the reference mask (default: %(default)s)")
    run.add_argument("--centerline-file", "--centerline_file", type=Path, metavar="FILE",
                     help="a centerline mask or points file to use instead (overrides --centerline)")
    run.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    run.add_argument("--overlap", type=_overlap, default=DEFAULT_OVERLAP,
                     help="sliding-window overlap: fraction of the patch (0.5) or voxels (3); default %(default)s")
    run.add_argument("--levels", choices=("none", "labels", "auto"), default="labels",
                     help="vertebral levels: none, from disc labels when present, or detected (default: %(default)s)")
    run.add_argument("--split", action="store_true", help="split the cord into cervicothoracic / lumbosacral")
    run.add_argument("--split-level", "--split_level", type=_split_level, default=DEFAULT_SPLIT_LEVEL,
                     help="disc at which to split (default: %(default)s)")
    run.add_argument("--lumbosacral-model", "--lumbosacral_model", type=_model, metavar="NAME_OR_PATH",
                     help="region-aware segmentation: segment the cord below the split disc (--split-level, from the run's disc labels) with this segmentation model and above it with --model, blended over 5 mm on either side of the split plane (default: none, one model throughout; the shipped lumbosacral specialist is seg-lumbosacral)")
    run.add_argument("--compare", nargs="+", type=Path, default=[], metavar="OUT",
                     help="group level: conus output folders to put side by side")
    ex = parser.add_argument_group("execution")
    ex.add_argument("--n_cpus", "--n-cpus", type=_positive_int, default=1,
                    help="runs processed in parallel worker processes (default: %(default)s)")
    ex.add_argument("--work-dir", "--work_dir", "-w", type=Path, metavar="DIR", help="folder for temporary files")
    ex.add_argument("--overwrite", action="store_true", help="recompute runs whose outputs are up to date")
    ex.add_argument("--dry-run", "--dry_run", action="store_true",
                    help="list the runs, reference masks and disc labels found; write nothing")
    ex.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    ex.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bar")
    ex.add_argument("--version", action="version", version=f"conus {__version__}")
    return parser


def _add_common_tool_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def get_tools_parser() -> ArgumentParser:
    """Parser for ``conus demo|synth|train|finetune ...``."""
    parser = ArgumentParser(prog="conus", description="conus tools (the BIDS App form is "
                            "'conus BIDS_DIR OUTPUT_DIR {participant,group}')")
    parser.add_argument("--version", action="version", version=f"conus {__version__}")
    sub = parser.add_subparsers(dest="tool", required=True, metavar="{demo,synth,train,finetune}",
                                parser_class=ArgumentParser)

    demo = sub.add_parser("demo", help="build a small synthetic dataset and run conus on it")
    demo.add_argument("output_dir", type=Path, help="folder for the demo dataset and its results")
    demo.add_argument("--model", type=_model, help="segmentation model (default: the best shipped model)")
    demo.add_argument("--n_cpus", "--n-cpus", type=_positive_int, default=1)
    _add_common_tool_options(demo)

    synth = sub.add_parser("synth", help="write a synthetic BIDS dataset with reference labels")
    synth.add_argument("output_dir", type=Path, help="BIDS dataset to create")
    synth.add_argument("--n", type=_positive_int, default=10, help="number of subjects (default: %(default)s)")
    synth.add_argument("--pam50", type=Path, metavar="DIR",
                       help="PAM50 template folder (default: $SCT_DIR/data/PAM50/template when present)")
    synth.add_argument("--source", choices=("pam50", "phantom"), default=None,
                       help="label-map source (default: pam50 when a template is found, else phantom)")
    synth.add_argument("--region", nargs="+", default=None,
                       help="fields of view to draw from (e.g. whole cervical thoracic lumbosacral)")
    synth.add_argument("--contrast", nargs="+", choices=(*CONTRASTS, "random"), default=None,
                       help="contrasts to draw from (random: T2w, T1w, T2starw)")
    synth.add_argument("--strength", type=float, default=1.0,
                       help="deformation/size range (1 = the training ranges, > 1 beyond them; "
                            "default: %(default)s)")
    _add_common_tool_options(synth)

    for name, helptext in (("train", "train a model bundle"), ("finetune", "fine-tune a bundle on labelled data")):
        tool = sub.add_parser(name, help=helptext)
        if name == "train":
            source = tool.add_mutually_exclusive_group(required=True)
            source.add_argument("--synthetic", action="store_true", help="train on the synthetic engine")
            source.add_argument("--data", type=Path, metavar="BIDS_DIR",
                                help="train on images + derivatives/labels masks")
            tool.add_argument("--pam50", type=Path, metavar="DIR", help="PAM50 template folder")
            tool.add_argument("--task", choices=("segmentation", "centerline", "spine"), default="segmentation",
                              help="segmentation (fine crops), centerline (coarse cord heatmap) or spine "
                                   "(coarse cord + disc + C2/sacrum heatmaps)")
            tool.add_argument("--architecture", default=None, help="network architecture name")
            tool.add_argument("--regions", nargs="+", choices=CROP_REGIONS, default=None,
                              help="synthetic crops only from these regions, drawn uniformly (a region "
                                   "named twice comes twice as often), for a specialist model, e.g. "
                                   "lumbosacral lumbosacral below_conus; the monitored validation follows; "
                                   "default: the engine's mix)")
            tool.add_argument("--engine", choices=ENGINE_VARIANTS, default="default",
                              help="synthetic engine variant: the default engine (every realism feature "
                                   "the ablation kept), full (also scanner artefacts: the engine of the "
                                   "models shipped before the ablation), or one feature off the full "
                                   "engine (ablations; default: %(default)s)")
            tool.add_argument("--loss-weights", type=float, nargs="+", default=None, metavar="W",
                              help="one loss weight per output (spine: cord discs anchors), on its Dice "
                                   "and BCE terms, to push a rare output (default: all 1)")
            tool.add_argument("--init-from", default=None, metavar="MODEL",
                              help="start from this bundle's weights (layers of the same name and shape; "
                                   "an output layer with more channels keeps the bundle's first ones)")
        else:
            tool.add_argument("--from", dest="from_model", required=True, metavar="MODEL",
                              help="shipped model name or bundle folder to start from")
            tool.add_argument("--data", type=Path, required=True, metavar="BIDS_DIR",
                              help="BIDS dataset with derivatives/labels cord masks")
            tool.add_argument("--preset", choices=("thesis",), default="thesis",
                              help="fine-tuning recipe (default: %(default)s)")
        tool.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle folder to write")
        tool.add_argument("--name", default=None, help="bundle name (default: the folder name)")
        tool.add_argument("--steps", type=_positive_int, default=None, help="training steps per epoch")
        tool.add_argument("--epochs", type=_positive_int, default=None, help="number of epochs")
        tool.add_argument("--batch-size", type=_positive_int, default=None)
        tool.add_argument("--lr", type=float, default=None,
                          help="learning rate (with --resume: restart the schedule from this rate)")
        tool.add_argument("--schedule", choices=("plateau", "cosine"), default=None,
                          help="learning-rate schedule: halve on a validation plateau, or cosine decay "
                               "to the end of --max-minutes")
        tool.add_argument("--keep-best", action="store_true",
                          help="export the epoch with the best validation Dice instead of the last one")
        tool.add_argument("--max-minutes", type=float, default=None, help="stop after this wall-clock time")
        tool.add_argument("--resume", action="store_true", help="resume from the checkpoints in --run-dir")
        tool.add_argument("--run-dir", type=Path, default=None, metavar="DIR",
                          help="checkpoints and logs (default: runs/<name>)")
        tool.add_argument("--workers", type=int, default=None,
                          help="processes generating training patches (default: 1)")
        tool.add_argument("--threads", type=_positive_int, default=None,
                          help="TensorFlow intra-op threads (default: 2)")
        _add_common_tool_options(tool)
    return parser


# --------------------------------------------------------------------------------------------
# from arguments to configuration


def _normalise_labels(labels: Sequence[str], prefix: str) -> tuple[str, ...]:
    from bids_app.bids_io import normalise_label

    out: list[str] = []
    for label in labels:
        bare = normalise_label(label, prefix)
        if bare not in out:
            out.append(bare)
    return tuple(out)


def config_from_args(args: argparse.Namespace) -> ParticipantConfig:
    """Check the parsed BIDS App arguments and build the immutable configuration.

    Raises UnknownAnalysisLevelError (17), UsageError (64) or InputMissingError (66).
    """
    if args.analysis_level not in ANALYSIS_LEVELS:
        raise UnknownAnalysisLevelError(
            f"unknown analysis level {args.analysis_level!r}; choose one of {', '.join(ANALYSIS_LEVELS)}")
    filters: dict = {}
    if args.bids_filter_file is not None:
        from bids_app.bids_io import load_filter_file

        filters = load_filter_file(args.bids_filter_file)
    for option, path in (("--reference-dir", args.reference_dir), ("--centerline-file", args.centerline_file)):
        if path is not None and not Path(path).exists():
            raise InputMissingError(f"{option} not found", path=path)
    return ParticipantConfig(
        bids_dir=Path(args.bids_dir).absolute(),
        output_dir=Path(args.output_dir).absolute(),
        analysis_level=args.analysis_level,
        participant_labels=_normalise_labels(args.participant_label, "sub-"),
        session_labels=_normalise_labels(args.session_label, "ses-"),
        bids_filter_file=args.bids_filter_file,
        bids_filters=filters,
        contrasts=tuple(dict.fromkeys(args.contrast)),
        n_cpus=args.n_cpus,
        work_dir=None if args.work_dir is None else Path(args.work_dir).absolute(),
        skip_bids_validator=args.skip_bids_validator,
        overwrite=args.overwrite,
        verbosity=-1 if args.quiet else args.verbose,
        reference_dir=None if args.reference_dir is None else Path(args.reference_dir).absolute(),
        dry_run=args.dry_run,
        model=args.model,
        centerline_model=args.centerline_model,
        centerline=args.centerline,
        centerline_file=None if args.centerline_file is None else Path(args.centerline_file).absolute(),
        tta=args.tta,
        overlap=args.overlap,
        levels=args.levels,
        split=args.split,
        split_level=args.split_level,
        lumbosacral_model=args.lumbosacral_model,
        compare=tuple(Path(p).absolute() for p in args.compare),
    )


def configure_logging(verbosity: int) -> None:
    """Log to stderr: WARNING with -q, INFO by default, DEBUG with -v."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s conus %(levelname)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("conus")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# --------------------------------------------------------------------------------------------
# running


def format_dry_run(cfg: ParticipantConfig, runs) -> str:
    """Human-readable list of runs with their reference files and planned outputs."""
    from bids_app.bids_io import bids_uri
    from bids_app.derivatives import output_paths

    lines = [f"{len(runs)} run(s) in {cfg.bids_dir} (dry run: nothing written)"]
    n_ref = sum(r.reference_mask is not None for r in runs)
    n_disc = sum(r.disc_labels is not None for r in runs)
    for run in runs:
        lines.append(f"{run.run_id}")
        lines.append(f"    image:     {bids_uri(run.path, cfg.bids_dir)}")
        lines.append(f"    reference: {bids_uri(run.reference_mask, cfg.bids_dir) if run.reference_mask else 'none'}")
        lines.append(f"    discs:     {bids_uri(run.disc_labels, cfg.bids_dir) if run.disc_labels else 'none'}")
        lines.append(f"    output:    {output_paths(cfg.output_dir, run).mask}")
    lines.append(f"{len(runs)} run(s), {n_ref} reference mask(s), {n_disc} disc label file(s)")
    return "\n".join(lines)


def run_bids_app(cfg: ParticipantConfig) -> int:
    """Run the BIDS App form once the configuration is built; returns the exit code."""
    from bids_app import bids_io, derivatives, pipeline

    derivatives.check_output_dir(cfg.bids_dir, cfg.output_dir)
    if cfg.analysis_level == "group":
        return pipeline.run_group_level(cfg)
    bids_io.check_dataset(cfg.bids_dir)
    if not cfg.skip_bids_validator:
        report = bids_io.validate_dataset(cfg.bids_dir)
        LOG.debug("BIDS validator:\n%s", report)
    if cfg.dry_run:
        runs = bids_io.find_runs(cfg)
        print(format_dry_run(cfg, runs))
        return EXIT_OK
    derivatives.prepare_output_dir(cfg.output_dir)
    summary = pipeline.run_participant_level(cfg)
    return summary.exit_code


def run_tool(argv: Sequence[str]) -> int:
    """Parse and run ``conus demo|synth|train|finetune ...`` (implementations imported lazily)."""
    args = get_tools_parser().parse_args(list(argv))
    args.argv = ["conus", *argv]
    configure_logging(-1 if args.quiet else args.verbose)
    module_name, function_name = TOOL_ENTRY_POINTS[args.tool]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UsageError(f"'conus {args.tool}' is not available in this installation "
                             f"(module {module_name} is missing)") from exc
        raise
    code = getattr(module, function_name)(args)
    return EXIT_OK if code is None else int(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``conus`` and ``python -m bids_app``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in TOOLS:
            return run_tool(argv)
        args = get_bids_parser().parse_args(argv)
        configure_logging(-1 if args.quiet else args.verbose)
        cfg = config_from_args(args)
        LOG.debug("configuration: %s", json.dumps(cfg.as_dict(), default=str))
        return run_bids_app(cfg)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except ConusError as exc:
        print(f"conus: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("conus: interrupted", file=sys.stderr)
        return 130
