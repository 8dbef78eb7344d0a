"""Judging a policy the same way in every kind of run, and writing its rounds the same way.

Federated runs and the centralized and local-only baselines all evaluate through `HeldOutSets` and
`closed_loop`, and append their rounds with `RoundBook`: one record format, so 04 and the app put
them side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zk0lib import data, model, train
from zk0lib.config import ExperimentConfig
from zk0lib.runs import RunRecord, utc_now


class HeldOutSets:
    """The datasets a run is judged on: each client's held-out episodes and every eval-only dataset."""

    def __init__(self, cfg: ExperimentConfig, policy_config: Any, clients: bool = True, opened: list | None = None):
        """`clients`: judge on the clients' held-out episodes too (the server reads their datasets);
        `opened`: their ClientData when the caller has opened them already."""
        self.cfg = cfg
        self.clients: dict[str, Any] = {}
        if clients:
            for local in opened or [self._open_client(i) for i in range(len(cfg.data.clients))]:
                self.clients[local.name] = self._open(local, policy_config)
        self.extra = {
            spec.name: self._open(data.open_eval_only(cfg, i), policy_config)
            for i, spec in enumerate(cfg.data.eval_only)
        }

    def _open_client(self, index: int) -> data.ClientData:
        try:
            return data.open_client(self.cfg, index)
        except data.DatasetNotAvailableError as e:
            raise RuntimeError(
                f"eval.where=server but the server cannot read client {self.cfg.data.clients[index].name!r}'s "
                f"dataset; use eval.where=clients when the data stays on the clients.\n{e}"
            ) from e

    def _open(self, local: data.ClientData, policy_config: Any) -> Any:
        return data.open_dataset(local, local.heldout_episodes, policy_config, self.cfg.data.video_backend)

    def evaluate(self, bundle: model.PolicyBundle) -> tuple[dict[str, Any], dict[str, Any]]:
        """(per-client results, per-eval-only-dataset results) of the bundle's current weights."""
        per_client = {name: train.evaluate(bundle, ds, self.cfg) for name, ds in self.clients.items()}
        extra = {name: train.evaluate(bundle, ds, self.cfg) for name, ds in self.extra.items()}
        return per_client, extra


def sim_labs(cfg: ExperimentConfig) -> dict[str, tuple[Any, str]]:
    """Simulated labs of the config: name -> (client spec, role 'client' or 'eval_only')."""
    labs = {c.name: (c, "client") for c in cfg.data.clients if c.source == "sim"}
    return labs | {c.name: (c, "eval_only") for c in cfg.data.eval_only if c.source == "sim"}


def rollout_due(cfg: ExperimentConfig, server_round: int) -> bool:
    e, last = cfg.eval, cfg.fl.num_rounds
    if not e.rollout_episodes:
        return False
    if server_round == 0:
        return e.rollout_round0
    return server_round == last or bool(e.rollout_every and server_round % e.rollout_every == 0)


def eval_due(cfg: ExperimentConfig, server_round: int) -> bool:
    every, last = cfg.eval.every, cfg.fl.num_rounds
    return server_round == 0 or server_round % every == 0 or server_round == last


def lab_rollout(
    cfg: ExperimentConfig, bundle: model.PolicyBundle, spec: Any, videos: Path | None, episodes: int | None = None
) -> dict[str, Any]:
    """Closed-loop episodes (eval.rollout_episodes unless given) of the bundle's policy in one simulated lab."""
    from zk0lib.sim.rollout import rollout

    e = cfg.eval
    return rollout(
        bundle.policy,
        (bundle.preprocessor, bundle.postprocessor),
        spec.lab,
        e.rollout_episodes if episodes is None else episodes,
        seed=e.seed,
        image_size=cfg.data.sim_image_size,
        cache_dir=cfg.cache_dir,
        max_frames=e.rollout_max_frames,
        video_dir=videos,
        device=bundle.device,
    )


