"""Notebooks as batch jobs: `zk0 workbook` runs 01 -> 04 with papermill, `zk0 sweep` runs 02 (and 03) per
grid point and tabulates with 04; a failed point is recorded and the sweep goes on."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from zk0lib.config import load_config, zk0_home
from zk0lib.runs import RunRecord, atomic_write_text, utc_now
from zk0lib.workbook import NOTEBOOKS, notebooks_dir


class PrefixedLines:
    """Where papermill writes a notebook's printed output while its cells run: each complete line goes
    to `sink` (the terminal) behind `prefix`, so a long notebook shows what it is doing as it does it."""

    def __init__(self, prefix: str, sink: TextIO | None = None):
        self.prefix, self.sink, self._partial = prefix, sink or sys.stdout, ""

    def write(self, text: str) -> int:
        lines = (self._partial + text.replace("\r", "\n")).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.sink.write(f"{self.prefix}{line}\n")
        return len(text)

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        if self._partial.strip():
            self.sink.write(f"{self.prefix}{self._partial}\n")
        self._partial = ""
        self.flush()


def _ipc_kernels() -> Any:
    """Traitlets config for the kernel manager papermill starts: kernels over IPC sockets instead of
    loopback TCP, so no port is open and the kernel's "running over TCP without encryption" warning
    stays off the terminal."""
    from traitlets.config import Config

    return Config({"KernelManager": {"transport": "ipc"}})


def run_notebook(
    name: str,
    out: Path,
    parameters: dict[str, Any],
    timeout_s: int | None = None,
    stream: TextIO | None = None,
) -> Path:
    """Execute notebooks/<name>.ipynb with papermill into `out`; raises on a failing cell. With `stream`
    (e.g. sys.stdout), what the cells print is written there line by line while they run."""
    import papermill

    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.ipynb"
    lines = PrefixedLines(f"  {name[:2]} | ", stream) if stream is not None else None
    try:
        papermill.execute_notebook(
            str(notebooks_dir() / f"{name}.ipynb"),
            str(target),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(notebooks_dir()),
            progress_bar=False,
            execution_timeout=timeout_s,
            stdout_file=lines,
            config=_ipc_kernels(),
        )
    finally:
        if lines is not None:
            lines.close()
    return target


def run_workbook(
    preset: str,
    out: Path,
    overrides: dict[str, Any] | None = None,
    notebooks: tuple[str, ...] = NOTEBOOKS,
    progress=print,
    echo: bool = True,
) -> dict[str, Any]:
    """01 -> 04 with one preset into `out` (executed notebooks, their tables, the run, the offline report
    index.html). With `echo`, the notebooks' printed progress streams to the terminal as they run."""
    out = Path(out).resolve()
    runs_dir = out / "runs"
    run_id = f"{preset}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    common = {"preset": preset, "overrides": dict(overrides or {})}
    params = {
        "01_dataset_validation": {**common, "output_dir": str(out / "01_dataset_validation")},
        "02_federated_training": {**common, "run_id": run_id, "runs_dir": str(runs_dir)},
        "03_evaluation_videos": {"run_dir": str(runs_dir / run_id), "runs_dir": str(runs_dir), "preset": preset},
        "04_results_tables": {"runs_dir": str(runs_dir), "output_dir": str(out / "results")},
    }
    done = {}
    stream = sys.stdout if echo else None
    for name in notebooks:
        t0 = time.perf_counter()
        progress(f"{name} ...")
        done[name] = str(run_notebook(name, out, params[name], stream=stream))
        progress(f"{name}: {time.perf_counter() - t0:.0f} s -> {done[name]}")
    from zk0lib.page import write_report

    page = write_report(out, title=f"zk0 {preset} workbook")
    progress(f"report: {page}")
    return {"out": str(out), "run": str(runs_dir / run_id), "notebooks": done, "report": str(page)}


