"""The notebooks' plumbing: parameters -> config, progress, run choice, videos; papermill batches.

The notebooks in notebooks/ are a few lines per cell that call these functions; `zk0 workbook` and
`zk0 sweep` run them with papermill.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import time
import traceback
from pathlib import Path
from typing import Any

from zk0lib.config import ExperimentConfig, load_config, zk0_home
from zk0lib.runs import RunRecord, atomic_write_text, list_runs, utc_now

NOTEBOOKS = ("01_dataset_validation", "02_federated_training", "03_evaluation_videos", "04_results_tables")


def notebooks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "notebooks"


def config(
    preset: str, overrides: dict[str, Any] | None = None, run_id: str = "", runs_dir: str = ""
) -> ExperimentConfig:
    """The notebook parameters as a validated config (the same dotted keys as `zk0 train --set`)."""
    from zk0lib import env

    env.quiet()
    extra = dict(overrides or {})
    if run_id:
        extra["output.run_id"] = run_id
    if runs_dir:
        extra["output.runs_dir"] = str(Path(runs_dir).resolve())
    cfg = load_config(preset, extra)
    env.use_offline_hub_if_possible(cfg)
    return cfg


def prepare_datasets(cfg: ExperimentConfig) -> None:
    """Make every dataset of the config available (simulated labs are recorded on first use), saying so."""
    from zk0lib.data import dataset_location

    for spec in [*cfg.data.clients, *cfg.data.eval_only]:
        t0 = time.perf_counter()

        def report(done: int, total: int, name: str = spec.name) -> None:
            if done % 5 == 0 or done == total:
                print(f"recording {name}: {done}/{total} expert episodes", flush=True)

        _, root = dataset_location(cfg, spec, report)
        print(f"{spec.name}: {root} ({time.perf_counter() - t0:.1f} s)", flush=True)


def output_dir(path: str, notebook: str, cfg: ExperimentConfig | None = None) -> Path:
    """Where a notebook writes what it shows: `path`, or reports/notebooks/<notebook>[-<preset>]."""
    if path:
        out = Path(path)
    else:
        out = zk0_home() / "reports" / "notebooks" / (f"{notebook}-{cfg.preset}" if cfg else notebook)
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(cfg: ExperimentConfig):
    """run_federated with a live progress display (a bar and the latest round line)."""
    from zk0lib.simulation import run_federated

    try:
        import ipywidgets as widgets
        from IPython.display import display

        bar = widgets.IntProgress(min=0, max=cfg.fl.num_rounds + 1, description="rounds")
        line = widgets.Label("starting Flower ...")
        display(widgets.VBox([bar, line]))
    except ImportError:  # outside Jupyter: plain lines
        bar = line = None

    def progress(text: str) -> None:
        print(text, flush=True)
        if bar is not None:
            line.value = text[:160]
            if text.startswith("round "):
                bar.value = int(text.split()[1].split("/")[0]) + 1

    return run_federated(cfg, progress=progress)


def pick_run(run_dir: str = "", runs_dir: str = "", preset: str = "smoke") -> RunRecord:
    """`run_dir`, else the latest completed run with a checkpoint under `runs_dir`, else a new `preset` run."""
    if run_dir:
        run = RunRecord(run_dir)
        if not (run.path / "config.json").exists():
            raise FileNotFoundError(f"no run record at {run.path} (config.json missing)")
        return run
    root = Path(runs_dir) if runs_dir else zk0_home() / "reports" / "runs"
    done = [r for r in list_runs(root) if r.summary().get("status") == "completed" and r.checkpoint("final").exists()]
    if done:
        return max(done, key=lambda r: r.summary().get("finished_at", ""))
    print(f"no completed run under {root}: training a {preset} run first", flush=True)
    return train(config(preset, runs_dir=str(root))).record


def prediction_videos(run: RunRecord, bundle: Any, episodes_per_client: int = 1, out: Path | None = None) -> list[Path]:
    """For held-out episodes of each client: camera frames with predicted and recorded joint traces."""
    from zk0lib import data, report

    cfg = run.config()
    out = Path(out or run.path / "videos" / "predictions")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, spec in enumerate(cfg.data.clients):
        client = data.open_client(cfg, i)
        for ep in client.heldout_episodes[:episodes_per_client]:
            frames, images = report.predicted_actions(bundle, client.repo_id, client.root, ep, seed=cfg.eval.seed)
            frames.to_csv(out / f"{spec.name}-episode{ep:03d}.csv", index=False)
            paths.append(
                report.prediction_video(
                    frames,
                    images,
                    out / f"{spec.name}-episode{ep:03d}.mp4",
                    f"{spec.name} held-out episode {ep}",
                    fps=int(client.meta.fps),
                )
            )
    return paths


def rollout_videos(run: RunRecord, bundle: Any, episodes: int = 1, out: Path | None = None) -> dict[str, Any]:
    """Closed-loop episodes of the run's policy in each simulated lab of its config, with an mp4 each."""
    from zk0lib.evaluation import lab_rollout, sim_labs
    from zk0lib.runs import write_json

    cfg = run.config()
    out = Path(out or run.path / "videos" / "closed_loop")
    results = {name: lab_rollout(cfg, bundle, spec, out, episodes) for name, (spec, _) in sim_labs(cfg).items()}
    if results:
        write_json(out / "rollouts.json", results)
    return results


