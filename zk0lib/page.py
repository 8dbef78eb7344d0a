"""`zk0 report FOLDER`: one HTML page of everything under a reports folder, readable with no network.

The page (FOLDER/index.html) holds the dataset checks notebook 01 wrote, the results table of every run
found under the folder, the closed-loop success of the starting model against the final one, each
run's per-round table, and its charts drawn to inline SVG by vl-convert (no browser, no CDN). Videos
are <video> elements pointing at the runs' mp4 files by relative path, so the folder can be moved
or zipped whole. Nothing is re-run: it is all read from the files.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from zk0lib import report
from zk0lib.runs import RunRecord, atomic_write_text, find_runs, utc_now

MAX_VIDEOS_PER_RUN = 12

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2rem; }
.meta { color: #666; font-size: 0.9rem; }
table { border-collapse: collapse; font-size: 0.82rem; margin: 0.5rem 0 1rem; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 0.2rem 0.45rem; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.chart { display: inline-block; margin: 0.4rem 1rem 0.4rem 0; max-width: 100%; overflow-x: auto; }
.chart svg { max-width: 100%; height: auto; }
.videos { display: flex; flex-wrap: wrap; gap: 0.8rem; }
.videos figure { margin: 0; } .videos figcaption { font-size: 0.75rem; color: #555; }
details { margin: 0.6rem 0; } summary { cursor: pointer; font-weight: 600; }
"""


def chart_svg(chart: Any) -> str:
    """An Altair chart (or a Vega-Lite spec dict) as an SVG string, drawn by vl-convert offline."""
    import vl_convert

    spec = chart if isinstance(chart, dict) else chart.to_dict()
    return vl_convert.vegalite_to_svg(spec)


def _chart(chart: Any, name: str) -> str:
    try:
        svg = chart_svg(chart)
    except Exception as e:  # noqa: BLE001 - one chart that cannot be drawn should not lose the page
        return f"<p>chart {html.escape(name)} could not be drawn: {html.escape(str(e)[:200])}</p>"
    return f'<div class="chart" data-chart="{html.escape(name)}">{svg}</div>'


def _table(df: pd.DataFrame, max_rows: int = 200) -> str:
    if df is None or df.empty:
        return "<p><em>nothing recorded</em></p>"
    shown = df.head(max_rows).copy()
    for col in shown.select_dtypes(include="object").columns:  # None (a field that does not apply) shows empty
        shown[col] = shown[col].map(lambda v: "" if v is None else v)
    text = shown.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0, escape=True)
    more = f"<p>... and {len(df) - max_rows} more rows</p>" if len(df) > max_rows else ""
    return text + more


def _videos(paths: list[Path], page_dir: Path) -> str:
    items = []
    for p in paths[:MAX_VIDEOS_PER_RUN]:
        rel = Path(os.path.relpath(p, page_dir)).as_posix()
        items.append(
            f'<figure><video controls preload="metadata" width="360" src="{html.escape(rel)}"></video>'
            f"<figcaption>{html.escape(p.name)}</figcaption></figure>"
        )
    more = (
        f"<p>... and {len(paths) - MAX_VIDEOS_PER_RUN} more under the run's videos/</p>"
        if len(paths) > MAX_VIDEOS_PER_RUN
        else ""
    )
    return f'<div class="videos">{"".join(items)}</div>{more}' if items else ""


