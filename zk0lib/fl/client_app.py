"""The ClientApp: one robot owner's side of the federation (Flower Message API).

Before round 1 each client describes its dataset (features and aggregate stats, never frames); it then
trains `train.local_steps` steps from the weights it receives, answering with its update, and evaluates on
its held-out episodes when eval.where=clients. A process builds its policy once and reuses it across rounds.
"""

from __future__ import annotations

import json
import resource
import time
from typing import Any

import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from zk0lib import data, env, evaluation, model, train
from zk0lib.config import ExperimentConfig
from zk0lib.fl.faults import corrupt, injected_fault
from zk0lib.fl.secagg import FLAG as SECAGG
from zk0lib.fl.secagg import secagg_when_asked
from zk0lib.fl.strategy import update_weight
from zk0lib.fl.transport import (
    STATS_IN_CONFIG,
    config_from_run_config,
    decode_arrays,
    digest,
    encode_arrays,
    payload_bytes,
    record_from_bytes,
    stats_digest,
    stats_from_record,
    stats_to_record,
    to_numpy_record,
)

_PROCESS: dict[Any, Any] = {}  # this process's policies, processors and datasets, reused across rounds


def _memo(key: Any, build):
    if key not in _PROCESS:
        _PROCESS[key] = build()
    return _PROCESS[key]


def _model_key(cfg: ExperimentConfig) -> str:
    return digest(
        json.dumps([cfg.model.__dict__, cfg.train.__dict__, cfg.data.rename_map], sort_keys=True, default=str)
    )


def partition_of(context: Context, cfg: ExperimentConfig) -> int:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config 'partition-id=N'")
    partition_id = int(node["partition-id"])
    if not 0 <= partition_id < len(cfg.data.clients):
        raise ValueError(f"partition-id {partition_id} is not a client of this config (0..{len(cfg.data.clients) - 1})")
    return partition_id


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

    def __init__(self, cfg: ExperimentConfig, partition_id: int):
        self.partition_id = partition_id
        self.data = data.open_client(cfg, partition_id)
        self.train_set = None
        self.heldout_set = None
        self.val_set = None
        self.stream: data.BatchStream | None = None

    def datasets(self, cfg: ExperimentConfig, policy_config: Any) -> tuple[Any, Any]:
        if self.train_set is None:
            self.train_set = data.open_for(cfg, self.data, self.data.train_episodes, policy_config)
            self.heldout_set = data.open_for(cfg, self.data, self.data.heldout_episodes, policy_config)
            if self.data.val_episodes:
                self.val_set = data.open_for(cfg, self.data, self.data.val_episodes, policy_config)
        return self.train_set, self.heldout_set

    def embed_training_frames(self, cfg: ExperimentConfig, bundle: model.PolicyBundle) -> None:
        """With data.cache=features, train on the frozen image embeddings (computed once per dataset)."""
        embedded = data.embedded_for(cfg, self.train_set, bundle)
        if embedded is not self.train_set:
            self.train_set = embedded
            if self.stream is not None:  # a stream over the frames: none is started with features, but be sure
                self.stream.close()
                self.stream = None

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
            self.train_stream(cfg).prefetch(train.round_seed(cfg, server_round, self.partition_id))


def _local(cfg: ExperimentConfig, partition_id: int) -> _Local:
    return _memo(
        ("local", digest(json.dumps(cfg.data.__dict__, default=str, sort_keys=True)), cfg.seed, partition_id),
        lambda: _Local(cfg, partition_id),
    )


def _client_bundle(cfg: ExperimentConfig, local: _Local, msg: Message) -> model.PolicyBundle:
    """The process's policy (built once) with processors for the federation's pooled stats."""
    conf = msg.content["config"]
    # the stats travel as their own record, or inside the config where a train message may carry only one
    # ArrayRecord (privacy.mode=client-clipping)
    stats = msg.content["norm_stats"] if STATS_IN_CONFIG not in conf else record_from_bytes(conf[STATS_IN_CONFIG])
    key = (_model_key(cfg), stats_digest(stats))
    bundle = _memo(("bundle", *key), lambda: model.build_policy(cfg, local.data.meta, stats_from_record(stats)))
    fingerprint = _memo(("fingerprint", *key), lambda: model.frozen_fingerprint(bundle.policy))
    if fingerprint != conf["frozen-fingerprint"]:
        raise RuntimeError(
            f"client {local.data.name}: frozen weights differ from the server's (fingerprint {fingerprint} vs "
            f"{conf['frozen-fingerprint']}): both sides must load the same model.pretrained (and revision)"
        )
    return bundle