def show_videos(paths: list[Path | str], width: int = 560) -> None:
    from IPython.display import HTML, Video, display

    for p in paths:
        display(HTML(f"<b>{Path(p).name}</b>"), Video(str(p), embed=True, width=width))


# ----------------------------------------------------------------------------- papermill batches


def run_notebook(name: str, out: Path, parameters: dict[str, Any], timeout_s: int | None = None) -> Path:
    """Execute notebooks/<name>.ipynb with papermill into `out`; raises on a failing cell."""
    import papermill

    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.ipynb"
    papermill.execute_notebook(
        str(notebooks_dir() / f"{name}.ipynb"),
        str(target),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(notebooks_dir()),
        progress_bar=False,
        execution_timeout=timeout_s,
    )
    return target


def run_workbook(
    preset: str,
    out: Path,
    overrides: dict[str, Any] | None = None,
    notebooks: tuple[str, ...] = NOTEBOOKS,
    progress=print,
) -> dict[str, Any]:
    """01 -> 04 with one preset into `out` (executed notebooks, their tables, the run)."""
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
    for name in notebooks:
        t0 = time.perf_counter()
        progress(f"{name} ...")
        done[name] = str(run_notebook(name, out, params[name]))
        progress(f"{name}: {time.perf_counter() - t0:.0f} s -> {done[name]}")
    return {"out": str(out), "run": str(runs_dir / run_id), "notebooks": done}


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
            entry["notebooks"] = [str(run_notebook("02_federated_training", out / pid, params))]
            if videos:
                entry["notebooks"].append(
                    str(
                        run_notebook("03_evaluation_videos", out / pid, {"run_dir": entry["run_dir"], "preset": preset})
                    )
                )
            entry["status"] = "completed"
        except Exception as e:  # noqa: BLE001 - a failed point is recorded and the sweep goes on
            entry["status"], entry["error"] = "failed", _last_line(e)
            entry["traceback"] = traceback.format_exc()[-4000:]
            _record_failure(preset, {**(overrides or {}), **point}, pid, runs_dir, entry["error"])
            progress(f"  failed: {entry['error']}")
        entry["seconds"] = time.perf_counter() - t0
        atomic_write_text(out / "sweep.json", json.dumps(record, indent=2))
    record["results"] = str(run_notebook("04_results_tables", out, {"runs_dir": str(runs_dir), "output_dir": str(out)}))
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

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def app_path() -> Path:
    return notebooks_dir() / "results_app.py"


def check_app(
    runs_dir: Path, screenshot: Path, expect: str, timeout_s: float = 120.0, chromium: str = "/usr/bin/chromium"
) -> dict[str, Any]:
    """Serve the marimo app headless, load it in headless Chromium, wait for `expect` (e.g. a run id)
    to appear in the run list, and save a screenshot. Stops the server whatever happens."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    if not Path(chromium).exists():
        raise FileNotFoundError(f"{chromium} not found: install Debian's chromium (apt-get install chromium)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ZK0_RUNS_DIR=str(runs_dir))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    log = open(screenshot.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "marimo",
            "run",
            str(app_path()),
            "--headless",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-token",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    t0 = time.perf_counter()
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"marimo did not serve the app; see {screenshot.with_suffix('.log')}")
            time.sleep(0.3)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.goto(url, timeout=timeout_s * 1000)
                page.get_by_text(expect, exact=False).first.wait_for(timeout=timeout_s * 1000)
                page.wait_for_timeout(2000)  # let the charts below the table draw
                page.screenshot(path=str(screenshot))
                title = page.title()
            finally:
                browser.close()
        return {"url": url, "title": title, "screenshot": str(screenshot), "seconds": time.perf_counter() - t0}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
