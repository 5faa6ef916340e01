"""Participant-level benchmark: seconds, peak RSS and the share of each stage per run.

Usage::

    python benchmarks/pipeline_benchmark.py [--work DIR] [--cases sagittal axial] [--seed 7]

Cases (procedural phantoms, no external data):

- ``sagittal``: a T2w of the shape of a real sagittal lumbar scan, 38 x 257 x 201 voxels at
  1 mm stored R-S-A (38 sagittal slices, 257 mm head-foot, 201 mm antero-posterior);
- ``axial``: a thick-slice axial T2w (~0.5 x 0.5 x 5 mm) of the lumbosacral cord.

Each case runs in a fresh Python process (``--worker``) that imports conus, loads the shipped
models (``models/``, or ``$CONUS_MODELS_DIR``), runs the participant level on a one-subject
BIDS dataset, and reports its own wall-clock time and peak RSS (``resource.getrusage``). The
stages come from the sidecar's ``Seconds`` (centerline, segmentation, postprocess; "other" is
the rest of the run: image loading and the writers: mask, metrics, morphometry, QC). Every call
of the networks is timed, and the pure forward time is measured again on a fixed batch, to
give the ratio inference / forward passes. Prints numbers only; asserts nothing.

Targets (issue 6, 2-core CPU): <= 20 s and <= 1.5 GB per run including model load, inference
no slower than 3x the forward passes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SAGITTAL_SHAPE_RSA = (38, 257, 201)
AXIAL_VOXEL = (0.5, 0.5, 5.0)
TARGET_SECONDS = 20.0
TARGET_GB = 1.5
TARGET_RATIO = 3.0


# --------------------------------------------------------------------------------------------
# data


def _fit_axis(data: np.ndarray, affine: np.ndarray, axis: int, size: int, centre_vox: float,
              fill: float) -> tuple[np.ndarray, np.ndarray]:
    """Crop or pad ``data`` along ``axis`` to ``size`` voxels centred on ``centre_vox``."""
    start = int(round(centre_vox - size / 2))
    before = max(0, -start)
    stop = start + size
    after = max(0, stop - data.shape[axis])
    pad = [(0, 0)] * 3
    pad[axis] = (before, after)
    data = np.pad(data, pad, constant_values=fill)
    index = [slice(None)] * 3
    index[axis] = slice(start + before, start + before + size)
    affine = affine.copy()
    affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * start
    return data[tuple(index)], affine


def sagittal_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, cord, affine) of a 38 x 257 x 201 sagittal T2w at 1 mm, stored R-S-A."""
    from bids_app.synth import generate_sample
    from bids_app.synth.bids_writer import reorient_sample

    s = generate_sample(seed, source="phantom", region="thoracolumbar", contrast="T2w",
                        acquisition="sagittal", spacing=(1.0, 1.0, 1.0))
    image, cord, affine = s.image, s.cord, s.affine
    inv = np.linalg.inv(affine)
    mid = s.centerline_mm[len(s.centerline_mm) // 2]
    centre = mid @ inv[:3, :3].T + inv[:3, 3]
    centre[1] += 30.0 / affine[1, 1]       # field of view centred in front of the canal
    fill = float(np.percentile(image, 1.0))
    ras_shape = (SAGITTAL_SHAPE_RSA[0], SAGITTAL_SHAPE_RSA[2], SAGITTAL_SHAPE_RSA[1])
    for axis, size in enumerate(ras_shape):
        image, new_affine = _fit_axis(image, affine, axis, size, centre[axis], fill)
        cord, _ = _fit_axis(cord, affine, axis, size, centre[axis], 0)
        affine = new_affine
    perm, flips = np.array([0, 2, 1]), np.zeros(3, bool)
    image_rsa, affine_rsa = reorient_sample(image, affine, perm, flips)
    cord_rsa, _ = reorient_sample(cord, affine, perm, flips)
    return image_rsa, cord_rsa, affine_rsa


def axial_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, cord, affine) of an axial thick-slice T2w of the lumbosacral cord at
    :data:`AXIAL_VOXEL` (rendered on that grid after a simulated axial acquisition); the slab
    of the first seed from ``seed`` on that shows the cord is used."""
    from bids_app.synth import generate_sample

    for attempt in range(seed, seed + 50):   # the first seed whose slab holds >= 5 slices of cord
        s = generate_sample(attempt, source="phantom", region="lumbosacral", contrast="T2w",
                            acquisition="axial", spacing=AXIAL_VOXEL)
        if np.count_nonzero(s.cord.any(axis=(0, 1))) >= 5:
            return s.image, s.cord, s.affine
    raise RuntimeError(f"no axial phantom with the cord in view for seeds {seed}..{seed + 49}")


def write_case(root: Path, image: np.ndarray, cord: np.ndarray, affine: np.ndarray) -> Path:
    """A one-subject BIDS dataset (T2w + reference mask) at ``root``."""
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    desc = {"Name": "conus benchmark", "BIDSVersion": "1.9.0", "DatasetType": "raw"}
    (root / "dataset_description.json").write_text(json.dumps(desc))
    (root / "participants.tsv").write_text("participant_id\nsub-01\n")
    labels = root / "derivatives" / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    (labels / "dataset_description.json").write_text(json.dumps(
        {**desc, "Name": "labels", "DatasetType": "derivative", "GeneratedBy": [{"Name": "synth"}]}))
    for folder, data, name, dtype in ((root, image, "sub-01_T2w.nii.gz", np.float32),
                                      (labels, cord, "sub-01_T2w_label-SC_seg.nii.gz", np.uint8)):
        (folder / "sub-01" / "anat").mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, folder / "sub-01" / "anat" / name)
    return root


# --------------------------------------------------------------------------------------------
# worker: one run in a fresh process


def _forward_seconds(fn, patch, repeats: int = 3, batch: int = 4) -> float:
    """Median seconds of one forward call on a batch of ``batch`` random patches."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, *patch, 1), dtype=np.float32)
    fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def worker(bids: Path, out: Path) -> dict:
    """Run the participant level on ``bids`` in this process; return the measurements."""
    t_start = time.perf_counter()
    from bids_app import cli, inference, pipeline

    t_import = time.perf_counter() - t_start
    calls: dict[str, list[tuple[int, float]]] = {"centerline": [], "segmentation": []}

    class TimedModels(inference.Models):
        """Models whose batch predictors record (batch size, seconds) of every call."""

        def predict_fn(self, which: str):
            fn = super().predict_fn(which)

            def timed(batch):
                t = time.perf_counter()
                result = fn(batch)
                calls[which].append((len(batch), time.perf_counter() - t))
                return result

            return timed

    cfg = cli.config_from_args(cli.get_bids_parser().parse_args([str(bids), str(out), "participant", "-q"]))
    options = pipeline.inference_options(cfg)
    t = time.perf_counter()
    models = TimedModels(options)
    models.predict_fn("segmentation")
    models.predict_fn("centerline")
    t_load = time.perf_counter() - t

    def segment(loaded, cfg, reference=None):
        return inference.segment_image(loaded, options, reference=reference, models=models)

    segment.model_info = {"name": "benchmark", "sha256": "+".join(
        b["sha256"] for b in models.info().values())}
    t = time.perf_counter()
    summary = pipeline.run_participant_level(cfg, segment)
    t_run = time.perf_counter() - t
    wall = time.perf_counter() - t_start
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2   # KiB -> GiB
    sidecar = json.loads(next(out.glob("sub-01/anat/*_label-SC_seg.json")).read_text())
    metrics = json.loads(next(out.glob("sub-01/anat/*_desc-metrics.json")).read_text())
    in_run = {which: list(c) for which, c in calls.items()}
    forward = {}
    for which in ("centerline", "segmentation"):
        bundle = getattr(models, which)
        per_batch = _forward_seconds(models.predict_fn(which), bundle.patch_size)
        windows = sum(n for n, _ in in_run[which])
        forward[which] = {"windows": windows, "batches": len(in_run[which]),
                          "seconds_in_run": sum(s for _, s in in_run[which]),
                          "seconds_per_batch_of_4": per_batch, "pure_forward_seconds": per_batch * windows / 4}
    return {"exit_code": summary.exit_code, "wall_s": wall, "import_s": t_import, "model_load_s": t_load,
            "run_s": t_run, "peak_rss_gb": rss_gb, "stages": sidecar.get("Seconds", {}), "forward": forward,
            "dice": metrics.get("metrics", {}).get("dice"), "cord_found": sidecar.get("CordFound")}


