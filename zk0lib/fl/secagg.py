"""Secure aggregation with Flower's SecAgg+ (privacy.secure_aggregation=secaggplus): the server learns the
weighted sum of the owners' updates, never one owner's.

Flower 1.41 has SecAgg+ on its legacy path only: `SecAggPlusWorkflow` drives a legacy `Strategy`'s
`configure_fit` / `aggregate_fit` through a `LegacyContext`, and the client's `secaggplus_mod` wraps a
handler that answers a legacy `FitIns` with a `FitRes`. zk0 keeps its own round loop and Message-API
strategies and runs the workflow as a round's training step:

- the Message-API strategy samples the round's clients and writes their train config, as in every round;
- `_LegacyRound` hands the workflow those clients as `FitIns` (the global weights, fp32, and the config with
  the array names and the pooled stats) and takes the unmasked result;
- on the client, `secagg_when_asked` runs Flower's `secaggplus_mod` over an adapter that turns the `FitIns`
  into zk0's train message, calls zk0's own train handler and answers with the update as a delta
  (local - global): the mod quantizes it into [-clipping_range, clipping_range], masks it and sends only
  the masked integers; the training metrics (loss, timings) travel in clear;
- the workflow's unmasked mean delta, added to the global weights, is handed to the Message-API strategy's
  `aggregate_train` as the one update of the round, so FedAvg/FedProx keep the mean and FedAdam, FedYogi and
  FedAvgM take their server step from it.

Nothing here is cryptography of zk0's own: keys, shares, masks and unmasking are Flower's.
What the server cannot do on masked updates: screen each one (fl.max_update_norm); a client checks its own
update is finite before it masks it, and one that fails drops out, as SecAgg+ allows.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from zk0lib.fl.transport import STATS_IN_CONFIG, payload_bytes

FLAG = "zk0-secagg"  # in a train config: answer with fp32 weights in the order received (the adapter diffs them)
NAMES = "zk0-array-names"  # the global weights' names, JSON (legacy Parameters carry none)


# -- the client's side
def secagg_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's secaggplus_mod on the SecAgg+ stages of a train round; every other message goes through."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        state = np.random.get_state()  # _legacy_train seeds numpy's global generator for the mod's rounding:
        try:  # the rest of the process (data loading, other mods) gets its generator back as it was
            return secaggplus_mod(msg, context, lambda m, c: _legacy_train(m, c, call_next))
        finally:
            np.random.set_state(state)
    return call_next(msg, context)


def _legacy_train(msg: Message, context: Context, call_next: Any) -> Message:
    """The FitIns of SecAgg+'s masking stage -> zk0's train message -> zk0's handler -> a FitRes whose
    parameters are the update (local - global, fp32) and whose metrics are the handler's scalars."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names = json.loads(str(config[NAMES]))
    received = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(received):
        raise ValueError(f"SecAgg+ train message: {len(received)} arrays for {len(names)} names")
    msg.content = RecordDict(
        {
            "arrays": ArrayRecord(
                {n: Array(np.asarray(a, dtype=np.float32)) for n, a in zip(names, received, strict=True)}
            ),
            "config": ConfigRecord(config),
        }
    )
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    local = reply.content["arrays"]
    deltas = [np.asarray(local[n].numpy(), dtype=np.float32) - g for n, g in zip(names, received, strict=True)]
    bad = [n for n, d in zip(names, deltas, strict=True) if not np.isfinite(d).all()]
    if bad:  # the server cannot screen a masked update: the client drops out instead of poisoning the sum
        raise ValueError(f"SecAgg+: this client's update is not finite ({bad[0]} and {len(bad) - 1} more); not sent")
    bound = float(config["zk0-secagg-clipping-range"])
    metrics = {k: v for k, v in dict(reply.content["metrics"]).items() if isinstance(v, (int, float, str, bool))}
    metrics["secagg-clipped-values"] = int(sum(int((np.abs(d) > bound).sum()) for d in deltas))
    # the mod then quantizes with stochastic rounding from numpy's global generator: seeded by round and client,
    # so a run (and a resumed one) aggregates the same on either engine. The masks come from the protocol's
    # own secret seeds, not from this generator.
    np.random.seed(zlib.crc32(f"secagg-{config['server-round']}-{metrics['partition-id']}".encode()))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(deltas), int(metrics.pop("num-examples")), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


