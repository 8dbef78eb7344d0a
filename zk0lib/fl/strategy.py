"""Flower's strategies as zk0 runs them: which one, its settings, how client updates weigh in the mean,
which clients a round samples, and the state a resumed run restores.

The strategies are Flower's own classes, unchanged: the server's round loop calls their public hooks
(`configure_train`, `aggregate_train`, `configure_evaluate`, `aggregate_evaluate`), so a wrapper strategy
(differential privacy) composes like any other.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from zk0lib import train
from zk0lib.config import ExperimentConfig

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}
# the server state a resumed run restores: FedAdam/FedYogi's moments (FedOpt; dicts by array name) and FedAvgM's
# momentum (a list in the global weights' order); FedAvg and FedProx keep none. FedAvgM's `current_arrays` and
# FedOpt's are the global weights, which resume restores and configure_train hands them.
_STATE = ("m_t", "v_t", "momentum_vector")
_LISTS = {"momentum_vector"}  # saved as a dict keyed by position


def weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of the scalar metrics (identity and list metrics left out)."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(r[weight_key]) for r in rows) or 1.0
    keys = {
        k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in ("partition-id", weight_key)
    }
    return MetricRecord(
        {k: sum(float(r[k]) * float(r[weight_key]) for r in rows if k in r) / total for k in sorted(keys)}
    )


def make_strategy(cfg: ExperimentConfig) -> Any:
    """The configured Flower strategy (fl.strategy and its settings)."""
    f, n = cfg.fl, len(cfg.data.clients)
    kwargs: dict[str, Any] = {
        "fraction_train": f.fraction_train,
        "fraction_evaluate": f.fraction_evaluate if cfg.eval.where == "clients" else 0.0,
        "min_train_nodes": f.min_train_clients or 1,  # Flower samples max(int(n x fraction_train), this)
        "min_evaluate_nodes": f.min_evaluate_clients or n,
        "min_available_nodes": f.min_available_clients or n,
        "train_metrics_aggr_fn": weighted_mean,
        "evaluate_metrics_aggr_fn": weighted_mean,
    }
    if f.strategy == "fedprox":
        kwargs["proximal_mu"] = f.proximal_mu
    if f.strategy == "fedavgm":
        kwargs |= {"server_learning_rate": f.server_lr or 1.0, "server_momentum": f.server_momentum}
    if f.strategy in ("fedadam", "fedyogi"):
        kwargs |= {
            "eta": f.server_lr or 1e-3,
            "eta_l": cfg.train.lr or 1e-4,
            "beta_1": f.server_beta1,
            "beta_2": f.server_beta2,
            "tau": f.server_tau,
        }
    return STRATEGIES[f.strategy](**kwargs)


def update_weight(cfg: ExperimentConfig, train_frames: int) -> int:
    """What a client's update weighs in the strategy's mean (its `num-examples`): its training frames
    (fl.weighting=frames, FedAvg's n_k, the objective centralized training on the pooled frames has), or the
    same for every client (uniform)."""
    return train_frames if cfg.fl.weighting == "frames" else cfg.train.local_steps * cfg.train.batch_size


def round_configs(cfg: ExperimentConfig, frozen_fingerprint: str) -> tuple[ConfigRecord, ConfigRecord]:
    """What the server adds to every train and evaluate message; the strategy adds its own (the round,
    and FedProx its proximal-mu: no other strategy sends one)."""
    shared = {"frozen-fingerprint": frozen_fingerprint, "num-rounds": cfg.fl.num_rounds}
    return ConfigRecord(dict(shared)), ConfigRecord(dict(shared))


class PartitionOrder:
    """The grid as a strategy samples from it: node ids in partition order, and Python's `random` seeded for
    the round (train.sampled_clients), so the same clients train in every run, whatever ids the nodes got."""

    def __init__(self, grid: Any, partitions: dict[int, int]):
        self.grid, self.partitions = grid, partitions

    def get_node_ids(self) -> list[int]:
        return sorted(self.grid.get_node_ids(), key=lambda node: self.partitions.get(node, 1 << 30))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    @staticmethod
    def seed(cfg: ExperimentConfig, server_round: int) -> None:
        random.seed(train.sampling_seed(cfg, server_round))  # Flower's strategies sample with `random`


def strategy_state(strategy: Any) -> dict[str, dict[str, np.ndarray]]:
    state = {}
    for name in _STATE:
        value = getattr(strategy, name, None)
        if value is not None:
            state[name] = {f"{i:06d}": v for i, v in enumerate(value)} if name in _LISTS else dict(value)
    return state


def restore_strategy(strategy: Any, state: dict[str, dict[str, np.ndarray]]) -> None:
    for name, values in state.items():
        setattr(strategy, name, [values[k] for k in sorted(values)] if name in _LISTS else values)
