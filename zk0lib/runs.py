"""Run records: reports/runs/<run-id>/ with config.json, metrics.jsonl, summary.json, checkpoints/.

Every file is written whole to a temporary name and renamed, so a reader never sees half a record.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import secrets
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from zk0lib.config import ExperimentConfig, zk0_home

PACKAGES = ("torch", "lerobot", "flwr", "transformers", "numpy", "ray", "torchcodec", "av", "huggingface_hub")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id(preset: str) -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{preset}-{secrets.token_hex(2)}"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars and tuples become plain values."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, raw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def git_commit() -> dict[str, Any]:
    """The checkout's commit and whether it had uncommitted changes (None outside a git checkout)."""
    try:
        home = zk0_home()
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=home, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=home,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
        "git": git_commit(),
    }
    try:
        import torch

        env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        env["cuda"] = None
    return env


class RunRecord:
    """One run's folder. The ServerApp appends rounds; `zk0 train`/notebooks create and read it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, cfg: ExperimentConfig, kind: str = "federated") -> RunRecord:
        """A new run folder with config.json and a 'running' summary; refuses to reuse a finished run id."""
        run_id = cfg.output.run_id or new_run_id(cfg.preset)
        cfg.output.run_id = run_id
        run = cls(cfg.runs_dir / run_id)
        if (run.path / "summary.json").exists():
            raise FileExistsError(f"run {run_id!r} already exists at {run.path}; choose another --run-id")
        run.path.mkdir(parents=True, exist_ok=True)
        write_json(
            run.path / "config.json",
            {"kind": kind, "config": cfg.to_dict(), "environment": environment(), "created_at": utc_now()},
        )
        run.write_summary(
            {"status": "running", "run_id": run_id, "kind": kind, "preset": cfg.preset, "started_at": utc_now()}
        )
        return run

    # -- reading
    def config(self) -> ExperimentConfig:
        return ExperimentConfig.from_dict(read_json(self.path / "config.json")["config"])

    def summary(self) -> dict[str, Any]:
        path = self.path / "summary.json"
        return read_json(path) if path.exists() else {}

    def rounds(self) -> list[dict[str, Any]]:  # each a zk0lib.book.RoundRecord
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    # -- writing
    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)

    def update_summary(self, **fields: Any) -> dict[str, Any]:
        summary = self.summary() | fields
        self.write_summary(summary)
        return summary

    def append_round(self, record: dict[str, Any]) -> None:
        """Add one JSON line; the file is rewritten whole, so a crash leaves the previous rounds intact."""
        path = self.path / "metrics.jsonl"
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        atomic_write_text(path, old + json.dumps(_clean(record), sort_keys=True) + "\n")

    def checkpoint(self, name: str) -> Path:
        return self.path / "checkpoints" / name

    def fail(self, error: str) -> None:
        self.update_summary(status="failed", error=error, finished_at=utc_now())


def list_runs(runs_dir: str | Path) -> list[RunRecord]:
    """The runs directly in `runs_dir`, by run id."""
    root = Path(runs_dir)
    if not root.exists():
        return []
    return sorted((RunRecord(p) for p in root.iterdir() if is_run_folder(p)), key=lambda r: r.run_id)


def is_run_folder(path: Path) -> bool:
    """A run's folder holds its config.json and summary.json (a saved policy has a config.json only)."""
    return (path / "config.json").is_file() and (path / "summary.json").is_file()


def find_runs(root: str | Path, max_depth: int = 6) -> list[RunRecord]:
    """Every run anywhere under `root` (demo, compare, sweeps, runs ...), by folder; a run's own folder is
    not searched further (its checkpoints are policies, not runs)."""
    root = Path(root)
    found: list[RunRecord] = []

    def walk(folder: Path, depth: int) -> None:
        if is_run_folder(folder):
            found.append(RunRecord(folder))
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def run_source(run: RunRecord, root: str | Path) -> str:
    """Where under `root` a run came from: the folder holding its runs folder (e.g. demo, compare/x);
    "." when that is `root` itself, or when `root` is the run's own folder."""
    root = Path(root)
    rel = run.path.relative_to(root).parent if run.path.is_relative_to(root) else run.path.parent
    parts = rel.parts[:-1] if rel.parts and rel.parts[-1] == "runs" else rel.parts
    return "/".join(parts) or "."


# ----------------------------------------------------------------------------- resuming


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state().tolist(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_resume_state(
    run: RunRecord, server_round: int, arrays: Any, strategy: dict, book: Any, extra: dict | None = None
) -> None:
    """checkpoints/resume: the global trainable weights (fp32), the strategy's state (server moments),
    the round, the book's best/totals, the RNG states and `extra` (JSON: the privacy accountant's ledger),
    swapped in whole after each round."""
    from safetensors.numpy import save_file

    final = run.checkpoint("resume")
    tmp, old = final.with_name(".resume.tmp"), final.with_name(".resume.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: a.numpy() for k, a in arrays.items()}, str(tmp / "global.safetensors"))
    flat = {f"{name}/{k}": v for name, values in strategy.items() for k, v in values.items()}
    save_file(flat, str(tmp / "strategy.safetensors"))
    write_json(
        tmp / "state.json",
        {"round": server_round, "book": book.state(), "rng": _rng_state(), "extra": extra or {}},
    )
    # state.json is written last, so a folder that has one is complete. A crash between the two renames
    # leaves only .resume.old: _resume_folder falls back to it (the previous round, redone on resume).
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _resume_folder(run: RunRecord) -> Path | None:
    """The newest complete resume state: checkpoints/resume, else the one a crash mid-swap left behind."""
    final = run.checkpoint("resume")
    for folder in (final, final.with_name(".resume.old")):
        if (folder / "state.json").exists():
            return folder
    return None


def resume_round(run: RunRecord) -> int | None:
    """The last round a resume state was saved after (None when there is none), without loading it."""
    folder = _resume_folder(run)
    return read_json(folder / "state.json")["round"] if folder else None


def load_resume_state(run: RunRecord) -> dict[str, Any] | None:
    """The last complete round's resume state (RNG states restored), or None when there is none."""
    from safetensors.numpy import load_file

    folder = _resume_folder(run)
    if folder is None:
        return None
    state = read_json(folder / "state.json")
    strategy: dict[str, dict] = {}
    for key, value in load_file(str(folder / "strategy.safetensors")).items():
        name, _, param = key.partition("/")
        strategy.setdefault(name, {})[param] = value
    _set_rng_state(state["rng"])
    return {
        "round": state["round"],
        "book": state["book"],
        "strategy": strategy,
        "extra": state.get("extra", {}),
        "arrays": load_file(str(folder / "global.safetensors")),
    }


def truncate_rounds(run: RunRecord, last_round: int) -> int:
    """Drop records of rounds after `last_round` (a round that was recorded but not checkpointed is redone)."""
    kept = [r for r in run.rounds() if r["round"] <= last_round]
    text = "".join(json.dumps(_clean(r), sort_keys=True) + "\n" for r in kept)
    atomic_write_text(run.path / "metrics.jsonl", text)
    return len(kept)


def eval_only_of(section: dict[str, Any]) -> dict[str, Any]:
    """The eval-only results of a round's `eval` section (named `extra` in runs recorded before 2026-12)."""
    return section.get("eval_only", section.get("extra", {}))
