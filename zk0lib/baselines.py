"""The two baselines a federated result must be read against, on the federated run's own budget.

- centralized: one model on the union of every client's training episodes, for as many samples as the
  federated run trains on in total (per round: the sampled clients x local steps x batch), drawing frames
  the way the federated mean weighs clients (fl.weighting: frames uniformly from the pool, or uniform:
  every client's frames as likely in total);
- local-only: each client alone on its own training episodes, for the samples it trains on in the
  federated run (local steps x batch in each round it is sampled in), judged on every client's held-out
  episodes and the eval-only datasets.

Same model and initial weights, same pooled normalization, lerobot's optimizer and schedule presets
(one optimizer over the whole run: no state is lost between rounds, an advantage federated clients do
not have), no proximal term, and the same evaluation at the same round marks. Both write run folders
of the federated format (summary kind: centralized / local-only). They run in this process: no data
leaves anything, so no Flower is involved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from zk0lib import data, evaluation, model, train
from zk0lib.book import RoundBook, RoundRecord, eval_record
from zk0lib.config import ExperimentConfig
from zk0lib.evaluation import HeldOutSets, closed_loop, eval_due, lab_rollout, rollout_due, sim_labs
from zk0lib.launch import RunResult, start_run
from zk0lib.runs import RunRecord, eval_only_of

KINDS = ("centralized", "local-only")
_SEED_TAG = {"centralized": 1, "local-only": 2}  # keeps each kind's random stream apart


def budget(cfg: ExperimentConfig) -> dict[str, Any]:
    """Optimizer steps and samples of the federated run that the baselines match: the clients sampled in
    each round (train.sampled_clients) times their local steps."""
    n, rounds, steps, batch = len(cfg.data.clients), cfg.fl.num_rounds, cfg.train.local_steps, cfg.train.batch_size
    sampled = [train.sampled_clients(cfg, r) for r in range(1, rounds + 1)]
    per_client = [steps * sum(i in s for s in sampled) for i in range(n)]
    return {
        "rounds": rounds,
        "clients": n,
        "clients_per_round": cfg.fl.sample_size(n),
        "sampled": sampled,
        "centralized_steps_per_round": [len(s) * steps for s in sampled],
        "local_steps_per_round": steps,
        "steps_per_client": per_client,
        "total_steps": sum(per_client),
        "total_samples": sum(per_client) * batch,
        "samples_per_client": [x * batch for x in per_client],
    }


class _Baseline:
    """What both baselines share: the run folder, the clients' data, the policy and the held-out sets."""

    def __init__(self, cfg: ExperimentConfig, kind: str, progress: Callable[[str], None] | None, run: RunRecord | None):
        self.cfg, self.kind = cfg, kind
        self.run = start_run(cfg, kind, progress, run)
        self.book = RoundBook(cfg, self.run, log=progress or (lambda _: None))
        t = time.perf_counter()
        self.clients = [data.open_client(cfg, i) for i in range(len(cfg.data.clients))]
        stats = data.pooled_train_stats(self.clients)  # the federation's normalization
        self.bundle = model.build_policy(cfg, self.clients[0].meta, stats)
        build = time.perf_counter() - t
        t = time.perf_counter()
        self.heldout = HeldOutSets(cfg, self.bundle.config, opened=self.clients)
        self.train_sets = [
            data.embedded_for(cfg, data.open_for(cfg, c, c.train_episodes, self.bundle.config), self.bundle)
            for c in self.clients
        ]
        self.run.update_summary(
            parameters=model.parameter_counts(self.bundle.policy),
            budget=budget(cfg),
            clients={
                c.name: {
                    "episodes": c.meta.total_episodes,
                    "train-episodes": len(c.train_episodes),
                    "converted-from": data.converted_from(c),
                }
                for c in self.clients
            },
            startup_seconds={"build_policy": build, "open_datasets": time.perf_counter() - t},
        )
        self.initial = {k: v.clone() for k, v in model.get_trainable(self.bundle.policy).items()}
        self.book.log(f"{kind} baseline: {budget(cfg)['total_samples']} samples in total, as the federated run")

    def seed(self, *parts: int) -> int:
        return train.derive_seed(self.cfg.seed, _SEED_TAG[self.kind], *parts)

    def stream(self, dataset: Any, seed: int, weights: torch.Tensor | None = None):
        return data.batch_stream(dataset, self.cfg.train.batch_size, self.cfg.train.num_workers, seed, weights)

    def pooled_weights(self) -> torch.Tensor | None:
        """Per-frame draw weights of the pooled training set: none (uniform over frames) for
        fl.weighting=frames; 1 / (client's frames) for uniform, so every client is drawn as often."""
        if self.cfg.fl.weighting == "frames":
            return None
        return torch.cat([torch.full((len(s),), 1.0 / len(s), dtype=torch.float64) for s in self.train_sets])

    def finish_round(self, record: RoundRecord, t0: float, train_seconds: float, eval_seconds: float) -> None:
        record["bytes_sent"] = record["bytes_received"] = 0
        record["seconds"] = {
            "round": time.perf_counter() - t0,
            "train": train_seconds,
            "evaluate": eval_seconds,
        }
        self.book.commit(record)

    def evaluate_round0(self) -> None:
        """The untrained model, judged exactly as round 0 of a federated run."""
        t0 = time.perf_counter()
        record = self.book.start_record(0)
        record["eval"] = eval_record(self.cfg, *self.heldout.evaluate(self.bundle))
        if rollout_due(self.cfg, 0):  # every kind of run starts from the same model: the same episodes
            record["rollout"] = closed_loop(self.cfg, self.bundle, None)
        self.finish_round(record, t0, 0.0, time.perf_counter() - t0)

    def result(self, t0: float) -> RunResult:
        self.book.complete()
        return RunResult.of(self.run, time.perf_counter() - t0)