# --------------------------------------------------------------------------------------------
# report


def _print_case(name: str, shape, spacing, r: dict) -> None:
    st = r["stages"]
    cl, seg, post = (float(st.get(k, 0.0)) for k in ("centerline", "segmentation", "postprocess"))
    run_total = float(st.get("total", r["run_s"]))
    other = max(0.0, run_total - cl - seg - post)
    wall = r["wall_s"]
    rows = [("python + conus imports", r["import_s"]), ("model load (2 bundles, TF import)", r["model_load_s"]),
            ("centerline", cl), ("segmentation (crop + sliding window)", seg), ("postprocess", post),
            ("load image + writers (mask, metrics, QC...)", other)]
    print(f"\n== {name}: {tuple(shape)} voxels at {tuple(round(float(v), 2) for v in spacing)} mm ==")
    print(f"  exit {r['exit_code']}, cord found {r['cord_found']}, Dice vs phantom {r['dice']}")
    print(f"  wall {wall:.1f} s (target <= {TARGET_SECONDS:.0f}), peak RSS {r['peak_rss_gb']:.2f} GiB "
          f"(target <= {TARGET_GB})")
    for label, sec in rows:
        print(f"    {label:45s} {sec:7.2f} s  {100 * sec / wall:5.1f} %")
    infer = cl + seg
    fwd = sum(f["pure_forward_seconds"] for f in r["forward"].values())
    for which, f in r["forward"].items():
        print(f"    forward {which:13s}: {f['windows']} windows in {f['batches']} batches, "
              f"{f['seconds_in_run']:.2f} s in the run; pure {f['seconds_per_batch_of_4']:.2f} s per batch of 4 "
              f"-> {f['pure_forward_seconds']:.2f} s")
    if fwd > 0:
        print(f"  inference (centerline + segmentation) / pure forward = {infer:.2f} / {fwd:.2f} = "
              f"{infer / fwd:.2f}x (target <= {TARGET_RATIO:.0f}x)")


def main(argv=None) -> int:
    """Build the cases, run each in a fresh process, print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary folder)")
    parser.add_argument("--cases", nargs="+", default=["sagittal", "axial"], choices=["sagittal", "axial"])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("BIDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="conus-bench-"))
    print(f"conus pipeline benchmark in {work}; models: {os.environ.get('CONUS_MODELS_DIR') or 'models/'}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    builders = {"sagittal": sagittal_case, "axial": axial_case}
    for name in args.cases:
        image, cord, affine = builders[name](args.seed)
        bids = write_case(work / name / "bids", image, cord, affine)
        out = work / name / "out"
        proc = subprocess.run([sys.executable, __file__, "--worker", str(bids), str(out)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"\n== {name}: worker failed (exit {proc.returncode}) ==\n{proc.stderr[-3000:]}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        _print_case(name, image.shape, spacing, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