def _datasets_section(root: Path) -> str:
    """What notebook 01 wrote (clients.csv, validation.csv, decoding.csv, episode charts), per folder."""
    parts = []
    for clients_csv in sorted(root.rglob("clients.csv")):
        folder = clients_csv.parent
        parts.append(f"<h3>{html.escape(folder.relative_to(root).as_posix() or '.')}</h3>")
        clients = pd.read_csv(clients_csv)
        parts.append(_table(clients.drop(columns="root", errors="ignore")))
        findings = folder / "validation.csv"
        if findings.exists():
            df = pd.read_csv(findings)
            counts = df["severity"].value_counts().to_dict() if "severity" in df else {}
            said = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no findings"
            parts.append(f"<p>validation: {html.escape(said)}</p>")
            parts.append(_table(df.drop(columns="fix", errors="ignore"), max_rows=40))
        decoding = folder / "decoding.csv"
        if decoding.exists():
            parts.append("<p>video decoding check</p>" + _table(pd.read_csv(decoding)))
        for spec in sorted(folder.glob("*.vl.json")):
            parts.append(_chart(json.loads(spec.read_text()), spec.name.removesuffix(".vl.json")))
    if not parts:
        return ""
    return "<h2>Datasets (notebook 01)</h2>" + "".join(parts)


def _run_section(run: RunRecord, page_dir: Path) -> str:
    parts = []
    evals = report.eval_frame(run)
    if not evals.empty:
        parts.append(_chart(report.eval_chart(evals, "loss"), f"{run.run_id}: held-out loss"))
        if "action_mae" in evals:
            parts.append(_chart(report.eval_chart(evals, "action_mae"), f"{run.run_id}: action error"))
    trains = report.train_frame(run)
    if not trains.empty:
        parts.append(_chart(report.train_chart(trains), f"{run.run_id}: training"))
    rollouts = report.rollout_frame(run)
    if not rollouts.empty:
        parts.append(_chart(report.rollout_chart(rollouts), f"{run.run_id}: closed loop"))
        parts.append("<p>closed loop per lab and round</p>" + _table(rollouts))
    parts.append("<p>per round</p>" + _table(report.round_frame(run)))
    parts.append(_videos(sorted((run.path / "videos").rglob("*.mp4")), page_dir))
    summary = run.summary()
    status = summary.get("status", "unknown")
    error = f" - {html.escape(str(summary.get('error', ''))[:300])}" if status == "failed" else ""
    return (
        f"<details open><summary>{html.escape(run.run_id)} ({html.escape(status)}{error})</summary>"
        + "".join(parts)
        + "</details>"
    )


def build_page(root: Path, title: str = "", page_dir: Path | None = None) -> str:
    """The whole page for the reports folder `root`, as an HTML string; videos are linked relative to
    `page_dir`, the folder the page will be written to (default `root`)."""
    root = Path(root).resolve()
    page_dir = Path(page_dir or root).resolve()
    found = find_runs(root)
    table = report.runs_table(root, recursive=True, runs=found)
    sections = [
        f"<h1>{html.escape(title or f'zk0 report: {root.name}')}</h1>",
        f'<p class="meta">{html.escape(str(root))} - {len(found)} runs - written {utc_now()}</p>',
        _datasets_section(root),
        "<h2>Results (every run under this folder)</h2>",
        _table(table.drop(columns="path", errors="ignore")),
    ]
    if not table.empty:
        cols = ["source", "run_id", "kind", "strategy", "round0_success_rate", "round0_success_ci"]
        cols += ["success_rate", "success_ci"]
        sections.append("<h3>Closed loop: the starting model (round 0) against the final one</h3>")
        sections.append(_table(table[[c for c in cols if c in table]]))
    curves = report.curves(found)
    if not curves.empty:
        sections.append(_chart(report.compare_chart(curves, "loss"), "compare: held-out loss"))
        sections.append(_chart(report.compare_chart(curves, "action_mae"), "compare: action error"))
    sections.append("<h2>Each run</h2>")
    sections += [_run_section(run, page_dir) for run in found]
    body = "\n".join(s for s in sections if s)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title or 'zk0 report')}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def write_report(root: Path, out: Path | None = None, title: str = "") -> Path:
    """Write the page of `root` to `out` (default root/index.html); returns its path."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"zk0 report: {root} is not a folder (give a reports folder, e.g. reports/demo)")
    out = Path(out) if out else root / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, build_page(root, title, out.parent))
    return out
