"""The notebooks' plumbing: parameters -> config, datasets, a run with progress, the run to look at.

The notebooks in notebooks/ are a few lines per cell that call these functions (and `videos` for 03);
`batch` runs them with papermill (`zk0 workbook`, `zk0 sweep`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from zk0lib.config import ExperimentConfig, load_config, zk0_home
from zk0lib.runs import RunRecord, list_runs

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
    from zk0lib.sources import dataset_location

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
    from zk0lib.fl.simulation import run_federated

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