def clip_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's fixedclipping_mod on the train messages of a federation whose server asks for client-side
    clipping (privacy.mode=client-clipping: its DP wrapper puts the clipping norm in the config); every
    other message goes through untouched."""
    conf = msg.content.config_records.get("config")  # SecAgg+'s stage messages carry none
    if msg.metadata.message_type == MessageType.TRAIN and conf is not None and KEY_CLIPPING_NORM in conf:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


client_app = ClientApp(mods=[clip_when_asked, secagg_when_asked])  # secagg: privacy.secure_aggregation


@client_app.query()
def client_describe(msg: Message, context: Context) -> Message:
    """Features and aggregate normalization stats of this client's dataset (no frames leave)."""
    cfg = _client_config(context)
    partition_id = partition_of(context, cfg)
    local = _local(cfg, partition_id)
    meta = local.data.meta
    checked = _validate_local(cfg, local)
    info = ConfigRecord(
        {
            "validation-errors": len(checked.errors),
            "validation-summary": "; ".join(f"{f.check} ep {f.episode}: {f.message}" for f in checked.errors[:3]),
            "name": local.data.name,
            "partition-id": partition_id,
            "converted-from": data.converted_from(local.data),
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
    if first_round and not checked.errors and cfg.data.cache != "features":  # start-up work, done while the
        local.datasets(
            cfg, model.policy_config(cfg, model.resolve_device(cfg.model.device))
        )  # server builds its policy
        local.prefetch_round(cfg, first_round)
    private = cfg.privacy.on and cfg.privacy.stats == "pretrained"  # the server uses the pretrained policy's
    stats = ArrayRecord() if private else stats_to_record(data.train_stats(local.data))
    return Message(RecordDict({"info": info, "stats": stats}), reply_to=msg)


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
    partition_id = partition_of(context, cfg)
    local = _local(cfg, partition_id)
    conf = msg.content["config"]
    server_round = int(conf["server-round"])
    bundle = _client_bundle(cfg, local, msg)
    local.datasets(cfg, bundle.config)
    local.embed_training_frames(cfg, bundle)
    t_decode = time.perf_counter()
    received = decode_arrays(msg.content["arrays"])
    model.set_trainable(bundle.policy, received)
    t_train = time.perf_counter()
    mu = float(conf.get("proximal-mu", 0.0))  # only FedProx's configure_train sends it
    metrics = train.train_round(
        bundle, local.train_stream(cfg), cfg, server_round, partition_id, mu, local.data.name, _relay_progress
    )
    local.prefetch_round(cfg, server_round + 1)  # decoded while the server aggregates and evaluates
    fault = injected_fault(cfg, partition_id, server_round)
    t_encode = time.perf_counter()
    dtype = cfg.fl.transport_dtype
    if KEY_CLIPPING_NORM in conf or SECAGG in conf:  # fp32 numpy in the order received: what fixedclipping_mod
        # clips and checks, and what SecAgg+'s adapter takes the update from
        local_w = model.get_trainable(bundle.policy)
        arrays = to_numpy_record({k: local_w[k] for k in received})
    else:
        arrays = encode_arrays(
            model.get_trainable(bundle.policy), dtype, reference=received if dtype != "float32" else None
        )
    if fault in ("nan", "shape"):
        arrays = corrupt(arrays, fault)
    now = time.perf_counter()
    metrics |= {
        "num-examples": update_weight(cfg, local.data.train_frames),
        "proximal_mu": mu,
        "partition-id": partition_id,
        "payload-bytes": payload_bytes(arrays),
        "setup_seconds": t_decode - t0,  # config, datasets and the policy (built in the first round only)
        "serialize_seconds": (t_train - t_decode) + (now - t_encode),
        "handler_seconds": now - t0,
        "torch_threads": torch.get_num_threads(),
        **_memory(),
    }
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    cfg = _client_config(context)
    partition_id = partition_of(context, cfg)
    local = _local(cfg, partition_id)
    bundle = _client_bundle(cfg, local, msg)
    _, heldout = local.datasets(cfg, bundle.config)
    model.set_trainable(bundle.policy, decode_arrays(msg.content["arrays"]))
    result = evaluation.evaluate(bundle, heldout, cfg)
    if local.val_set is not None:  # the loss on the validation episodes chooses the best round
        val = evaluation.evaluate(bundle, local.val_set, cfg, actions=False)
        result |= {"validation-loss": val["loss"], "validation-episodes": val["episodes"]}
    return Message(RecordDict({"metrics": MetricRecord(eval_to_metrics(result, partition_id))}), reply_to=msg)


def _memory() -> dict[str, float]:
    """This process's memory and its children's (data-loader workers): what one actor holds, however many
    clients it has served."""
    me = psutil.Process()
    children = me.children(recursive=True)
    child_rss = 0
    for c in children:
        try:
            child_rss += c.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that ended while we looked
            pass
    rss = me.memory_info().rss
    return {
        "pid": me.pid,
        "rss_mib": rss / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "child_processes": len(children),
        "rss_with_children_mib": (rss + child_rss) / 2**20,
    }


def eval_to_metrics(result: dict[str, Any], partition_id: int) -> dict[str, Any]:
    """An evaluation result as a flat MetricRecord (numbers and lists of numbers only)."""
    out: dict[str, Any] = {"partition-id": partition_id, "num-examples": int(result["frames"])}
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


def _relay_progress(line: str) -> None:
    """A long round's progress, marked for the terminal: `zk0 train` relays the stream's [zk0] lines (in the
    simulation, Ray forwards the client actors' output into it)."""
    print(f"[zk0] {line}", flush=True)
