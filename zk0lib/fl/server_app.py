"""The ServerApp: the federation's round loop around a Flower strategy (Message API).

Before round 1 the server asks every client to describe its dataset, checks that they line up and sends
back one pooled normalization. Each round it samples clients through the strategy, sends the weights in
the transport's encoding, screens the replies, lets the strategy aggregate, evaluates, records and saves
what a resumed run needs. `flwr run . <connection>` runs it unchanged on the Deployment Engine.
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from zk0lib import env, model
from zk0lib.book import RoundBook, eval_record
from zk0lib.config import ExperimentConfig
from zk0lib.evaluation import HeldOutSets, closed_loop, eval_due, rollout_due
from zk0lib.fl.client_app import eval_from_metrics
from zk0lib.fl.privacy import (
    PrivacyBudgetExhausted,
    clients_clip,
    inner_strategy,
    last_round,
    plan,
    privacy_record,
    privacy_state,
    restore_privacy,
    with_privacy,
)
from zk0lib.fl.secagg import one_update_reply, secure_train
from zk0lib.fl.startup import describe_clients, federation_meta, federation_stats, wait_for_nodes
from zk0lib.fl.strategy import (
    PartitionOrder,
    make_strategy,
    restore_strategy,
    round_configs,
    strategy_state,
    update_weight,
)
from zk0lib.fl.transport import (
    STATS_IN_CONFIG,
    config_from_run_config,
    decode_arrays,
    encode_arrays,
    payload_bytes,
    record_from_bytes,
    record_to_bytes,
    screen_update,
    stats_digest,
    stats_from_record,
    to_numpy_record,
)
from zk0lib.runs import RunRecord, atomic_write_bytes, load_resume_state, resume_round, save_resume_state

NORMALIZATION_FILE = "normalization_stats.npz"  # the stats record every client is sent, as the run started
_CLIENT_SUMMARY_KEYS = (
    "partition-id", "episodes", "frames", "train-episodes", "train-frames", "heldout-episodes", "converted-from",
)  # fmt: skip


@dataclass
class RoundData:
    """What one round gathers on its way to its record."""

    server_round: int
    t0: float = field(default_factory=time.perf_counter)
    global_w: dict[str, torch.Tensor] = field(default_factory=dict)  # what the clients were sent (fp32)
    train_nodes: list[int] = field(default_factory=list)
    train: dict[str, dict[str, Any]] = field(default_factory=dict)  # client name -> its training metrics
    client_evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    client_vals: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval.where=clients: validation loss
    failures: list[dict[str, Any]] = field(default_factory=list)
    bytes_sent: dict[str, int] = field(default_factory=dict)  # phase -> bytes
    bytes_received: int = 0
    serialize_seconds: float = 0.0
    decode_seconds: float = 0.0
    train_seconds: float | None = None
    privacy: dict[str, Any] | None = None  # the DP wrapper's clipping, noise and budget after this round
    secagg: dict[str, Any] | None = None  # SecAgg+'s bytes, exchanges and seconds (privacy.secure_aggregation)


class FederatedServer:
    """Everything the ServerApp does: describe clients, run the rounds, evaluate, record, checkpoint."""

    def __init__(self, cfg: ExperimentConfig, run: RunRecord, grid: Grid, resume: bool = False):
        self.cfg, self.run, self.grid, self.resume = cfg, run, grid, resume
        self.names: dict[int, str] = {}  # node id -> client name
        self.partitions: dict[int, int] = {}  # node id -> partition id
        self.stats_record = ArrayRecord()
        self.book = RoundBook(cfg, run)
        self.resume_seconds: list[float] = []  # time to write checkpoints/resume, per round of this process
        self.stopped: dict[str, Any] | None = None  # why the run ended before its last round (privacy budget)
        self.last_round = last_round(cfg)  # evaluated and rolled out as the last (a privacy budget may end it early)

    def stats_it_started_with(self, pooled: ArrayRecord) -> ArrayRecord:
        """A run normalizes with one set of stats from its first round to its last: saved when it starts,
        read back when it resumes, even if the clients' datasets (or how zk0 pools them) changed since."""
        path = self.run.path / NORMALIZATION_FILE
        if self.resume and path.exists():
            saved = record_from_bytes(path.read_bytes())
            if stats_digest(saved) != stats_digest(pooled):
                self.book.log(
                    f"resume: the clients' pooled stats differ from those this run started with ({path.name}); "
                    "it keeps its own, so every round normalizes the same way"
                )
            return saved
        atomic_write_bytes(path, record_to_bytes(pooled))
        return pooled

    # -- the run
    def run_rounds(self) -> None:
        cfg = self.cfg
        started = {"serverapp_process_age": time.time() - psutil.Process().create_time()}
        t = time.perf_counter()
        nodes = wait_for_nodes(self.grid, cfg)
        started["wait_for_clients"] = time.perf_counter() - t
        t = time.perf_counter()
        done = resume_round(self.run) if self.resume else None
        infos = describe_clients(self.grid, cfg, nodes, first_round=(done or 0) + 1)
        self.names = {i["node"]: i["name"] for i in infos}
        self.partitions = {i["node"]: int(i["partition-id"]) for i in infos}
        self.max_weight = max(float(update_weight(cfg, int(i["train-frames"]))) for i in infos)
        started["describe_clients"] = time.perf_counter() - t
        t = time.perf_counter()
        self.stats_record, stats_source = federation_stats(cfg, infos)
        self.stats_record = self.stats_it_started_with(self.stats_record)
        stats = stats_from_record(self.stats_record)  # what clients get, to the last bit
        self.bundle = model.build_policy(cfg, federation_meta(self.run, infos, stats), stats)
        started["build_policy"] = time.perf_counter() - t
        counts = model.parameter_counts(self.bundle.policy)
        self.run.update_summary(
            normalization_stats=stats_source,
            parameters=counts,
            clients={i["name"]: {k: i[k] for k in _CLIENT_SUMMARY_KEYS} for i in infos},
        )
        t = time.perf_counter()
        self.heldout = HeldOutSets(cfg, self.bundle.config, clients=cfg.eval.where == "server")
        started["open_eval_sets"] = time.perf_counter() - t
        self.run.update_summary(startup_seconds=started)
        train_config, evaluate_config = round_configs(cfg, model.frozen_fingerprint(self.bundle.policy))
        strategy = with_privacy(cfg, make_strategy(cfg))
        arrays = to_numpy_record(model.get_trainable(self.bundle.policy))
        first = 1
        if self.resume:
            first, arrays = self.restore(strategy)
        self.book.log(
            f"{len(infos)} clients, {counts['trainable']:,} trainable of {counts['total']:,} parameters, "
            f"strategy {cfg.fl.strategy}, {cfg.fl.num_rounds} rounds x {cfg.train.local_steps} local steps"
            + (f", resumed after round {first - 1}" if first > 1 else "")
        )
        if cfg.privacy.on:
            self.book.log(plan(cfg))
        if first == 1:  # the starting model, judged as every later round is
            start = RoundData(0)
            self.evaluate_on_clients(strategy, start, arrays, evaluate_config)
            self.end_of_round(start, arrays)
        for server_round in range(first, cfg.fl.num_rounds + 1):
            try:
                arrays = self.one_round(strategy, server_round, arrays, train_config, evaluate_config)
            except PrivacyBudgetExhausted as e:  # raised before the round's messages go out: nothing half-done
                self.stopped = {
                    "reason": f"privacy budget: {e}",
                    "rounds_trained": server_round - 1,
                    "rounds_planned": cfg.fl.num_rounds,
                }
                self.book.log(f"stopped before round {server_round}: {self.stopped['reason']}")
                if server_round > 1:  # the last good round (its weights are the bundle's) is the final model
                    self.book.save_final(self.bundle)
                break

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
        rd = RoundData(server_round)
        if self.cfg.privacy.secure_aggregation != "off":
            aggregated = self.secure_round(strategy, rd, arrays, train_config)
        else:
            messages = self.train_messages(strategy, rd, arrays, train_config)
            replies = self.grid.send_and_receive(messages, timeout=self.cfg.fl.round_timeout_s)
            aggregated = self.aggregate(strategy, rd, replies)
        arrays = aggregated if aggregated is not None else arrays
        rd.privacy = privacy_record(strategy)
        self.evaluate_on_clients(strategy, rd, arrays, eval_config)
        self.end_of_round(rd, arrays)
        t = time.perf_counter()
        save_resume_state(
            self.run,
            server_round,
            arrays,
            strategy_state(inner_strategy(strategy)),
            self.book,
            extra={"privacy": privacy_state(strategy)},
        )
        self.resume_seconds.append(time.perf_counter() - t)
        self.run.update_summary(resume_checkpoint_seconds=self.resume_seconds)
        return arrays

    def train_messages(self, strategy: Any, rd: RoundData, arrays: ArrayRecord, config: ConfigRecord) -> list[Message]:
        """The strategy's train messages for the clients it samples (seeded, in partition order), encoded."""
        PartitionOrder.seed(self.cfg, rd.server_round)
        messages = strategy.configure_train(rd.server_round, arrays, config, PartitionOrder(self.grid, self.partitions))
        return self.encode(messages, arrays, "train", rd)

    def encode(self, messages: Any, arrays: ArrayRecord, phase: str, rd: RoundData) -> list[Message]:
        """Put the transport's encoding of `arrays` and the pooled stats into a strategy's messages. Training
        starts from the transport's rounding of the global weights; evaluation judges them exactly (fp32)."""
        messages = list(messages)
        if not messages:
            return messages
        t0 = time.perf_counter()
        rd.global_w = decode_arrays(arrays)
        clipping = phase == "train" and clients_clip(self.cfg)  # Flower's fixedclipping_mod reads numpy fp32
        if clipping:
            encoded = to_numpy_record(rd.global_w)
        else:
            encoded = encode_arrays(rd.global_w, self.cfg.fl.transport_dtype if phase == "train" else "float32")
        rd.serialize_seconds += time.perf_counter() - t0
        stats_bytes = record_to_bytes(self.stats_record) if clipping else None
        for m in messages:
            m.content["arrays"] = encoded
            if clipping:  # the mod takes one ArrayRecord and one ConfigRecord: the stats go inside the config
                m.content["config"][STATS_IN_CONFIG] = stats_bytes
            else:
                m.content["norm_stats"] = self.stats_record
        if phase == "train":
            rd.train_nodes = [m.metadata.dst_node_id for m in messages]
        rd.bytes_sent[phase] = payload_bytes(encoded) * len(messages)
        return messages

    def secure_round(self, strategy: Any, rd: RoundData, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord:
        """A round's training under SecAgg+ (zk0lib/fl/secagg.py): the strategy samples and configures the
        clients, Flower's workflow returns only the weighted mean of their updates, and the strategy aggregates
        that mean as the round's one update."""
        cfg = self.cfg
        PartitionOrder.seed(cfg, rd.server_round)
        messages = list(
            strategy.configure_train(rd.server_round, arrays, config, PartitionOrder(self.grid, self.partitions))
        )
        rd.global_w = decode_arrays(arrays)
        rd.train_nodes = [m.metadata.dst_node_id for m in messages]
        out = secure_train(
            self.grid, cfg, rd.server_round, messages, rd.global_w, record_to_bytes(self.stats_record), self.max_weight
        )
        rd.bytes_sent["train"] = out["bytes_sent"]
        rd.bytes_received = out["bytes_received"]
        for node, fitres in sorted(out["results"], key=lambda r: self.partitions.get(r[0], 0)):
            rd.train[self.client_name(node)] = {**fitres.metrics, "weight": float(fitres.num_examples)}
        rd.failures += [
            {"client": self.client_name(node), "round": rd.server_round, "phase": "secagg", **failure_reason(reason)}
            for node, reason in out["failures"].items()
        ]
        rd.secagg = {k: out[k] for k in ("bytes_sent", "bytes_received", "exchanges", "seconds")}
        need = cfg.fl.min_train_clients or len(rd.train_nodes)
        if out["mean_delta"] is None or len(out["results"]) < need:
            reasons = "; ".join(f["reason"] for f in rd.failures) or "the protocol halted (see the log)"
            raise RuntimeError(
                f"round {rd.server_round}: SecAgg+ aggregated {len(out['results'])} client updates, "
                f"fl.min_train_clients={need} needed ({reasons})"
            )
        mean = {k: w + torch.from_numpy(out["mean_delta"][k]) for k, w in rd.global_w.items()}
        aggregated, _ = strategy.aggregate_train(rd.server_round, [one_update_reply(to_numpy_record(mean))])
        rd.train_seconds = time.perf_counter() - rd.t0
        return aggregated

    def aggregate(self, strategy: Any, rd: RoundData, replies: Any) -> ArrayRecord | None:
        """Screen the replies, then the strategy's aggregate of the usable ones."""
        accepted = self.screen(rd, list(replies))
        aggregated, _ = strategy.aggregate_train(rd.server_round, accepted)
        return aggregated

    def evaluate_on_clients(self, strategy: Any, rd: RoundData, arrays: ArrayRecord, config: ConfigRecord) -> None:
        """With eval.where=clients, the clients judge `arrays` (fp32) on their held-out episodes."""
        if not eval_due(self.cfg, rd.server_round, self.last_round):
            return
        messages = self.encode(
            strategy.configure_evaluate(rd.server_round, arrays, config, self.grid), arrays, "evaluate", rd
        )
        if not messages:
            return
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.fl.round_timeout_s))
        for reply in replies:
            name = self.client_name(reply.metadata.src_node_id)
            if reply.has_error():
                rd.failures.append(
                    {
                        "client": name,
                        "round": rd.server_round,
                        "phase": "evaluate",
                        **failure_reason(reply.error.reason),
                    }
                )
            else:
                result = eval_from_metrics(dict(reply.content["metrics"]))
                if "validation-loss" in result:
                    rd.client_vals[name] = {
                        "loss": result.pop("validation-loss"),
                        "episodes": result.pop("validation-episodes"),
                    }
                rd.client_evals[name] = result
        ok = [r for r in replies if not r.has_error()]
        if ok:
            strategy.aggregate_evaluate(rd.server_round, ok)

    def restore(self, strategy: Any) -> tuple[int, ArrayRecord]:
        """The round to start from and the global weights, with the strategy's and the book's state."""
        state = load_resume_state(self.run)
        if state is None:
            raise RuntimeError(f"run {self.run.run_id} has no resumable round (checkpoints/resume is missing)")
        restore_strategy(inner_strategy(strategy), state["strategy"])
        restore_privacy(strategy, state["extra"].get("privacy", {}))
        self.book.restore(state["book"])
        return state["round"] + 1, to_numpy_record({k: torch.from_numpy(v) for k, v in state["arrays"].items()})

    # -- per round
    def client_name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def screen(self, rd: RoundData, replies: list[Message]) -> list[Message]:
        """Decode, check and order the replies; errors and malformed updates are recorded and left out."""
        accepted = []
        t_decode = time.perf_counter()
        for reply in replies:
            name = self.client_name(reply.metadata.src_node_id)
            if reply.has_error():
                rd.failures.append({"client": name, "round": rd.server_round, **failure_reason(reply.error.reason)})
                continue
            arrays = reply.content["arrays"]
            rd.bytes_received += payload_bytes(arrays)
            weights, problem = screen_update(
                arrays,
                rd.global_w,
                self.cfg.fl.max_update_norm,
                reject_zero=self.cfg.privacy.on,
                clipped_to=self.cfg.privacy.clipping_norm if clients_clip(self.cfg) else None,
            )
            if problem is not None:
                rd.failures.append({"client": name, "round": rd.server_round, "reason": f"rejected: {problem}"})
                continue
            # in the global weights' order: Flower's DP wrappers pair reply and global arrays by position
            reply.content["arrays"] = to_numpy_record({k: weights[k] for k in rd.global_w})
            metrics = dict(reply.content["metrics"])
            rd.train[name] = {k: v for k, v in metrics.items() if k != "num-examples"}
            rd.train[name]["weight"] = float(metrics["num-examples"])
            accepted.append(reply)
        replied = {r.metadata.src_node_id for r in replies}
        for node in rd.train_nodes:
            if node not in replied:
                reason = f"no reply within fl.round_timeout_s={self.cfg.fl.round_timeout_s:g}"
                rd.failures.append({"client": self.client_name(node), "round": rd.server_round, "reason": reason})
        rd.decode_seconds = time.perf_counter() - t_decode
        need = self.cfg.fl.min_train_clients or len(rd.train_nodes)
        if len(accepted) < need:
            reasons = "; ".join(f"{f['client']}: {f['reason']}" for f in rd.failures) or "no replies"
            raise RuntimeError(
                f"round {rd.server_round}: only {len(accepted)} usable client updates, "
                f"fl.min_train_clients={need} needed ({reasons})"
            )
        accepted.sort(key=lambda r: int(r.content["metrics"]["partition-id"]))  # same sum order every run
        rd.train_seconds = time.perf_counter() - rd.t0
        return accepted

    def end_of_round(self, rd: RoundData, arrays: ArrayRecord) -> MetricRecord:
        """After every round (and before round 1): evaluate, record, checkpoint."""
        cfg, book, server_round = self.cfg, self.book, rd.server_round
        t_eval = time.perf_counter()
        model.set_trainable(self.bundle.policy, decode_arrays(arrays))
        evals: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        val: dict[str, Any] = {}
        if eval_due(cfg, server_round, self.last_round):
            evals, extra, val = self.heldout.evaluate(self.bundle)
            if cfg.eval.where == "clients":
                evals, val = rd.client_evals, rd.client_vals
        eval_seconds = time.perf_counter() - t_eval
        judged = eval_record(cfg, evals, extra, val)
        record = book.train_record(server_round, rd.train) if server_round > 0 else book.start_record(0)
        if server_round > 0:
            record |= {
                "sampled": [
                    self.client_name(n) for n in sorted(rd.train_nodes, key=lambda n: self.partitions.get(n, 0))
                ],
                "bytes_received": rd.bytes_received,
                "failures": rd.failures,
            }
        if rd.bytes_sent:
            record["bytes_sent"] = sum(rd.bytes_sent.values())
        if evals or extra:
            record["eval"] = judged
        if rd.secagg is not None:
            record["secagg"] = rd.secagg
        if rd.privacy is not None:
            record["privacy"] = rd.privacy
            self.run.update_summary(privacy=rd.privacy)
        t_rollout = time.perf_counter()
        if rollout_due(cfg, server_round, self.last_round):
            videos = self.run.path / "videos" / f"round{server_round:03d}" if cfg.eval.rollout_videos else None
            record["rollout"] = closed_loop(cfg, self.bundle, videos)
        rollout_seconds = time.perf_counter() - t_rollout
        t_ckpt = time.perf_counter()
        book.checkpoint(server_round, judged, self.bundle)
        record["seconds"] = {
            "round": time.perf_counter() - rd.t0,
            "train": rd.train_seconds,
            "server_serialize": rd.serialize_seconds + rd.decode_seconds,
            "evaluate": eval_seconds,
            "rollout": rollout_seconds,
            "checkpoint": time.perf_counter() - t_ckpt,
        }
        record["memory"] = {
            "server_rss_mib": psutil.Process().memory_info().rss / 2**20,
            "server_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        book.commit(record)
        return MetricRecord({k: v for k, v in judged["mean"].items() if isinstance(v, float)})


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
    server.book.complete(**({"stopped": server.stopped} if server.stopped else {}))
