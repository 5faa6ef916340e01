"""``conus demo OUTPUT_DIR``: a small synthetic BIDS dataset, segmented end to end.

Builds ``OUTPUT_DIR/bids`` (lumbosacral phantoms in random contrasts with their reference masks
and disc labels in ``derivatives/labels``; no external data needed), runs the participant level
into ``OUTPUT_DIR/bids/derivatives/conus`` with the shipped default models, then the group
level, and prints where to look.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bids_app.errors import EXIT_OK

DEMO_SUBJECTS = 3
DEMO_SEED = 2021


def build_demo_dataset(bids_dir: Path, n: int = DEMO_SUBJECTS, seed: int = DEMO_SEED) -> list[Path]:
    """Write the demo BIDS dataset: ``n`` lumbosacral phantoms (contrasts drawn per subject)."""
    from bids_app.synth.bids_writer import write_synthetic_bids

    return write_synthetic_bids(bids_dir, n=n, seed=seed, pam50_dir=None, region="lumbosacral")


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``conus demo``; returns the exit code of the participant level."""
    from bids_app.cli import main as conus_main

    out = Path(args.output_dir).absolute()
    bids_dir = out / "bids"
    derivatives = bids_dir / "derivatives" / "conus"
    if not (bids_dir / "participants.tsv").exists():
        print(f"conus demo: writing a synthetic BIDS dataset to {bids_dir}")
        build_demo_dataset(bids_dir)
    common = ["--n_cpus", str(getattr(args, "n_cpus", 1))]
    if getattr(args, "model", None):
        common += ["--model", str(args.model)]
    if getattr(args, "quiet", False):
        common.append("-q")
    code = conus_main([str(bids_dir), str(derivatives), "participant", "--split", *common])
    group_code = conus_main([str(bids_dir), str(derivatives), "group", *(["-q"] if "-q" in common else [])])
    print(f"\nconus demo finished (participant exit {code}, group exit {group_code}).\n"
          f"  dataset:      {bids_dir}\n"
          f"  masks:        {derivatives}/sub-*/anat/*_label-SC_seg.nii.gz\n"
          f"  QC pictures:  {derivatives}/sub-*/anat/*_desc-qc.png\n"
          f"  group report: {derivatives}/group/index.html (metrics.tsv, dice.png)")
    return code if code != EXIT_OK else group_code
