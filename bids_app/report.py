"""Group level: gather the participant-level reports into one table, one figure, one page.

Reads what is in the output folder (never a shared mutable file written at participant
level), so it can run while array tasks are still finishing: it reports what is there.

Outputs (``OUTPUT_DIR/group/``):
- ``metrics.tsv``: one row per run, then ``min``, ``max``, ``mean`` and ``median`` rows;
- ``dice.png``: per-run Dice as a box plot with the individual runs as points;
- ``index.html``: a table linking each run's QC picture.

``compare`` puts several conus output folders side by side (e.g. automatic vs reference
centerline, general vs lumbosacral model) in ``compare/metrics.tsv`` and ``compare/dice.png``.
"""

from __future__ import annotations

import html
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from bids_app.errors import InputMissingError
from bids_app.image_io import atomic_write_bytes, atomic_write_text

METRICS_SUFFIX = "_desc-metrics.json"
QC_SUFFIX = "_desc-qc.png"
SUMMARY_ROWS = ("min", "max", "mean", "median")


@dataclass(frozen=True)
class RunReport:
    """One run's metrics as read from its ``*_desc-metrics.json``."""

    run_id: str
    metrics_path: Path
    values: dict[str, float]
    qc_path: Path | None


def _flatten(prefix: str, obj: object, out: dict[str, float]) -> None:
    """Flatten nested dicts of numbers into ``a.b`` keys; non-numbers are ignored."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    elif isinstance(obj, bool):
        out[prefix] = float(obj)
    elif isinstance(obj, int | float):
        out[prefix] = float(obj)


def collect_run_reports(output_dir: Path) -> list[RunReport]:
    """Find every run's metrics file under ``output_dir`` (sorted by run identifier)."""
    reports = []
    for path in sorted(Path(output_dir).glob(f"sub-*/**/*{METRICS_SUFFIX}")):
        run_id = path.name[: -len(METRICS_SUFFIX)]
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        values: dict[str, float] = {}
        _flatten("", data.get("metrics", data), values)
        qc = path.with_name(run_id + QC_SUFFIX)
        reports.append(RunReport(run_id, path, values, qc if qc.exists() else None))
    return reports


def summary_rows(table: list[dict[str, float]], columns: list[str]) -> dict[str, dict[str, float]]:
    """Min, max, mean and median of each column over the runs, ignoring NaN and missing values."""
    rows: dict[str, dict[str, float]] = {name: {} for name in SUMMARY_ROWS}
    for column in columns:
        values = [row[column] for row in table if column in row and not math.isnan(row[column])]
        if not values:
            continue
        rows["min"][column] = min(values)
        rows["max"][column] = max(values)
        rows["mean"][column] = statistics.fmean(values)
        rows["median"][column] = statistics.median(values)
    return rows


def _format(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if not float(value).is_integer() else f"{int(value)}"


def metrics_tsv(run_ids: list[str], table: list[dict[str, float]], columns: list[str]) -> str:
    """The TSV text: one row per run then the summary rows."""
    lines = ["\t".join(["run", *columns])]
    for run_id, row in zip(run_ids, table, strict=True):
        lines.append("\t".join([run_id, *(_format(row.get(c)) for c in columns)]))
    for name, row in summary_rows(table, columns).items():
        lines.append("\t".join([name, *(_format(row.get(c)) for c in columns)]))
    return "\n".join(lines) + "\n"


def _dice_figure(groups: dict[str, list[float]], title: str) -> bytes:
    """A box plot per group with every run drawn as a point; returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3.0, 1.6 * len(groups) + 1.5), 4.0), dpi=100)
    names = list(groups)
    data = [groups[name] for name in names]
    if any(data):
        ax.boxplot([d if d else [math.nan] for d in data], widths=0.5, showfliers=False)
        for i, values in enumerate(data, start=1):
            offsets = [i + 0.08 * ((j % 5) - 2) for j in range(len(values))]
            ax.scatter(offsets, values, s=18, zorder=3)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=15)
    ax.set_ylabel("Dice")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _index_html(output_dir: Path, reports: list[RunReport], columns: list[str]) -> str:
    shown = [c for c in ("dice", "precision", "recall", "hd95_mm", "conus_tip_error_mm") if c in columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["run", *shown, "QC"])
    body = []
    for report in reports:
        cells = [f"<td>{html.escape(report.run_id)}</td>"]
        cells += [f"<td>{_format(report.values.get(c))}</td>" for c in shown]
        if report.qc_path is not None:
            link = html.escape(str(Path("..") / report.qc_path.relative_to(output_dir)))
            cells.append(f'<td><a href="{link}"><img src="{link}" height="120"></a></td>')
        else:
            cells.append("<td>none</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>conus group report</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 8px;border-bottom:1px solid #ddd}</style>"
        "</head><body><h1>conus group report</h1>"
        f"<p>{len(reports)} runs with metrics. <a href='metrics.tsv'>metrics.tsv</a> · "
        "<a href='dice.png'>dice.png</a></p>"
        f"<img src='dice.png'><table><tr>{head}</tr>{''.join(body)}</table></body></html>\n"
    )


def _columns(reports: list[RunReport]) -> list[str]:
    seen: dict[str, None] = {}
    for report in reports:
        for key in report.values:
            seen.setdefault(key, None)
    return list(seen)


def run_group_level(output_dir: Path) -> Path:
    """Write ``group/metrics.tsv``, ``group/dice.png`` and ``group/index.html``; return the folder."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise InputMissingError("output folder not found; run the participant level first", path=output_dir)
    reports = collect_run_reports(output_dir)
    columns = _columns(reports)
    group_dir = output_dir / "group"
    group_dir.mkdir(parents=True, exist_ok=True)
    table = [r.values for r in reports]
    atomic_write_text(group_dir / "metrics.tsv", metrics_tsv([r.run_id for r in reports], table, columns))
    dice = [r.values["dice"] for r in reports if "dice" in r.values]
    atomic_write_bytes(group_dir / "dice.png", _dice_figure({"conus": dice}, f"Dice over {len(dice)} runs"))
    atomic_write_text(group_dir / "index.html", _index_html(output_dir, reports, columns))
    return group_dir


def compare(output_dirs: list[Path], destination: Path, metric: str = "dice") -> Path:
    """Put several conus outputs side by side: one column per folder for ``metric``.

    Rows are runs (matched by run identifier), then the summary rows. Each folder is
    named by its last path component (made unique with its index when two collide).
    """
    names: list[str] = []
    per_dir: list[dict[str, float]] = []
    for index, folder in enumerate(output_dirs):
        folder = Path(folder)
        if not folder.is_dir():
            raise InputMissingError("output folder to compare not found", path=folder)
        name = folder.name or str(folder)
        names.append(name if name not in names else f"{name}_{index}")
        per_dir.append({r.run_id: r.values[metric] for r in collect_run_reports(folder) if metric in r.values})
    run_ids = sorted({run_id for values in per_dir for run_id in values})
    table = [{name: values[run_id] for name, values in zip(names, per_dir, strict=True) if run_id in values}
             for run_id in run_ids]
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    atomic_write_text(destination / "metrics.tsv", metrics_tsv(run_ids, table, names))
    groups = {name: list(values.values()) for name, values in zip(names, per_dir, strict=True)}
    atomic_write_bytes(destination / f"{metric}.png", _dice_figure(groups, f"{metric} by framework"))
    return destination
