"""The Flower apps (Message API): a ClientApp per robot owner, a ServerApp that runs the strategy.

Only trainable weights travel, as raw little-endian bytes (`fl.transport_dtype`: float32 weights, or
bfloat16 deltas from the global weights, which keep small updates that bf16 weights would round away).
Before round 1 the server asks every client to describe its dataset (features and aggregate stats, never
frames) and sends back one pooled normalization; every process builds its policy once and reuses it.
`flwr run . <connection>` runs these apps unchanged on the Deployment Engine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import re
import resource
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from zk0lib import data, env, model, train
from zk0lib.config import ExperimentConfig, load_config, parse_faults, validate
from zk0lib.evaluation import HeldOutSets, RoundBook, closed_loop, eval_due, rollout_due
from zk0lib.runs import RunRecord, load_resume_state, resume_round, save_resume_state, utc_now

RAW = "zk0.raw"  # stype of an array holding the parameter itself
RAW_DELTA = "zk0.raw-delta"  # stype of an array holding (local - global)
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- transport


def encode_arrays(
    weights: dict[str, torch.Tensor], dtype: str, reference: dict[str, torch.Tensor] | None = None
) -> ArrayRecord:
    """Named tensors -> ArrayRecord of raw bytes in `dtype`; with `reference`, the difference is sent."""
    out = OrderedDict()
    for name, w in weights.items():
        value = w.detach().to("cpu", torch.float32)
        if reference is not None:
            value = value - reference[name].to(torch.float32)
        value = value.to(_TORCH_DTYPES[dtype]).contiguous()
        out[name] = Array(
            dtype=dtype,
            shape=tuple(value.shape),
            stype=RAW if reference is None else RAW_DELTA,
            data=value.view(torch.uint8).numpy().tobytes(),
        )
    return ArrayRecord(out)


def decode_arrays(record: ArrayRecord, reference: dict[str, torch.Tensor] | None = None) -> OrderedDict:
    """ArrayRecord (zk0 raw, raw-delta or Flower numpy) -> fp32 tensors; deltas are added to `reference`."""
    out = OrderedDict()
    for name, arr in record.items():
        if arr.stype in (RAW, RAW_DELTA):
            flat = torch.frombuffer(bytearray(arr.data), dtype=_TORCH_DTYPES[arr.dtype])
            value = flat.reshape(tuple(arr.shape)).to(torch.float32)
            if arr.stype == RAW_DELTA:
                if reference is None:
                    raise ValueError(f"array {name} is a delta but no reference weights were given")
                value = reference[name].to(torch.float32) + value
        else:
            value = torch.from_numpy(np.array(arr.numpy(), dtype=np.float32))
        out[name] = value
    return out


def to_numpy_record(weights: dict[str, torch.Tensor]) -> ArrayRecord:
    """The form Flower's strategies aggregate: numpy float32 arrays."""
    return ArrayRecord(OrderedDict((k, Array(v.numpy())) for k, v in weights.items()))


def payload_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


# ----------------------------------------------------------------------------- config


def config_from_run_config(run_config: dict[str, Any]) -> ExperimentConfig:
    """`config-json` (base64 JSON, written by `zk0 train`) wins; else `preset` plus dotted `set` overrides."""
    raw = str(run_config.get("config-json", "") or "")
    if raw:
        text = raw if raw.lstrip().startswith("{") else base64.b64decode(raw).decode()
        return validate(ExperimentConfig.from_dict(json.loads(text)))
    return load_config(str(run_config.get("preset", "demo")), str(run_config.get("set", "") or ""))


def encode_config(cfg: ExperimentConfig) -> str:
    return base64.b64encode(cfg.to_json().encode()).decode()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stats_to_record(stats: dict[str, dict[str, Any]]) -> ArrayRecord:
    """Normalization stats of the policy's features (observations and action) as named float64 arrays."""
    return ArrayRecord(
        OrderedDict(
            (f"{feat}|{stat}", Array(np.asarray(value, dtype=np.float64)))
            for feat, s in sorted(stats.items())
            if feat.startswith("observation.") or feat == "action"
            for stat, value in sorted(s.items())
        )
    )


def stats_from_record(record: ArrayRecord) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in record.items():
        feat, stat = key.split("|")
        out.setdefault(feat, {})[stat] = arr.numpy()
    return out


def stats_digest(record: ArrayRecord) -> str:
    digest = hashlib.sha256()
    for key, arr in record.items():
        digest.update(key.encode() + arr.data)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- client side

_PROCESS: dict[Any, Any] = {}  # this process's policies, processors and datasets, reused across rounds


