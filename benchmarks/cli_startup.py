"""Start-up time of the command line (``conus --help``, ``conus --version``), which must stay fast.

    python benchmarks/cli_startup.py [--repeats 5]

Prints the median and worst wall time of each command over the repeats. TensorFlow and pybids
are imported lazily so that these stay well under 2 s on a quiet 2-core machine
(``tests/test_cli.py`` checks that neither is imported; this script measures the time).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """Time each command ``--repeats`` times and print one line per command; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    for command in (["--help"], ["--version"], ["train", "--help"]):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "bids_app", *command], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        print(f"conus {' '.join(command)}: median {statistics.median(times):.2f} s, worst {max(times):.2f} s "
              f"({args.repeats} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
