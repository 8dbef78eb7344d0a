"""What every kind of run (federated, centralized, local-only) does before it starts, and what it returns:
check the config and every dataset (recording simulated labs once), validate, then create the run folder."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zk0lib import env
from zk0lib.config import TINY, ExperimentConfig, validate
from zk0lib.data import frame_cache_of, load_metadata
from zk0lib.model import check_pretrained, ensure_tiny_vlm
from zk0lib.runs import RunRecord
from zk0lib.sources import dataset_location
from zk0lib.validate import Report, check_before_training


class FederatedRunError(RuntimeError):
    """A run that cannot start, or a federated run that failed (its folder holds the reason)."""


@dataclass
class RunResult:
    run_id: str
    path: Path
    status: str
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    wall_seconds: float

    @property
    def record(self) -> RunRecord:
        return RunRecord(self.path)

    @classmethod
    def of(cls, run: RunRecord, wall_seconds: float) -> RunResult:
        summary = run.summary()
        return cls(run.run_id, run.path, summary.get("status", "unknown"), summary, run.rounds(), wall_seconds)


def prepare(cfg: ExperimentConfig, progress: Callable[[str], None] | None = None) -> Report | None:
    """Check and make what every process will open, before any starts: fail here, early and clearly,
    rather than inside a simulation; and no two clients race to write the same dataset."""
    cpus = os.cpu_count() or 1
    if cfg.fl.client_num_cpus > cpus:
        raise FederatedRunError(
            f"fl.client_num_cpus={cfg.fl.client_num_cpus} but this machine has {cpus} CPUs: "
            f"no simulated client could start; use --set fl.client_num_cpus={cpus}"
        )
    if cfg.fl.client_num_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise FederatedRunError(
                "fl.client_num_gpus > 0 but no CUDA GPU is visible: use --set fl.client_num_gpus=0 --set model.device=cpu"
            )
    if cfg.data.video_backend in (None, "torchcodec"):
        env.warn_if_no_torchcodec()
    entries = [(f"data.clients.{i}", c) for i, c in enumerate(cfg.data.clients)]
    entries += [(f"data.eval_only.{i}", c) for i, c in enumerate(cfg.data.eval_only)]
    for key, client in entries:

        def report(done: int, total: int, name: str = client.name) -> None:
            if progress is not None and (done % 5 == 0 or done == total):
                progress(f"recording {name}: {done}/{total} expert episodes")

        repo_id, root = dataset_location(cfg, client, report)
        meta = load_metadata(repo_id, root, key)
        if frame_cache_of(cfg) is not None and meta.video_keys:  # built here once, before clients race for it
            from zk0lib.cache import frame_store
            from zk0lib.sources import hub_root

            t0 = time.perf_counter()
            store = frame_store(repo_id, Path(root or hub_root(repo_id)), cfg.cache_dir, cfg.data.video_backend)
            if progress is not None and time.perf_counter() - t0 > 1:
                progress(f"frame cache of {client.name}: {store.info['frames']} frames, {store.nbytes / 2**20:.0f} MiB")
    if cfg.model.pretrained == TINY:
        ensure_tiny_vlm()
    else:
        check_pretrained(cfg.model.pretrained)
    return check_before_training(cfg, progress)


def start_run(
    cfg: ExperimentConfig, kind: str, progress: Callable[[str], None] | None, run: RunRecord | None = None
) -> RunRecord:
    """Check everything a run needs, then create its folder (with the validation report): a run that
    cannot start leaves no folder behind."""
    env.quiet()
    validate(cfg)
    env.use_offline_hub_if_possible(cfg)
    validation = prepare(cfg, progress)
    run = run or RunRecord.create(cfg, kind)
    if validation is not None:
        validation.save(run.path, "validation")
        if validation.findings and progress is not None:
            progress(
                f"validation: {len(validation.errors)} errors, {len(validation.warnings)} warnings "
                f"(allowed: data.allow_invalid={cfg.data.allow_invalid}); see {run.path / 'validation.csv'}"
            )
    return run