def run_centralized(
    cfg: ExperimentConfig, progress: Callable[[str], None] | None = print, run: RunRecord | None = None
) -> RunResult:
    """One model on every client's training episodes pooled; rounds are marks of clients x local steps."""
    t_start = time.perf_counter()
    base = _Baseline(cfg, "centralized", progress, run)
    try:
        b = budget(cfg)
        pooled = torch.utils.data.ConcatDataset(base.train_sets)
        optimizer, scheduler = train.make_optimizer(base.bundle.policy, b["total_steps"], 0, cfg.train.warmup_steps)
        torch.manual_seed(base.seed())
        stream = base.stream(pooled, base.seed(0), base.pooled_weights())
        base.evaluate_round0()
        for server_round in range(1, cfg.fl.num_rounds + 1):
            t0 = time.perf_counter()
            metrics = train.train_steps(
                base.bundle,
                stream,
                optimizer,
                scheduler,
                b["centralized_steps_per_round"][server_round - 1],
                cfg,
                label=f"centralized, round {server_round}",
                progress=progress,
            )
            train_seconds = time.perf_counter() - t0
            record = base.book.train_record(server_round, {"centralized": metrics})
            t_eval = time.perf_counter()
            if eval_due(cfg, server_round):
                record["eval"] = eval_record(cfg, *base.heldout.evaluate(base.bundle))
            if rollout_due(cfg, server_round):
                videos = base.run.path / "videos" / f"round{server_round:03d}" if cfg.eval.rollout_videos else None
                record["rollout"] = closed_loop(cfg, base.bundle, videos)
            base.book.checkpoint(server_round, record.get("eval", {}), base.bundle)
            base.finish_round(record, t0, train_seconds, time.perf_counter() - t_eval)
        return base.result(t_start)
    except BaseException as e:
        base.book.fail(e)
        raise


def run_local_only(
    cfg: ExperimentConfig, progress: Callable[[str], None] | None = print, run: RunRecord | None = None
) -> RunResult:
    """Each client alone from the same initial weights; every round each local model is judged on every
    client's held-out episodes (eval.mean), on its own client's (eval.own) and on the eval-only sets."""
    t_start = time.perf_counter()
    base = _Baseline(cfg, "local-only", progress, run)
    try:
        b, policy = budget(cfg), base.bundle.policy
        weights, optimizers, streams = [], [], []
        for i, train_set in enumerate(base.train_sets):  # one optimizer per client over the same parameters
            model.set_trainable(policy, base.initial)
            weights.append(dict(base.initial))
            optimizers.append(train.make_optimizer(policy, b["steps_per_client"][i], 0, cfg.train.warmup_steps))
            streams.append(base.stream(train_set, base.seed(i)))
        base.evaluate_round0()
        names = [c.name for c in base.clients]
        for server_round in range(1, cfg.fl.num_rounds + 1):
            t0 = time.perf_counter()
            per_client: dict[str, Any] = {}
            for i, name in enumerate(names):
                if i not in b["sampled"][server_round - 1]:
                    continue  # as in the federated run, this client does not train this round
                model.set_trainable(policy, weights[i])
                torch.manual_seed(base.seed(server_round, i))
                optimizer, scheduler = optimizers[i]
                per_client[name] = train.train_steps(
                    base.bundle,
                    streams[i],
                    optimizer,
                    scheduler,
                    b["local_steps_per_round"],
                    cfg,
                    label=f"local-only {name}, round {server_round}",
                    progress=progress,
                ) | {"partition-id": i}
                weights[i] = {k: v.clone() for k, v in model.get_trainable(policy).items()}
            train_seconds = time.perf_counter() - t0
            record = base.book.train_record(server_round, per_client)
            t_eval = time.perf_counter()
            if eval_due(cfg, server_round):
                record["eval"] = _judge_local_models(base, names, weights)
            if rollout_due(cfg, server_round):
                record["rollout"] = _local_rollouts(base, names, weights, server_round)
            if server_round == cfg.fl.num_rounds and cfg.output.save_checkpoints:
                for i, name in enumerate(names):
                    model.set_trainable(policy, weights[i])
                    model.save_policy(base.bundle, base.run.checkpoint(f"final-{name}"))
            base.finish_round(record, t0, train_seconds, time.perf_counter() - t_eval)
        return base.result(t_start)
    except BaseException as e:
        base.book.fail(e)
        raise


