"""Throughput of the synthetic engine on this CPU (samples per second, one process).

    python benchmarks/synth_throughput.py [--pam50 DIR] [--n-crops 40] [--n-samples 6]

Prints samples/s (wall and CPU time) for ``generate_crop`` (64x64x48 at 0.5x0.5x1 mm) and
``generate_sample`` (native acquisition grid, and a coarse 1.5 mm view), for the phantom
and, when ``--pam50`` is given, for PAM50.  Template construction (first call) is timed
separately and excluded from the rates.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _rate(fn, n: int) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    w, c = time.perf_counter() - w, time.process_time() - c
    return n / w, n / c


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per measurement; returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pam50", type=Path, default=None)
    ap.add_argument("--n-crops", type=int, default=40)
    ap.add_argument("--n-samples", type=int, default=6)
    args = ap.parse_args(argv)

    from bids_app.synth import generate_crop, generate_sample

    sources = ["phantom"] + (["pam50"] if args.pam50 else [])
    for src in sources:
        t = time.perf_counter()
        generate_crop(10**6, source=src, pam50_dir=args.pam50)
        print(f"[{src}] first call (template build or cache load): {time.perf_counter() - t:.1f} s")
        wall, cpu = _rate(lambda i, src=src: generate_crop(i, source=src, pam50_dir=args.pam50), args.n_crops)
        print(f"[{src}] generate_crop 64x64x48 @0.5x0.5x1 mm: {wall:.2f} samples/s wall, {cpu:.2f} samples/s per CPU-core")
        wall, cpu = _rate(lambda i, src=src: generate_sample(i, source=src, pam50_dir=args.pam50), args.n_samples)
        print(f"[{src}] generate_sample native grid (random region/acquisition): {wall:.3f} samples/s wall, {cpu:.3f} per core")
        wall, cpu = _rate(lambda i, src=src: generate_sample(i, source=src, pam50_dir=args.pam50,
                                                             spacing=(1.5, 1.5, 1.5)), args.n_samples)
        print(f"[{src}] generate_sample coarse 1.5 mm view: {wall:.3f} samples/s wall, {cpu:.3f} per core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