def _memo(key: Any, build):
    if key not in _PROCESS:
        _PROCESS[key] = build()
    return _PROCESS[key]


def _model_key(cfg: ExperimentConfig) -> str:
    return _digest(
        json.dumps([cfg.model.__dict__, cfg.train.__dict__, cfg.data.rename_map], sort_keys=True, default=str)
    )


def partition_of(context: Context, cfg: ExperimentConfig) -> int:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config 'partition-id=N'")
    pid = int(node["partition-id"])
    if not 0 <= pid < len(cfg.data.clients):
        raise ValueError(f"partition-id {pid} is not a client of this config (0..{len(cfg.data.clients) - 1})")
    return pid


def _client_config(context: Context) -> ExperimentConfig:
    """The run's config, with this node's own dataset folder if its node config names one."""
    env.quiet()
    cfg = config_from_run_config(dict(context.run_config))
    root = context.node_config.get("dataset-root")
    if root:
        cfg.data.clients[partition_of(context, cfg)].root = str(root)
    env.use_offline_hub_if_possible(cfg)
    return cfg


class _Local:
    """One client's datasets in this process."""

    def __init__(self, cfg: ExperimentConfig, pid: int):
        self.pid = pid
        self.data = data.open_client(cfg, pid)
        self.train_set = None
        self.heldout_set = None
        self.stream: data.BatchStream | None = None

    def datasets(self, policy_config: Any, video_backend: str | None) -> tuple[Any, Any]:
        if self.train_set is None:
            self.train_set = data.open_dataset(self.data, self.data.train_episodes, policy_config, video_backend)
            self.heldout_set = data.open_dataset(self.data, self.data.heldout_episodes, policy_config, video_backend)
        return self.train_set, self.heldout_set

    def train_stream(self, cfg: ExperimentConfig) -> data.BatchStream:
        """This client's batch stream; the only live one in the process: a Ray actor serves many clients in
        turn, and every idle stream would keep its worker processes and a prefetched round in memory."""
        for other in _PROCESS.values():
            if isinstance(other, _Local) and other is not self and other.stream is not None:
                other.stream.close()
                other.stream = None
        if self.stream is None:
            self.stream = data.BatchStream(self.train_set, cfg.train.batch_size, cfg.train.num_workers)
        return self.stream

    def prefetch_round(self, cfg: ExperimentConfig, server_round: int) -> None:
        """Start decoding the first batches of `server_round` while this process waits (none past the last)."""
        if 1 <= server_round <= cfg.fl.num_rounds:
            self.train_stream(cfg).prefetch(train.round_seed(cfg, server_round, self.pid))


def _local(cfg: ExperimentConfig, pid: int) -> _Local:
    return _memo(
        ("local", _digest(json.dumps(cfg.data.__dict__, default=str, sort_keys=True)), cfg.seed, pid),
        lambda: _Local(cfg, pid),
    )


def _client_bundle(cfg: ExperimentConfig, local: _Local, msg: Message) -> model.PolicyBundle:
    """The process's policy (built once) with processors for the federation's pooled stats."""
    conf, stats = msg.content["config"], msg.content["norm_stats"]
    key = (_model_key(cfg), stats_digest(stats))
    bundle = _memo(("bundle", *key), lambda: model.build_policy(cfg, local.data.meta, stats_from_record(stats)))
    fingerprint = _memo(("fingerprint", *key), lambda: model.frozen_fingerprint(bundle.policy))
    if fingerprint != conf["frozen-fingerprint"]:
        raise RuntimeError(
            f"client {local.data.name}: frozen weights differ from the server's (fingerprint {fingerprint} vs "
            f"{conf['frozen-fingerprint']}): both sides must load the same model.pretrained (and revision)"
        )
    return bundle


client_app = ClientApp()


@client_app.query()
def client_describe(msg: Message, context: Context) -> Message:
    """Features and aggregate normalization stats of this client's dataset (no frames leave)."""
    cfg = _client_config(context)
    pid = partition_of(context, cfg)
    local = _local(cfg, pid)
    meta = local.data.meta
    checked = _validate_local(cfg, local)
    info = ConfigRecord(
        {
            "validation-errors": len(checked.errors),
            "validation-summary": "; ".join(f"{f.check} ep {f.episode}: {f.message}" for f in checked.errors[:3]),
            "name": local.data.name,
            "partition-id": pid,
            "fps": int(meta.fps),
            "frames": int(meta.total_frames),
            "episodes": int(meta.total_episodes),
            "train-episodes": len(local.data.train_episodes),
            "train-frames": local.data.train_frames,
            "heldout-episodes": len(local.data.heldout_episodes),
            "features": json.dumps(meta.features, default=list),
            "robot-type": str(meta.robot_type or ""),
        }
    )
    first_round = int(msg.content["config"].get("first-round", 0))
    if first_round and not checked.errors:  # start-up work, done while the server builds its policy
        local.datasets(model.policy_config(cfg, model.resolve_device(cfg.model.device)), cfg.data.video_backend)
        local.prefetch_round(cfg, first_round)
    return Message(RecordDict({"info": info, "stats": stats_to_record(meta.stats)}), reply_to=msg)