def parse_grid(grids: list[str]) -> list[dict[str, str]]:
    """["fl.proximal_mu=0,0.01", "fl.strategy=fedavg,fedprox"] -> the 4 combinations."""
    axes = []
    for g in grids:
        key, sep, values = g.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid {g!r}: expected key=v1,v2,... (e.g. fl.proximal_mu=0,0.01)")
        axes.append([(key.strip(), v.strip()) for v in values.split(",") if v.strip()])
    return [dict(point) for point in itertools.product(*axes)] if axes else [{}]


def point_id(point: dict[str, str]) -> str:
    text = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items()) or "base"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def sweep(
    preset: str,
    grids: list[str],
    overrides: dict[str, Any] | None = None,
    sweep_id: str = "",
    videos: bool = False,
    out_root: Path | None = None,
    progress=print,
    echo: bool = True,
) -> dict[str, Any]:
    """02 (and 03) per grid point with papermill, then 04 over all points; failed points are recorded."""
    from zk0lib.config import ConfigError

    points = parse_grid(grids)
    for point in points:  # refuse a bad grid before spending hours on the good points
        try:
            load_config(preset, {**(overrides or {}), **point})
        except ConfigError as e:
            raise ConfigError(f"grid point {point}: {e}") from None
    sweep_id = sweep_id or f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{preset}"
    stream = sys.stdout if echo else None
    out = Path(out_root or zk0_home() / "reports" / "sweeps") / sweep_id
    runs_dir = out / "runs"
    record: dict[str, Any] = {
        "sweep_id": sweep_id,
        "preset": preset,
        "grid": grids,
        "overrides": overrides or {},
        "started_at": utc_now(),
        "points": [],
    }
    for i, point in enumerate(points):
        pid = f"{i:02d}-{point_id(point)}"
        entry = {"point": point, "run_id": pid, "run_dir": str(runs_dir / pid), "status": "running"}
        record["points"].append(entry)
        atomic_write_text(out / "sweep.json", json.dumps(record, indent=2))
        progress(f"[{i + 1}/{len(points)}] {pid}")
        t0 = time.perf_counter()
        try:
            params = {
                "preset": preset,
                "overrides": {**(overrides or {}), **point},
                "run_id": pid,
                "runs_dir": str(runs_dir),
            }
            entry["notebooks"] = [str(run_notebook("02_federated_training", out / pid, params, stream=stream))]
            if videos:
                params_03 = {"run_dir": entry["run_dir"], "preset": preset}
                entry["notebooks"].append(
                    str(run_notebook("03_evaluation_videos", out / pid, params_03, stream=stream))
                )
            entry["status"] = "completed"
        except Exception as e:  # noqa: BLE001 - a failed point is recorded and the sweep goes on
            entry["status"], entry["error"] = "failed", _last_line(e)
            entry["traceback"] = traceback.format_exc()[-4000:]
            _record_failure(preset, {**(overrides or {}), **point}, pid, runs_dir, entry["error"])
            progress(f"  failed: {entry['error']}")
        entry["seconds"] = time.perf_counter() - t0
        atomic_write_text(out / "sweep.json", json.dumps(record, indent=2))
    params_04 = {"runs_dir": str(runs_dir), "output_dir": str(out)}
    record["results"] = str(run_notebook("04_results_tables", out, params_04, stream=stream))
    record["finished_at"] = utc_now()
    atomic_write_text(out / "sweep.json", json.dumps(record, indent=2))
    return record | {"out": str(out)}


def _record_failure(preset: str, overrides: dict[str, Any], run_id: str, runs_dir: Path, error: str) -> None:
    """A run folder with status failed for a point that failed before its run began, for the results table."""
    if (runs_dir / run_id / "summary.json").exists():
        return
    cfg = load_config(preset, {**overrides, "output.run_id": run_id, "output.runs_dir": str(runs_dir)})
    RunRecord.create(cfg).fail(error)


def _last_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    tail = [t for t in text if t.strip()]
    return f"{type(e).__name__}: {tail[-1][:300] if tail else ''}"


# ----------------------------------------------------------------------------- the results app