def _judge_local_models(base: _Baseline, names: list[str], weights: list[dict]) -> dict[str, Any]:
    """Every local model on every held-out set, combined per dataset, over all pairs and over own pairs."""
    cfg = base.cfg
    models: dict[str, Any] = {}
    for i, name in enumerate(names):
        model.set_trainable(base.bundle.policy, weights[i])
        evals, extra, _ = base.heldout.evaluate(base.bundle, validation=False)  # local models have no best
        models[name] = eval_record(cfg, evals, extra)
    pairs = {f"{m}@{d}": ev for m, v in models.items() for d, ev in v["clients"].items()}
    own = {f"{m}@{m}": models[m]["clients"][m] for m in names}

    def across_models(section: str, dataset: str) -> dict[str, Any]:
        return evaluation.combine_clients({m: models[m][section][dataset] for m in names}, cfg)

    out = {
        "clients": {d: across_models("clients", d) for d in names},
        "mean": evaluation.combine_clients(pairs, cfg),
        "own": evaluation.combine_clients(own, cfg),
        "models": models,
    }
    eval_only = list(eval_only_of(next(iter(models.values()))))
    if eval_only:
        out["eval_only"] = {d: across_models("eval_only", d) for d in eval_only}
    return out


def _local_rollouts(base: _Baseline, names: list[str], weights: list[dict], server_round: int) -> dict[str, Any]:
    """Each local model in its own client's lab; every local model in each eval-only lab (pooled)."""
    from zk0lib.evaluation import pooled_success
    from zk0lib.sim.rollout import EpisodeResult, summarize

    cfg = base.cfg
    videos = base.run.path / "videos" / f"round{server_round:03d}" if cfg.eval.rollout_videos else None
    labs = sim_labs(cfg)
    out: dict[str, Any] = {"labs": {}}
    pooled: dict[str, list[dict]] = {name: [] for name, (_, role) in labs.items() if role == "eval_only"}
    per_model: dict[str, dict[str, Any]] = {name: {} for name in pooled}
    for i, name in enumerate(names):
        model.set_trainable(base.bundle.policy, weights[i])
        if name in labs:
            out["labs"][name] = {"role": "client", **lab_rollout(cfg, base.bundle, labs[name][0], videos)}
        for lab in pooled:
            result = lab_rollout(cfg, base.bundle, labs[lab][0], None)
            pooled[lab].extend(result["episodes"])
            per_model[lab][name] = result["summary"]
    for lab, episodes in pooled.items():
        seconds = sum(s["seconds"] for s in per_model[lab].values())
        summary = summarize(lab, [EpisodeResult(**e) for e in episodes], seconds)
        out["labs"][lab] = {"role": "eval_only", "summary": summary, "episodes": episodes, "models": per_model[lab]}
    clients = [v["summary"] for v in out["labs"].values() if v["role"] == "client"]
    if clients:
        out["clients"] = pooled_success(clients)
    return out


def run_baseline(
    kind: str, cfg: ExperimentConfig, progress: Callable[[str], None] | None = print, run: RunRecord | None = None
) -> RunResult:
    if kind not in KINDS:
        raise ValueError(f"unknown baseline {kind!r}: choose {', '.join(KINDS)}")
    return (run_centralized if kind == "centralized" else run_local_only)(cfg, progress, run)