def _validate_local(cfg: ExperimentConfig, local: _Local) -> Any:
    """This client's own check of its dataset (cached: free when `zk0 train` already ran it)."""
    from zk0lib.validate import Report, validate_cached

    if cfg.data.validate == "off" or local.data.root is None:
        return Report()
    return validate_cached(cfg, local.data.name, local.data.root)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    cfg = _client_config(context)
    pid = partition_of(context, cfg)
    local = _local(cfg, pid)
    conf = msg.content["config"]
    server_round = int(conf["server-round"])
    bundle = _client_bundle(cfg, local, msg)
    local.datasets(bundle.config, cfg.data.video_backend)
    t_decode = time.perf_counter()
    received = decode_arrays(msg.content["arrays"])
    model.set_trainable(bundle.policy, received)
    t_train = time.perf_counter()
    mu = float(conf.get("proximal-mu", 0.0))  # only FedProx's configure_train sends it
    metrics = train.train_round(bundle, local.train_stream(cfg), cfg, server_round, pid, mu, local.data.name)
    local.prefetch_round(cfg, server_round + 1)  # decoded while the server aggregates and evaluates
    fault = injected_fault(cfg, pid, server_round)
    t_encode = time.perf_counter()
    dtype = cfg.fl.transport_dtype
    arrays = encode_arrays(
        model.get_trainable(bundle.policy), dtype, reference=received if dtype != "float32" else None
    )
    if fault in ("nan", "shape"):
        arrays = _corrupt(arrays, fault)
    now = time.perf_counter()
    metrics |= {
        "num-examples": update_weight(cfg, local.data.train_frames),
        "proximal_mu": mu,
        "partition-id": pid,
        "payload-bytes": payload_bytes(arrays),
        "setup_seconds": t_decode - t0,  # config, datasets and the policy (built in the first round only)
        "serialize_seconds": (t_train - t_decode) + (now - t_encode),
        "handler_seconds": now - t0,
        "torch_threads": torch.get_num_threads(),
        "rss_mib": psutil.Process().memory_info().rss / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    cfg = _client_config(context)
    pid = partition_of(context, cfg)
    local = _local(cfg, pid)
    bundle = _client_bundle(cfg, local, msg)
    _, heldout = local.datasets(bundle.config, cfg.data.video_backend)
    model.set_trainable(bundle.policy, decode_arrays(msg.content["arrays"]))
    result = train.evaluate(bundle, heldout, cfg)
    return Message(RecordDict({"metrics": MetricRecord(eval_to_metrics(result, pid))}), reply_to=msg)


def update_weight(cfg: ExperimentConfig, train_frames: int) -> int:
    """What a client's update weighs in the strategy's mean (its `num-examples`): its training frames
    (fl.weighting=frames, FedAvg's n_k, the objective centralized training on the pooled frames has), or the
    same for every client (uniform)."""
    return train_frames if cfg.fl.weighting == "frames" else cfg.train.local_steps * cfg.train.batch_size


def injected_fault(cfg: ExperimentConfig, pid: int, server_round: int) -> str | None:
    """Carry out fl.inject_failure for this client and round (tests only; validate() guards it).

    raise: the client raises; exit: its process dies; hang: it answers after fl.round_timeout_s;
    nan / shape: it returns a poisoned update (returned, for the caller to apply)."""
    if not cfg.fl.inject_failure:
        return None
    modes = [m for m, p, r in parse_faults(cfg.fl.inject_failure) if p == pid and r == server_round]
    if not modes:
        return None
    mode = modes[0]
    if mode == "raise":
        raise RuntimeError(f"injected failure: client {pid} raises in round {server_round} (fl.inject_failure)")
    if mode == "exit":
        os._exit(17)
    if mode == "hang":
        time.sleep(cfg.fl.round_timeout_s + 5)
    return mode


def _corrupt(arrays: ArrayRecord, mode: str) -> ArrayRecord:
    """A poisoned copy of an update: NaN in its first tensor, or its first tensor with one row too many."""
    out = OrderedDict(arrays.items())
    name, first = next(iter(out.items()))
    value = torch.frombuffer(bytearray(first.data), dtype=_TORCH_DTYPES[first.dtype]).reshape(tuple(first.shape))
    if mode == "nan":
        value = value.clone()
        value.view(-1)[0] = float("nan")
    else:
        value = torch.cat([value, value[:1]]) if value.dim() else value.reshape(1).repeat(2)
    out[name] = Array(
        dtype=first.dtype, shape=tuple(value.shape), stype=first.stype, data=value.view(torch.uint8).numpy().tobytes()
    )
    return ArrayRecord(out)


def eval_to_metrics(result: dict[str, Any], pid: int) -> dict[str, Any]:
    """An evaluation result as a flat MetricRecord (numbers and lists of numbers only)."""
    out: dict[str, Any] = {"partition-id": pid, "num-examples": int(result["frames"])}
    for key, value in result.items():
        if isinstance(value, dict):
            out[f"{key}-ids"] = [int(k) for k in value]
            out[f"{key}-values"] = [float(v) for v in value.values()]
        elif isinstance(value, list):
            out[key] = [float(v) for v in value]
        else:
            out[key] = value
    return out


def eval_from_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key.endswith("-ids"):
            base = key[: -len("-ids")]
            out[base] = {str(i): v for i, v in zip(value, metrics[f"{base}-values"], strict=True)}
        elif not key.endswith("-values") and key not in ("partition-id", "num-examples"):
            out[key] = value
    return out


# ----------------------------------------------------------------------------- strategy


def _weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Sample-weighted mean of the scalar metrics (identity and list metrics left out)."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(r[weight_key]) for r in rows) or 1.0
    keys = {
        k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in ("partition-id", weight_key)
    }
    return MetricRecord(
        {k: sum(float(r[k]) * float(r[weight_key]) for r in rows if k in r) / total for k in sorted(keys)}
    )


class _Zk0Mixin:
    """Transport encoding, reply checks, deterministic aggregation order and per-round bookkeeping."""

    def __init__(self, *, server: FederatedServer, **kwargs: Any):
        super().__init__(train_metrics_aggr_fn=_weighted_mean, evaluate_metrics_aggr_fn=_weighted_mean, **kwargs)
        self.zk0 = server

    def _encode_messages(self, messages: Any, arrays: ArrayRecord, phase: str) -> list[Message]:
        messages = list(messages)
        if not messages:
            return messages
        t0 = time.perf_counter()
        global_w = decode_arrays(arrays)
        # training starts from the transport's rounding of the global weights; evaluation judges them exactly
        encoded = encode_arrays(global_w, self.zk0.cfg.fl.transport_dtype if phase == "train" else "float32")
        self.zk0.round_state[f"{phase}_serialize_seconds"] = time.perf_counter() - t0
        for m in messages:
            m.content["arrays"] = encoded
            m.content["norm_stats"] = self.zk0.stats_record
        self.zk0.round_state["global"] = global_w
        self.zk0.round_state[f"{phase}_nodes"] = [m.metadata.dst_node_id for m in messages]
        self.zk0.round_state[f"{phase}_bytes_sent"] = payload_bytes(encoded) * len(messages)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.zk0.start_round(server_round)
        return self._encode_messages(super().configure_train(server_round, arrays, config, grid), arrays, "train")

    def aggregate_train(self, server_round: int, replies: Any):
        replies = list(replies)
        accepted = self.zk0.accept_train_replies(server_round, replies)
        if not accepted:
            return None, None
        return super().aggregate_train(server_round, accepted)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if not eval_due(self.zk0.cfg, server_round):
            return []
        return self._encode_messages(super().configure_evaluate(server_round, arrays, config, grid), arrays, "evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Any):
        replies = list(replies)
        self.zk0.collect_client_evals(server_round, replies)
        ok = [r for r in replies if not r.has_error()]
        return super().aggregate_evaluate(server_round, ok) if ok else None


_STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi}


def make_strategy(cfg: ExperimentConfig, server: FederatedServer) -> Any:
    f, n = cfg.fl, len(cfg.data.clients)
    base = _STRATEGIES[f.strategy]
    kwargs: dict[str, Any] = {
        "fraction_train": f.fraction_train,
        "fraction_evaluate": f.fraction_evaluate if cfg.eval.where == "clients" else 0.0,
        "min_train_nodes": f.min_train_clients or 1,  # Flower samples max(int(n x fraction_train), this)
        "min_evaluate_nodes": f.min_evaluate_clients or n,
        "min_available_nodes": f.min_available_clients or n,
    }
    if f.strategy == "fedprox":
        kwargs["proximal_mu"] = f.proximal_mu
    if f.strategy in ("fedadam", "fedyogi"):
        kwargs |= {
            "eta": f.server_lr,
            "eta_l": cfg.train.lr or 1e-4,
            "beta_1": f.server_beta1,
            "beta_2": f.server_beta2,
            "tau": f.server_tau,
        }
    cls = type(f"Zk0{base.__name__}", (_Zk0Mixin, base), {})
    return cls(server=server, **kwargs)


# ----------------------------------------------------------------------------- server side


class FederatedServer:
    """Everything the ServerApp does around the strategy: describe clients, evaluate, record, checkpoint."""

    def __init__(self, cfg: ExperimentConfig, run: RunRecord, grid: Grid, resume: bool = False):
        self.cfg, self.run, self.grid, self.resume = cfg, run, grid, resume
        self.names: dict[int, str] = {}  # node id -> client name
        self.partitions: dict[int, int] = {}  # node id -> partition id
        self.round_state: dict[str, Any] = {}
        self.book = RoundBook(cfg, run)
        self.resume_seconds: list[float] = []  # time to write checkpoints/resume, per round of this process

    # -- setup
    def wait_for_nodes(self) -> list[int]:
        need = self.cfg.fl.min_available_clients or len(self.cfg.data.clients)
        deadline = time.monotonic() + self.cfg.fl.round_timeout_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= need:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {need} clients connected within fl.round_timeout_s")
            time.sleep(1.0)

    def describe_clients(self, nodes: list[int], first_round: int = 0) -> list[dict[str, Any]]:
        """Every client's features and stats; with `first_round`, clients also open their datasets and start
        decoding that round's first batches, so round 1 starts as warm as the others."""
        config = ConfigRecord({"zk0": "describe", "first-round": first_round})
        messages = [
            Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes
        ]
        infos = []
        for reply in self.grid.send_and_receive(messages, timeout=self.cfg.fl.round_timeout_s):
            if reply.has_error():
                raise RuntimeError(
                    f"client on node {reply.metadata.src_node_id} could not describe its dataset: {reply.error.reason}"
                )
            info = dict(reply.content["info"])
            info["stats"] = stats_from_record(reply.content["stats"])
            info["features"] = json.loads(info["features"])
            self.names[reply.metadata.src_node_id] = info["name"]
            self.partitions[reply.metadata.src_node_id] = int(info["partition-id"])
            infos.append(info)
        infos.sort(key=lambda i: i["partition-id"])
        pids = [i["partition-id"] for i in infos]
        if len(set(pids)) != len(pids):
            raise RuntimeError(f"two SuperNodes serve the same partition-id: {pids}")
        check_compatible(infos, self.cfg)
        return infos

    def federation_meta(self, infos: list[dict[str, Any]], stats: dict) -> Any:
        """A LeRobot metadata folder with the clients' shared features and pooled stats (for the server's policy)."""
        from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

        root = self.run.path / "federation_meta"
        if not (root / "meta" / "info.json").exists():
            feats = {
                k: v
                for k, v in infos[0]["features"].items()
                if k not in ("timestamp", "frame_index", "episode_index", "index", "task_index")
            }
            for v in feats.values():
                v["shape"] = tuple(v["shape"])
            meta = LeRobotDatasetMetadata.create(
                repo_id="zk0/federation",
                fps=int(infos[0]["fps"]),
                features=feats,
                robot_type=infos[0]["robot-type"] or None,
                root=root,
                use_videos=True,
            )
        else:
            meta = LeRobotDatasetMetadata("zk0/federation", root=root)
        meta.stats = stats
        return meta

    # -- the run
    def run_rounds(self) -> None:
        cfg = self.cfg
        started = {"serverapp_process_age": time.time() - psutil.Process().create_time()}
        t = time.perf_counter()
        nodes = self.wait_for_nodes()
        started["wait_for_clients"] = time.perf_counter() - t
        t = time.perf_counter()
        done = resume_round(self.run) if self.resume else None
        infos = self.describe_clients(nodes, first_round=(done or 0) + 1)
        started["describe_clients"] = time.perf_counter() - t
        t = time.perf_counter()
        self.stats_record = stats_to_record(data.pooled_stats([_StatsOnly(i["stats"]) for i in infos]))
        stats = stats_from_record(self.stats_record)  # what clients get, to the last bit
        self.bundle = model.build_policy(cfg, self.federation_meta(infos, stats), stats)
        started["build_policy"] = time.perf_counter() - t
        counts = model.parameter_counts(self.bundle.policy)
        self.run.update_summary(
            parameters=counts,
            clients={i["name"]: {k: i[k] for k in _CLIENT_SUMMARY_KEYS} for i in infos},
        )
        t = time.perf_counter()
        self.heldout = HeldOutSets(cfg, self.bundle.config, clients=cfg.eval.where == "server")
        started["open_eval_sets"] = time.perf_counter() - t
        self.run.update_summary(startup_seconds=started)
        train_config, evaluate_config = round_configs(cfg, model.frozen_fingerprint(self.bundle.policy))
        strategy = make_strategy(cfg, self)
        arrays = to_numpy_record(model.get_trainable(self.bundle.policy))
        first = 1
        if self.resume:
            first, arrays = self.restore(strategy)
        self.book.log(
            f"{len(infos)} clients, {counts['trainable']:,} trainable of {counts['total']:,} parameters, "
            f"strategy {cfg.fl.strategy}, {cfg.fl.num_rounds} rounds x {cfg.train.local_steps} local steps"
            + (f", resumed after round {first - 1}" if first > 1 else "")
        )
        if first == 1:  # the starting model, judged as every later round is
            self.start_round(0)
            self.evaluate_on_clients(strategy, 0, arrays, evaluate_config)
            self.end_of_round(0, arrays)
        for server_round in range(first, cfg.fl.num_rounds + 1):
            arrays = self.one_round(strategy, server_round, arrays, train_config, evaluate_config)

    def one_round(
        self,
        strategy: Any,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        eval_config: ConfigRecord,
    ) -> ArrayRecord:
        """Train, aggregate, evaluate and record one round (the loop of Flower's Strategy.start), then save
        what a resumed run needs to continue after it."""
        timeout = self.cfg.fl.round_timeout_s
        random.seed(train.sampling_seed(self.cfg, server_round))  # Flower's strategies sample with `random`
        messages = strategy.configure_train(server_round, arrays, train_config, _PartitionOrder(self))
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        arrays = aggregated if aggregated is not None else arrays
        self.evaluate_on_clients(strategy, server_round, arrays, eval_config)
        self.end_of_round(server_round, arrays)
        t = time.perf_counter()
        save_resume_state(self.run, server_round, arrays, strategy_state(strategy), self.book)
        self.resume_seconds.append(time.perf_counter() - t)
        self.run.update_summary(resume_checkpoint_seconds=self.resume_seconds)
        return arrays

    def evaluate_on_clients(self, strategy: Any, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> None:
        """With eval.where=clients, the clients judge `arrays` (fp32) on their held-out episodes."""
        messages = strategy.configure_evaluate(server_round, arrays, config, self.grid)
        if messages:
            replies = self.grid.send_and_receive(messages, timeout=self.cfg.fl.round_timeout_s)
            strategy.aggregate_evaluate(server_round, replies)

    def restore(self, strategy: Any) -> tuple[int, ArrayRecord]:
        """The round to start from and the global weights, with the strategy's and the book's state."""
        state = load_resume_state(self.run)
        if state is None:
            raise RuntimeError(f"run {self.run.run_id} has no resumable round (checkpoints/resume is missing)")
        for name, values in state["strategy"].items():
            setattr(strategy, name, values)
        self.book.restore(state["book"])
        return state["round"] + 1, to_numpy_record({k: torch.from_numpy(v) for k, v in state["arrays"].items()})

    # -- per round
    def start_round(self, server_round: int) -> None:
        self.round_state = {"t0": time.perf_counter(), "train": {}, "failures": [], "client_evals": {}}

    def accept_train_replies(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Decode, check and order the replies; errors and malformed updates are recorded and left out."""
        st = self.round_state
        global_w = st["global"]
        accepted = []
        received = 0
        t_decode = time.perf_counter()
        for reply in replies:
            name = self.names.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
            if reply.has_error():
                st["failures"].append({"client": name, "round": server_round, **failure_reason(reply.error.reason)})
                continue
            arrays = reply.content["arrays"]
            received += payload_bytes(arrays)
            weights, problem = screen_update(arrays, global_w, self.cfg.fl.max_update_norm)
            if problem is not None:
                st["failures"].append({"client": name, "round": server_round, "reason": f"rejected: {problem}"})
                continue
            reply.content["arrays"] = to_numpy_record(weights)
            metrics = dict(reply.content["metrics"])
            st["train"][name] = {k: v for k, v in metrics.items() if k != "num-examples"}
            st["train"][name]["weight"] = float(metrics["num-examples"])
            accepted.append(reply)
        replied = {r.metadata.src_node_id for r in replies}
        for node in st.get("train_nodes", []):
            if node not in replied:
                name = self.names.get(node, f"node-{node}")
                reason = f"no reply within fl.round_timeout_s={self.cfg.fl.round_timeout_s:g}"
                st["failures"].append({"client": name, "round": server_round, "reason": reason})
        st["bytes_received"] = received
        st["decode_seconds"] = time.perf_counter() - t_decode
        need = self.cfg.fl.min_train_clients or len(st["train_nodes"])
        if len(accepted) < need:
            reasons = "; ".join(f"{f['client']}: {f['reason']}" for f in st["failures"]) or "no replies"
            raise RuntimeError(
                f"round {server_round}: only {len(accepted)} usable client updates, "
                f"fl.min_train_clients={need} needed ({reasons})"
            )
        accepted.sort(key=lambda r: int(r.content["metrics"]["partition-id"]))  # same sum order every run
        st["train_seconds"] = time.perf_counter() - st["t0"]
        return accepted

    def collect_client_evals(self, server_round: int, replies: list[Message]) -> None:
        for reply in replies:
            name = self.names.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
            if reply.has_error():
                self.round_state["failures"].append(
                    {"client": name, "round": server_round, "phase": "evaluate", **failure_reason(reply.error.reason)}
                )
            else:
                self.round_state["client_evals"][name] = eval_from_metrics(dict(reply.content["metrics"]))

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """After every round (and before round 1): evaluate, record, checkpoint."""
        cfg, st, book = self.cfg, self.round_state, self.book
        t_eval = time.perf_counter()
        model.set_trainable(self.bundle.policy, decode_arrays(arrays))
        evals: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        if eval_due(cfg, server_round):
            evals, extra = self.heldout.evaluate(self.bundle)
            if cfg.eval.where == "clients":
                evals = st.get("client_evals", {})
        eval_seconds = time.perf_counter() - t_eval
        mean = train.combine_clients(evals, cfg) if evals else {}
        record: dict[str, Any] = {"round": server_round, "time": utc_now()}
        if server_round > 0:
            record = book.train_record(server_round, st.get("train", {}))
            record |= {
                "sampled": [
                    self.names.get(n, f"node-{n}")
                    for n in sorted(st.get("train_nodes", []), key=lambda n: self.partitions.get(n, 0))
                ],
                "bytes_sent": st.get("train_bytes_sent", 0) + st.get("evaluate_bytes_sent", 0),
                "bytes_received": st.get("bytes_received", 0),
                "failures": st.get("failures", []),
            }
        elif st.get("evaluate_bytes_sent"):  # round 0, judged by the clients
            record["bytes_sent"] = st["evaluate_bytes_sent"]
        if evals:
            record["eval"] = {"clients": evals, "mean": mean}
        if extra:
            record.setdefault("eval", {})["extra"] = extra
        t_rollout = time.perf_counter()
        if rollout_due(cfg, server_round):
            videos = self.run.path / "videos" / f"round{server_round:03d}" if cfg.eval.rollout_videos else None
            record["rollout"] = closed_loop(cfg, self.bundle, videos)
        rollout_seconds = time.perf_counter() - t_rollout
        t_ckpt = time.perf_counter()
        book.checkpoint(server_round, mean, self.bundle)
        record["seconds"] = {
            "round": time.perf_counter() - st.get("t0", t_eval),
            "train": st.get("train_seconds"),
            "server_serialize": st.get("train_serialize_seconds", 0.0) + st.get("decode_seconds", 0.0),
            "evaluate": eval_seconds,
            "rollout": rollout_seconds,
            "checkpoint": time.perf_counter() - t_ckpt,
        }
        record["memory"] = {
            "server_rss_mib": psutil.Process().memory_info().rss / 2**20,
            "server_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        book.commit(record)
        return MetricRecord({k: v for k, v in mean.items() if isinstance(v, float)})


def round_configs(cfg: ExperimentConfig, frozen_fingerprint: str) -> tuple[ConfigRecord, ConfigRecord]:
    """What the server adds to every train and evaluate message; the strategy adds its own (the round,
    and FedProx its proximal-mu: no other strategy sends one)."""
    shared = {"frozen-fingerprint": frozen_fingerprint, "num-rounds": cfg.fl.num_rounds}
    return ConfigRecord(dict(shared)), ConfigRecord(dict(shared))


_CLIENT_SUMMARY_KEYS = ("partition-id", "episodes", "frames", "train-episodes", "train-frames", "heldout-episodes")


class _PartitionOrder:
    """The grid as the strategy samples from it: node ids in partition order, so the seeded sample picks the
    same clients in every run (train.sampled_clients), whatever ids the nodes got."""

    def __init__(self, server: FederatedServer):
        self.server = server

    def get_node_ids(self) -> list[int]:
        order = self.server.partitions
        return sorted(self.server.grid.get_node_ids(), key=lambda node: order.get(node, 1 << 30))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server.grid, name)


class _StatsOnly:
    """What lerobot's stats merge reads from a dataset's metadata."""

    def __init__(self, stats: dict):
        self.stats = stats


def check_update(arrays: ArrayRecord, global_w: dict[str, torch.Tensor]) -> str | None:
    """Why a returned update cannot be aggregated (keys, shapes, dtype), or None when it can."""
    if set(arrays.keys()) != set(global_w):
        missing, extra = set(global_w) - set(arrays.keys()), set(arrays.keys()) - set(global_w)
        return f"keys differ from the global weights ({len(missing)} missing, {len(extra)} unexpected)"
    for name, arr in arrays.items():
        if tuple(arr.shape) != tuple(global_w[name].shape):
            return f"{name}: shape {tuple(arr.shape)} != {tuple(global_w[name].shape)}"
        if arr.stype in (RAW, RAW_DELTA) and arr.dtype not in _TORCH_DTYPES:
            return f"{name}: unsupported dtype {arr.dtype}"
    return None


def failure_reason(raw: str) -> dict[str, str]:
    """A client error as one readable line (the exception's own message), with the full text as detail."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    if "Message: " in text:
        short = text.rsplit("Message: ", 1)[1]
    elif "ActorDiedError" in text or "actor died" in text.lower():
        short = "the client's process died mid-round"
    else:
        short = text.strip().splitlines()[0] if text.strip() else "unknown error"
    short = short.strip().strip("'>\"").splitlines()[0][:300]
    return {"reason": short, "detail": text[-3000:]}


def screen_update(
    arrays: ArrayRecord, global_w: dict[str, torch.Tensor], max_norm: float
) -> tuple[OrderedDict | None, str | None]:
    """(the client's weights, None) when an update may be aggregated, else (None, why not): same keys,
    shapes and dtypes as the global weights, finite values, ||update|| <= max_norm."""
    problem = check_update(arrays, global_w)
    if problem is not None:
        return None, problem
    weights = decode_arrays(arrays, reference=global_w)
    if not all(torch.isfinite(w).all() for w in weights.values()):
        return None, "update has NaN or Inf values"
    norm = math.sqrt(sum(float(((w - global_w[k]) ** 2).sum()) for k, w in weights.items()))
    if norm > max_norm:
        return None, f"update norm {norm:.4g} exceeds fl.max_update_norm={max_norm:g}"
    return weights, None


_STRATEGY_STATE = ("m_t", "v_t")  # FedAdam/FedYogi server moments (FedOpt); FedAvg and FedProx keep none


def strategy_state(strategy: Any) -> dict[str, dict[str, np.ndarray]]:
    return {name: dict(getattr(strategy, name)) for name in _STRATEGY_STATE if getattr(strategy, name, None)}


def check_compatible(infos: list[dict[str, Any]], cfg: ExperimentConfig) -> None:
    """Refuse clients whose datasets do not line up, or (unless data.allow_invalid) that report errors."""
    from zk0lib.validate import compare_features

    problems = [
        f"{f.client}: {f.message} ({f.fix})"
        for f in compare_features({i["name"]: i for i in infos}, cfg.data.rename_map).errors
    ]
    if problems:
        raise RuntimeError("clients' datasets do not line up:\n  - " + "\n  - ".join(problems))
    invalid = [
        f"{i['name']}: {i['validation-errors']} errors ({i['validation-summary']})"
        for i in infos
        if i.get("validation-errors", 0)
    ]
    if invalid and not cfg.data.allow_invalid:
        raise RuntimeError(
            "clients' datasets failed validation:\n  - "
            + "\n  - ".join(invalid)
            + "\nRun `zk0 validate` on those machines; data.repair=true trains on repaired copies, "
            "data.allow_invalid=true trains anyway."
        )


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    env.quiet()
    cfg = config_from_run_config(dict(context.run_config))
    env.use_offline_hub_if_possible(cfg)
    run_dir = str(context.run_config.get("run-dir", "") or "")
    run = RunRecord(run_dir) if run_dir and (Path(run_dir) / "config.json").exists() else RunRecord.create(cfg)
    resume = str(context.run_config.get("resume", "")).lower() == "true"
    server = FederatedServer(cfg, run, grid, resume=resume)
    try:
        server.run_rounds()
    except BaseException as e:
        server.book.fail(e)
        raise
    server.book.complete()
