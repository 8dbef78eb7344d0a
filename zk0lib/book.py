"""The round book: how every kind of run (federated, centralized, local-only) appends its rounds, logs its
progress, keeps its best and final checkpoints, and summarizes itself when it ends. One record format."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypedDict

from zk0lib import evaluation, model
from zk0lib.config import ExperimentConfig
from zk0lib.runs import RunRecord, eval_only_of, utc_now


class TrainSection(TypedDict):
    clients: dict[str, dict[str, Any]]  # per client: train_loss, prox_term, update_norm, samples, steps, ...
    aggregate: dict[str, float]  # the sample-weighted mean of every client metric


class EvalSection(TypedDict, total=False):
    clients: dict[str, dict[str, Any]]  # per client lab: loss, action_mae with their intervals, episodes
    mean: dict[str, Any]  # the clients' mean (each weighs the same) with its interval
    eval_only: dict[str, dict[str, Any]]  # datasets nobody trains on (runs before this round: "extra")
    validation: dict[str, Any]  # the clients' validation loss and its mean: what chooses the best round


class RoundRecord(TypedDict, total=False):
    """One line of a run's metrics.jsonl, the same for federated, centralized and local-only runs:
    `RoundBook.train_record` starts it, `eval_record` makes its eval section, `RoundBook.commit` writes it;
    report, compare, hub, tracking, bench and the app read it (`RunRecord.rounds()`)."""

    round: int  # 0: the starting model, evaluated only
    time: str
    train: TrainSection
    num_train_clients: int
    sampled: list[str]  # the clients the strategy sampled, in partition order (federated)
    failures: list[dict[str, Any]]  # clients that failed or were screened out, with a one-line reason
    eval: EvalSection
    rollout: dict[str, Any]  # closed loop: per lab a summary and episodes, pooled client success
    bytes_sent: int
    bytes_received: int
    seconds: dict[str, float]
    memory: dict[str, float]


def eval_record(
    cfg: ExperimentConfig,
    clients: dict[str, Any],
    eval_only: dict[str, Any],
    validation: dict[str, Any] | None = None,
) -> EvalSection:
    """A round record's `eval` section, the same for every kind of run: each client's held-out result, their
    mean with its interval (each client weighs the same), the eval-only datasets', and the clients'
    validation loss (each client weighs the same), on which the best round is chosen."""
    out: EvalSection = {"clients": clients, "mean": evaluation.combine_clients(clients, cfg) if clients else {}}
    if eval_only:
        out["eval_only"] = eval_only
    if validation:
        out["validation"] = {
            "clients": {n: {"loss": v["loss"], "episodes": v["episodes"]} for n, v in validation.items()},
            "loss": float(sum(v["loss"] for v in validation.values()) / len(validation)),
        }
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
    def start_record(server_round: int) -> RoundRecord:
        """A round's record before anything is known of it (round 0, or a round where no client trained)."""
        return {"round": server_round, "time": utc_now()}

    @staticmethod
    def train_record(server_round: int, clients: dict[str, dict[str, Any]]) -> RoundRecord:
        """The round's record head: per-client training metrics and their sample-weighted aggregate."""
        samples = sum(m.get("samples", 0) for m in clients.values()) or 1
        keys = sorted({k for m in clients.values() for k in m if k not in ("partition-id", "pid")})
        aggregate = {k: sum(m[k] * m.get("samples", 0) for m in clients.values() if k in m) / samples for k in keys}
        record = RoundBook.start_record(server_round)
        record["train"] = {"clients": clients, "aggregate": aggregate}
        record["num_train_clients"] = len(clients)
        return record

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "totals": self.totals, "wall_seconds": time.perf_counter() - self.t_start}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue a resumed run's book: its best round, totals and wall time so far."""
        self.best, self.totals = state["best"], state["totals"]
        self.t_start = time.perf_counter() - state["wall_seconds"]

    def checkpoint(self, server_round: int, judged: EvalSection | dict[str, Any], bundle: model.PolicyBundle) -> None:
        """Save the final round, and the round as `best` when its validation loss is the lowest so far (its
        test loss where the clients have no validation episodes: `selected_on` says which). `best` holds
        the round's test results, which did not choose it."""
        if server_round == 0 or not self.cfg.output.save_checkpoints:
            return
        mean = judged.get("mean", {})
        if "validation" in judged:
            selected_on, score = "validation", judged["validation"]["loss"]
        else:
            selected_on, score = "test", mean.get("loss")
        previous = None if self.best is None else self.best.get("selection_loss", self.best.get("loss"))
        if score is not None and (previous is None or score < previous):
            self.best = {"round": server_round, **mean, "selected_on": selected_on, "selection_loss": score}
            model.save_policy(bundle, self.run.checkpoint("best"))
        if server_round == self.cfg.fl.num_rounds:
            self.save_final(bundle)

    def save_final(self, bundle: model.PolicyBundle) -> None:
        """The run's final model (after its last round, or the last good one of a run stopped early)."""
        if self.cfg.output.save_checkpoints:
            model.save_policy(bundle, self.run.checkpoint("final"))

    def commit(self, record: RoundRecord) -> None:
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
    for name, ev in eval_only_of(record.get("eval", {})).items():
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