# -- the server's side
class _Proxy(ClientProxy):
    """A sampled node as the legacy workflow knows it (it reads only the node id)."""

    def __init__(self, node_id: int):
        super().__init__(str(node_id))
        self.node_id = node_id

    def _legacy(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("zk0's SecAgg+ round talks to clients through the grid only")

    get_properties = get_parameters = fit = evaluate = reconnect = _legacy


class _LegacyRound(Strategy):
    """One round's legacy strategy for SecAggPlusWorkflow: the clients zk0's strategy sampled, and the
    workflow's result kept for zk0's round loop."""

    def __init__(self, fitins: dict[int, FitIns]):
        self.fitins = fitins
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.mean_delta: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return [(_Proxy(node), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Any, dict]:
        self.results = list(results)  # the dropouts: CountingGrid saw their errors, by node
        if results:  # every result carries the unmasked weighted mean (the workflow sets it on each)
            self.mean_delta = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, *args: Any) -> list:
        return []

    def aggregate_evaluate(self, *args: Any) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, *args: Any) -> None:
        return None


class CountingGrid:
    """The grid, counting the bytes of what goes out and comes back (the SecAgg+ stages' messages)."""

    def __init__(self, grid: Any):
        self.grid, self.sent, self.received, self.exchanges = grid, 0, 0, 0
        self.errors: dict[int, str] = {}  # node -> the first error it answered with

    def send_and_receive(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
        messages = list(messages)
        self.sent += sum(content_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, *args, **kwargs))
        self.received += sum(content_bytes(r.content) for r in replies if not r.has_error())
        for r in replies:
            if r.has_error():  # a client that fails a stage drops out of the round
                self.errors.setdefault(r.metadata.src_node_id, r.error.reason)
        replied = {r.metadata.src_node_id for r in replies}
        for m in messages:
            if m.metadata.dst_node_id not in replied:
                self.errors.setdefault(m.metadata.dst_node_id, "no reply within fl.round_timeout_s")
        self.exchanges += 1
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def content_bytes(content: RecordDict) -> int:
    """The payload of a message: its arrays' bytes, and its configs' bytes and strings."""
    total = sum(payload_bytes(record) for record in content.array_records.values())
    for record in content.config_records.values():
        for value in record.values():
            for v in value if isinstance(value, list) else [value]:
                total += len(v) if isinstance(v, (bytes, str)) else 8
    return total


def secure_train(
    grid: Any,
    cfg: Any,
    server_round: int,
    messages: list[Message],
    global_w: dict[str, Any],
    stats_bytes: bytes,
    max_weight: float,
) -> dict[str, Any]:
    """Run SecAgg+ over the clients of `messages` (zk0's strategy's train messages, unsent): returns the
    mean delta by name (None when the protocol halted), the per-client results, the clients that dropped out
    (node -> its error), and the bytes and seconds the protocol took."""
    p = cfg.privacy
    names = list(global_w)
    parameters = ndarrays_to_parameters([global_w[n].numpy() for n in names])
    fitins = {}
    for m in messages:
        config = dict(m.content["config"]) | {
            FLAG: True,
            NAMES: json.dumps(names),
            "zk0-secagg-clipping-range": float(p.secagg_clipping_range),
            STATS_IN_CONFIG: stats_bytes,
        }
        fitins[m.metadata.dst_node_id] = FitIns(parameters, config)
    legacy = _LegacyRound(fitins)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=cfg.fl.num_rounds, round_timeout=cfg.fl.round_timeout_s),
        strategy=legacy,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, True)
    workflow = SecAggPlusWorkflow(
        num_shares=float(p.secagg_shares),
        reconstruction_threshold=float(p.secagg_threshold),
        max_weight=max_weight,
        clipping_range=float(p.secagg_clipping_range),
        timeout=cfg.fl.round_timeout_s,
    )
    counting = CountingGrid(grid)
    t0 = time.perf_counter()
    workflow(counting, context)
    seconds = time.perf_counter() - t0
    mean = None if legacy.mean_delta is None else dict(zip(names, legacy.mean_delta, strict=True))
    return {
        "mean_delta": mean,
        "results": [(proxy.node_id, fitres) for proxy, fitres in legacy.results],
        "failures": dict(counting.errors),
        "bytes_sent": counting.sent,
        "bytes_received": counting.received,
        "exchanges": counting.exchanges,
        "seconds": seconds,
    }


def one_update_reply(arrays: ArrayRecord) -> Message:
    """The round's aggregate as the single reply a Message-API strategy aggregates (weight 1)."""
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)