def pooled_success(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Success over several labs' episodes together, with its Wilson interval."""
    from zk0lib.sim.rollout import wilson_interval

    wins = sum(round(s["success_rate"] * s["episodes"]) for s in summaries)
    n = sum(s["episodes"] for s in summaries)
    return {
        "success_rate": wins / n if n else float("nan"),
        "success_ci": list(wilson_interval(wins, n)),
        "episodes": n,
    }


def closed_loop(cfg: ExperimentConfig, bundle: model.PolicyBundle, videos: Path | None) -> dict[str, Any]:
    """One policy in every simulated lab (clients' and evaluation-only): success and stages per lab."""
    out: dict[str, Any] = {"labs": {}}
    for name, (spec, role) in sim_labs(cfg).items():
        out["labs"][name] = {"role": role, **lab_rollout(cfg, bundle, spec, videos)}
    clients = [v["summary"] for v in out["labs"].values() if v["role"] == "client"]
    if clients:
        out["clients"] = pooled_success(clients)
    return out


class RoundBook:
    """Writes a run's rounds: the record line, best/final checkpoints, running totals and the summary,
    the optional W&B log and one progress line per round."""

    def __init__(self, cfg: ExperimentConfig, run: RunRecord, log: Callable[[str], None] | None = None):
        self.cfg, self.run = cfg, run
        self._log = log
        self.best: dict[str, Any] | None = None
        self.totals = {"bytes_sent": 0, "bytes_received": 0, "train_samples": 0, "train_steps": 0}
        self.t_start = time.perf_counter()
        self.tracker = None
        if cfg.output.wandb:
            from zk0lib.tracking import WandbLogger

            self.tracker = WandbLogger(cfg, run)

    @staticmethod
    def train_record(server_round: int, clients: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The round's record head: per-client training metrics and their sample-weighted aggregate."""
        samples = sum(m.get("samples", 0) for m in clients.values()) or 1
        keys = sorted({k for m in clients.values() for k in m if k != "partition-id"})
        aggregate = {k: sum(m[k] * m.get("samples", 0) for m in clients.values() if k in m) / samples for k in keys}
        return {
            "round": server_round,
            "time": utc_now(),
            "train": {"clients": clients, "aggregate": aggregate},
            "num_train_clients": len(clients),
        }

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "totals": self.totals, "wall_seconds": time.perf_counter() - self.t_start}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue a resumed run's book: its best round, totals and wall time so far."""
        self.best, self.totals = state["best"], state["totals"]
        self.t_start = time.perf_counter() - state["wall_seconds"]

    def checkpoint(self, server_round: int, mean: dict[str, Any], bundle: model.PolicyBundle) -> None:
        if server_round == 0 or not self.cfg.output.save_checkpoints:
            return
        if "loss" in mean and (self.best is None or mean["loss"] < self.best["loss"]):
            self.best = {"round": server_round, **mean}
            model.save_policy(bundle, self.run.checkpoint("best"))
        if server_round == self.cfg.fl.num_rounds:
            model.save_policy(bundle, self.run.checkpoint("final"))

    def commit(self, record: dict[str, Any]) -> None:
        """Append the round, log it and bring the totals and the summary up to date."""
        clients = record.get("train", {}).get("clients", {}).values()
        self.totals["train_samples"] += sum(m.get("samples", 0) for m in clients)
        self.totals["train_steps"] += sum(m.get("steps", 0) for m in clients)
        self.totals["bytes_sent"] += record.get("bytes_sent", 0)
        self.totals["bytes_received"] += record.get("bytes_received", 0)
        self.run.append_round(record)
        if self.tracker is not None:
            self.tracker.log_round(record)
        self.log(progress_line(self.cfg, record))
        self.run.update_summary(
            rounds_completed=record["round"],
            best=self.best,
            totals=self.totals,
            wall_seconds=time.perf_counter() - self.t_start,
        )

    def complete(self, **fields: Any) -> None:
        rounds = self.run.rounds()
        self.run.update_summary(
            status="completed",
            finished_at=utc_now(),
            wall_seconds=time.perf_counter() - self.t_start,
            final=final_eval(rounds),
            final_rollout=final_rollout(rounds),
            start_rollout=start_rollout(rounds),
            best=self.best,
            totals=self.totals,
            **fields,
        )
        self.finish_tracker()
        self.log(f"run {self.run.run_id} completed: {self.run.path}")

    def fail(self, error: BaseException) -> None:
        self.run.fail(f"{type(error).__name__}: {error}")
        self.finish_tracker()

    def finish_tracker(self) -> None:
        if self.tracker is not None:
            self.tracker.finish(self.run.summary())
            self.tracker = None

    def log(self, line: str) -> None:
        """Progress: to `log` when given (in-process runs), else marked on stdout for `run_federated` to relay."""
        if self._log is not None:
            self._log(line)
        else:
            print(f"[zk0] {line}", flush=True)


def progress_line(cfg: ExperimentConfig, record: dict[str, Any]) -> str:
    parts = [f"round {record['round']}/{cfg.fl.num_rounds}"]
    if "train" in record:
        agg = record["train"]["aggregate"]
        parts.append(f"train loss {agg.get('train_loss', float('nan')):.4f} ({record['num_train_clients']} clients)")
    mean = record.get("eval", {}).get("mean", {})
    if "loss" in mean:
        lo, hi = mean["loss_ci"]
        parts.append(f"eval loss {mean['loss']:.4f} [{lo:.4f}, {hi:.4f}]")
    if "action_mae" in mean:
        parts.append(f"action MAE {mean['action_mae']:.3f}")
    for name, ev in record.get("eval", {}).get("extra", {}).items():
        parts.append(f"{name}: loss {ev['loss']:.4f}")
    if "rollout" in record:
        labs = record["rollout"]["labs"]
        parts.append(
            "closed-loop success "
            + ", ".join(
                f"{name} {v['summary']['success_rate']:.0%} ({v['summary']['furthest_stage']})"
                for name, v in labs.items()
            )
        )
    if record.get("failures"):
        parts.append(f"{len(record['failures'])} failures")
    if "seconds" in record:
        parts.append(f"{record['seconds']['round']:.1f}s")
    return ", ".join(parts)


def start_rollout(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The closed-loop evaluation of the starting model (round 0), when the run made one."""
    first = next((r for r in rounds if "rollout" in r and r["round"] == 0), None)
    return None if first is None else _rollout_summary(first)


def final_rollout(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last closed-loop evaluation of a run's rounds: pooled client success and each lab's summary."""
    last = next((r for r in reversed(rounds) if "rollout" in r and r["round"] > 0), None)
    return None if last is None else _rollout_summary(last)


def _rollout_summary(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "round": record["round"],
        "clients": record["rollout"].get("clients"),
        "labs": {name: v["summary"] for name, v in record["rollout"]["labs"].items()},
    }


def final_eval(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The mean over clients of the last evaluated round."""
    last = next((r for r in reversed(rounds) if "eval" in r), None)
    return None if last is None else {"round": last["round"], **last["eval"].get("mean", {})}
