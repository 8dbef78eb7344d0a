"""The server's round in process: Flower's real strategies (and DP wrappers) behind zk0's transport, checked
by hand.

Each test has the server build the messages its strategy's `configure_train` asks for, answers them as
clients would (`Message(..., reply_to=...)`), and lets the server screen them and the strategy aggregate:
no Flower run, so the sums can be checked against a hand calculation to float precision."""

from __future__ import annotations

import copy
import dataclasses
import secrets
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore import differential_privacy as flwr_dp
from flwr.supercore.task_identity import TaskIdentity

from zk0lib import train
from zk0lib.config import ConfigError, load_config
from zk0lib.fl import client_app, privacy, transport
from zk0lib.fl.server_app import FederatedServer, RoundData
from zk0lib.fl.strategy import make_strategy, restore_strategy, round_configs, strategy_state, update_weight
from zk0lib.runs import RunRecord


class NodeList:
    """The one call a strategy makes of Flower's Grid while configuring a round: the connected node ids."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


@pytest.fixture(autouse=True)
def server_identity():
    """What Flower sets in a ServerApp process before messages can be made."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _cfg(n_clients: int, **fl):
    cfg = load_config("smoke")
    base = cfg.data.clients[0]
    cfg.data.clients = [dataclasses.replace(base, name=f"c{i}") for i in range(n_clients)]
    for key, value in fl.items():
        setattr(cfg.fl, key, value)
    return cfg


def _server(cfg, node_ids: list[int]) -> FederatedServer:
    """A FederatedServer whose clients have described themselves (node i serves partition order[i])."""
    cfg.output.run_id = f"aggregation-{secrets.token_hex(4)}"
    server = FederatedServer(cfg, RunRecord.create(cfg), NodeList(node_ids))
    for pid, node in enumerate(node_ids):
        server.names[node], server.partitions[node] = cfg.data.clients[pid].name, pid
    server.stats_record = ArrayRecord()
    return server


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(3, 4, generator=g), "layer.bias": torch.randn(4, generator=g)}


def _train_messages(server, strategy, global_w, server_round=1) -> tuple[RoundData, list[Message]]:
    rd = RoundData(server_round)
    train_config, _ = round_configs(server.cfg, "fingerprint")
    return rd, server.train_messages(strategy, rd, transport.to_numpy_record(global_w), train_config)


def _reply(msg: Message, local_w, received, dtype: str, num_examples: int, pid: int) -> Message:
    arrays = transport.encode_arrays(local_w, dtype, reference=received if dtype != "float32" else None)
    metrics = MetricRecord({"num-examples": num_examples, "partition-id": pid, "samples": 8, "train_loss": 1.0})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _round(cfg, local: dict[int, dict], examples: dict[int, int], global_w, strategy=None, server_round=1):
    """Configure, answer (client pid with local[pid], num-examples examples[pid]) and aggregate one round
    (with the strategy the server would make, privacy wrapper included, unless one is given)."""
    nodes = [101, 57, 9, 230][: len(cfg.data.clients)]
    server = _server(cfg, nodes)
    strategy = strategy or privacy.with_privacy(cfg, make_strategy(cfg))
    rd, messages = _train_messages(server, strategy, global_w, server_round)
    replies = []
    for m in messages:
        pid = server.partitions[m.metadata.dst_node_id]
        received = transport.decode_arrays(m.content["arrays"])
        replies.append(_reply(m, local[pid], received, cfg.fl.transport_dtype, examples[pid], pid))
    aggregated = server.aggregate(strategy, rd, replies)
    assert sorted(rd.train) == sorted(cfg.data.clients[pid].name for pid in local)
    return transport.decode_arrays(aggregated), server, messages


def test_fedavg_is_the_num_examples_weighted_mean_of_fp32_updates():
    cfg = _cfg(3, strategy="fedavg")
    global_w, local = _weights(0), {i: _weights(i + 1) for i in range(3)}
    examples = {0: 10, 1: 30, 2: 60}
    out, _, _ = _round(cfg, local, examples, global_w)
    for k in global_w:
        expected = sum(examples[i] * local[i][k] for i in range(3)) / 100
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6)


def test_fedavg_of_bf16_deltas_adds_the_rounded_mean_delta_to_the_global_weights():
    cfg = _cfg(2, strategy="fedavg", transport_dtype="bfloat16")
    global_w, local = _weights(0), {i: _weights(i + 1) for i in range(2)}
    out, _, messages = _round(cfg, local, {0: 1, 1: 3}, global_w)
    assert all(a.dtype == "bfloat16" for a in messages[0].content["arrays"].values())
    sent = {k: v.to(torch.bfloat16).float() for k, v in global_w.items()}  # what the clients start from
    for k in global_w:
        deltas = [(local[i][k] - sent[k]).to(torch.bfloat16).float() for i in range(2)]
        expected = global_w[k] + (1 * deltas[0] + 3 * deltas[1]) / 4
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(out[k], (local[0][k] + 3 * local[1][k]) / 4, rtol=0, atol=1e-4)


def test_fedadam_takes_one_bias_corrected_adam_step_on_the_mean_update():
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    cfg = _cfg(2, strategy="fedadam", server_lr=eta, server_beta1=b1, server_beta2=b2, server_tau=tau)
    global_w, local = _weights(0), {i: _weights(i + 1) for i in range(2)}
    out, _, _ = _round(cfg, local, {0: 1, 1: 1}, global_w)
    eta_norm = eta * np.sqrt(1 - b2**2) / (1 - b1**2)  # Flower's correction at server round 1
    for k in global_w:
        delta = (local[0][k] + local[1][k]) / 2 - global_w[k]
        m, v = (1 - b1) * delta, (1 - b2) * delta**2
        expected = global_w[k] + eta_norm * m / (v.sqrt() + tau)
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-5)


def test_fedavgm_steps_with_server_momentum_and_a_resumed_strategy_keeps_it():
    lr, beta = 1.5, 0.9
    cfg = _cfg(2, strategy="fedavgm", server_lr=lr, server_momentum=beta)
    w0 = _weights(0)
    local1, local2 = {i: _weights(i + 1) for i in range(2)}, {i: _weights(i + 11) for i in range(2)}
    strategy = make_strategy(cfg)
    w1, _, _ = _round(cfg, local1, {0: 1, 1: 1}, w0, strategy=strategy, server_round=1)
    pg1 = {k: w0[k] - (local1[0][k] + local1[1][k]) / 2 for k in w0}
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k] - lr * pg1[k], rtol=0, atol=1e-5)
    resumed = make_strategy(cfg)  # a resumed run: a fresh strategy given the saved state
    restore_strategy(resumed, copy.deepcopy(strategy_state(strategy)))
    for s in (strategy, resumed):
        w2, _, _ = _round(cfg, local2, {0: 1, 1: 1}, w1, strategy=s, server_round=2)
        for k in w0:
            pg2 = w1[k] - (local2[0][k] + local2[1][k]) / 2
            torch.testing.assert_close(w2[k], w1[k] - lr * (beta * pg1[k] + pg2), rtol=0, atol=1e-5)
    assert make_strategy(_cfg(2, strategy="fedadam")).eta == 1e-3  # server_lr's default is the strategy's own
    assert make_strategy(_cfg(2, strategy="fedavgm")).server_learning_rate == 1.0


@pytest.mark.parametrize(("strategy", "mu"), [("fedavg", None), ("fedadam", None), ("fedprox", 0.01)])
def test_only_fedprox_sends_a_proximal_term(strategy, mu):
    cfg = _cfg(2, strategy=strategy, proximal_mu=0.01)
    server = _server(cfg, [5, 6])
    _, messages = _train_messages(server, make_strategy(cfg), _weights(0))
    assert [m.content["config"].get("proximal-mu") for m in messages] == [mu, mu]
    assert cfg.fl.applied_mu == (mu or 0.0)


def test_fraction_train_samples_the_same_partitions_whatever_the_node_ids():
    cfg = _cfg(4, strategy="fedavg", fraction_train=0.5)
    chosen = []
    for nodes in ([11, 12, 13, 14], [904, 3, 77, 15]):
        server = _server(cfg, nodes)
        _, messages = _train_messages(server, make_strategy(cfg), _weights(0), server_round=3)
        chosen.append(sorted(server.partitions[m.metadata.dst_node_id] for m in messages))
    assert chosen[0] == chosen[1] == train.sampled_clients(cfg, 3)
    assert len(chosen[0]) == 2
    rounds = [tuple(train.sampled_clients(cfg, r)) for r in range(1, 9)]
    assert len(set(rounds)) > 1  # a new sample every round


def test_a_round_needs_every_sampled_client_unless_min_train_clients_says_less():
    cfg = _cfg(4, strategy="fedavg", fraction_train=0.5)
    global_w = _weights(0)
    server = _server(cfg, [1, 2, 3, 4])
    strategy = make_strategy(cfg)
    rd, messages = _train_messages(server, strategy, global_w)
    received = transport.decode_arrays(messages[0].content["arrays"])
    pid = server.partitions[messages[0].metadata.dst_node_id]
    one = [_reply(messages[0], _weights(1), received, "float32", 5, pid)]
    with pytest.raises(RuntimeError, match="only 1 usable client updates, fl.min_train_clients=2 needed"):
        server.aggregate(strategy, rd, one)
    assert rd.failures[0]["reason"].startswith("no reply within")  # the sampled client that did not answer
    cfg.fl.min_train_clients = 1
    assert server.aggregate(strategy, RoundData(1, global_w=rd.global_w, train_nodes=rd.train_nodes), one)


def test_update_weight_follows_fl_weighting():
    cfg = _cfg(2)
    assert cfg.fl.weighting == "frames" and update_weight(cfg, 1234) == 1234
    cfg.fl.weighting = "uniform"
    assert update_weight(cfg, 1234) == update_weight(cfg, 5) > 0


def test_clients_evaluate_the_fp32_global_weights_when_training_travels_in_bf16():
    cfg = _cfg(2, strategy="fedavg", transport_dtype="bfloat16")
    cfg.eval.where = "clients"
    server = _server(cfg, [5, 6])
    strategy = make_strategy(cfg)
    global_w = _weights(0)
    arrays = transport.to_numpy_record(global_w)
    rd = RoundData(0)  # round 0 (the starting model) is judged too
    messages = server.encode(
        strategy.configure_evaluate(0, arrays, ConfigRecord({}), server.grid), arrays, "evaluate", rd
    )
    assert len(messages) == 2 and rd.bytes_sent == {"evaluate": 2 * (12 + 4) * 4}
    judged = transport.decode_arrays(messages[0].content["arrays"])
    for k in global_w:
        assert torch.equal(judged[k], global_w[k])


def test_a_process_keeps_one_live_batch_stream(smoke_cfg):
    """A Ray actor serves many clients in turn: only the client training now keeps loader workers."""
    import psutil

    from zk0lib import model

    cfg = copy.deepcopy(smoke_cfg)
    cfg.train.num_workers = 1
    pc = model.policy_config(cfg, torch.device("cpu"))
    first, second = client_app._local(cfg, 0), client_app._local(cfg, 1)
    for local in (first, second):
        local.datasets(cfg, pc)
    me = psutil.Process()
    before = len(me.children())
    next(first.train_stream(cfg).batches(1))
    assert len(me.children()) == before + 1  # its loader worker
    next(second.train_stream(cfg).batches(1))
    assert first.stream is None and second.stream is not None
    deadline = time.monotonic() + 20
    while len(me.children()) > before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(me.children()) == before + 1  # the first client's worker is gone
    second.stream.close()


# ----------------------------------------------------------------------------- differential privacy


def _dp_cfg(**settings):
    cfg = _cfg(2, strategy="fedavg", weighting="uniform")
    cfg.privacy.mode = "server-clipping"
    for key, value in settings.items():
        setattr(cfg.privacy, key, value)
    return cfg


def _big(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Enough numbers (20,100) to measure a noise's standard deviation to ~1%."""
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": scale * torch.randn(200, 100, generator=g), "a.bias": scale * torch.randn(100, generator=g)}


def _norm(w: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v**2).sum() for v in w.values())))


def test_server_side_dp_clips_each_clients_update_to_the_clipping_norm():
    cfg = _dp_cfg(clipping_norm=0.5, noise_multiplier=1e-9)  # noise far below float precision of the check
    global_w = _big(0)
    updates = {0: _big(1, 3.0), 1: _big(2, 0.001)}  # norm 427: clipped; norm 0.142: left as it is
    local = {i: {k: global_w[k] + u[k] for k in global_w} for i, u in updates.items()}
    out, _, _ = _round(cfg, local, {0: 64, 1: 64}, global_w)
    scale = [min(1.0, 0.5 / _norm(updates[i])) for i in range(2)]
    assert scale[0] < 0.01 and scale[1] == 1.0
    for k in global_w:
        expected = global_w[k] + (scale[0] * updates[0][k] + scale[1] * updates[1][k]) / 2
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-5)
    assert _norm({k: out[k] - global_w[k] for k in out}) <= 0.5  # no client moves the mean further than C / n x n


@pytest.mark.parametrize("noise_multiplier", [0.5, 2.0])
def test_server_side_dp_adds_gaussian_noise_of_the_std_flower_computes(noise_multiplier):
    """Clients that barely moved (1e-6), with bf16 deltas on the wire: what changes the global weights is the
    noise, with standard deviation noise_multiplier x clipping_norm / clients sampled; it grows with the
    multiplier."""
    cfg = _dp_cfg(clipping_norm=0.2, noise_multiplier=noise_multiplier)
    cfg.fl.transport_dtype = "bfloat16"
    global_w = _big(0)
    still = {k: v + 1e-6 for k, v in global_w.items()}
    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    out, _, _ = _round(cfg, {0: still, 1: still}, {0: 64, 1: 64}, global_w)
    noise = torch.cat([(out[k] - still[k]).flatten() for k in out])
    expected = noise_multiplier * 0.2 / 2
    assert abs(float(noise.std()) - expected) < 0.03 * expected
    assert abs(float(noise.mean())) < 0.03 * expected


def test_the_privacy_budget_is_counted_per_round_and_the_run_stops_before_passing_it():
    cfg = _dp_cfg(noise_multiplier=1.0)
    cfg.fl.num_rounds = 3
    eps = [privacy.epsilon_after(cfg, r) for r in range(4)]
    assert eps[0] == 0 and eps[1] < eps[2] < eps[3]
    cfg.privacy.max_epsilon = (eps[2] + eps[3]) / 2
    assert "allows 2 of 3 rounds" in privacy.plan(cfg)
    global_w, strategy = _big(0), privacy.with_privacy(cfg, make_strategy(cfg))
    for r in (1, 2):
        local = {i: {k: v + 0.01 * (i + 1) for k, v in global_w.items()} for i in range(2)}
        global_w, _, _ = _round(cfg, local, {0: 64, 1: 64}, global_w, strategy=strategy, server_round=r)
        record = privacy.privacy_record(strategy)
        assert record["releases"] == r and record["epsilon"] == pytest.approx(eps[r], rel=1e-9)
        assert record["delta"] == cfg.privacy.target_delta and record["noise_std"] == pytest.approx(0.5)
    with pytest.raises(privacy.PrivacyBudgetExhausted, match="would exceed max_epsilon"):
        _round(cfg, {0: global_w, 1: global_w}, {0: 64, 1: 64}, global_w, strategy=strategy, server_round=3)
    # a client that did not move is refused by name, not a ZeroDivisionError inside Flower's clipping
    with pytest.raises(RuntimeError, match="update is exactly zero"):
        _round(cfg, {0: global_w, 1: global_w}, {0: 64, 1: 64}, global_w)
    # what a resumed run restores: the accountant's ledger, so the count goes on where it stopped
    again = privacy.with_privacy(cfg, make_strategy(cfg))
    privacy.restore_privacy(again, privacy.privacy_state(strategy))
    assert privacy.privacy_record(again)["epsilon"] == pytest.approx(eps[2], rel=1e-9)


def test_client_side_dp_clips_with_flowers_mod_on_the_client_and_the_server_checks_it(stats):
    """privacy.mode=client-clipping: train messages carry what Flower's fixedclipping_mod reads (one
    ArrayRecord of fp32 numpy weights, one ConfigRecord with the clipping norm and the stats inside); the
    client's mod clips its update before it leaves; the server aggregates the clipped updates and refuses an
    update that was not clipped."""
    cfg = _dp_cfg(clipping_norm=0.5, noise_multiplier=1e-9)
    cfg.privacy.mode = "client-clipping"
    global_w = _big(0)
    updates = {0: _big(1, 3.0), 1: _big(2, 0.001)}
    local = {i: {k: global_w[k] + u[k] for k in global_w} for i, u in updates.items()}
    server = _server(cfg, [101, 57])
    server.stats_record = transport.stats_to_record(stats)
    strategy = privacy.with_privacy(cfg, make_strategy(cfg))
    rd, messages = _train_messages(server, strategy, global_w)
    for m in messages:
        assert len(m.content.array_records) == 1 and len(m.content.config_records) == 1
        assert all(a.stype == "numpy.ndarray" and a.dtype == "float32" for a in m.content["arrays"].values())
        carried = transport.record_from_bytes(m.content["config"][transport.STATS_IN_CONFIG])
        assert transport.stats_digest(carried) == transport.stats_digest(server.stats_record)

    def as_client(msg, clip=True):
        pid = server.partitions[msg.metadata.dst_node_id]

        def train(m, _context):  # what client_train answers: fp32 numpy weights in the order received
            received = transport.decode_arrays(m.content["arrays"])
            weights = transport.to_numpy_record({k: local[pid][k] for k in received})
            metrics = MetricRecord({"num-examples": 64, "partition-id": pid, "samples": 8, "train_loss": 1.0})
            return Message(RecordDict({"arrays": weights, "metrics": metrics}), reply_to=m)

        return client_app.clip_when_asked(msg, None, train) if clip else train(msg, None)

    aggregated = server.aggregate(strategy, rd, [as_client(m) for m in messages])
    out = transport.decode_arrays(aggregated)
    scale = [min(1.0, 0.5 / _norm(updates[i])) for i in range(2)]
    for k in global_w:
        expected = global_w[k] + (scale[0] * updates[0][k] + scale[1] * updates[1][k]) / 2
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-5)
    rd, messages = _train_messages(server, strategy, global_w, server_round=2)
    with pytest.raises(RuntimeError, match="did not clip it"):
        server.aggregate(strategy, rd, [as_client(m, clip=False) for m in messages])
    evaluate = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=101, message_type="evaluate")
    passed = []
    client_app.clip_when_asked(evaluate, None, lambda m, _c: passed.append(m) or m)
    assert passed == [evaluate]  # only train messages are clipped


def test_flowers_adaptive_clipping_still_moves_its_norm_the_wrong_way():
    """Why privacy.mode=adaptive is refused: with every update clipped (norm 1 against 0.1), Andrew et al.'s
    rule grows the norm; flwr 1.41's shrinks it, round after round. When this fails, Flower has fixed it."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), 0.0, 2, initial_clipping_norm=0.1, target_clipped_quantile=0.5, clipped_count_stddev=0.0
    )
    for _ in range(5):
        update = [np.full(100, 0.1)]  # norm 1
        clipped = sum(
            flwr_dp.adaptive_clip_inputs_inplace([u.copy() for u in update], strategy.clipping_norm) for _ in range(2)
        )
        strategy._geometric_update(strategy._noisy_fraction(clipped, 2))
    assert strategy.clipping_norm < 0.1 * 0.65


def test_private_runs_normalize_with_the_pretrained_policys_stats_not_the_clients():
    from zk0lib import model
    from zk0lib.fl.startup import federation_stats

    cfg = _dp_cfg()
    cfg.model.pretrained = "base"
    infos = [{"features": {"observation.state": {"shape": [6]}, "action": {"shape": [6]}}, "stats": {}}]
    record, source = federation_stats(cfg, infos)
    stats = transport.stats_from_record(record)
    base = model.pretrained_stats("base")
    assert source.startswith("pretrained (base") and set(stats) == set(base) >= {"observation.state", "action"}
    np.testing.assert_array_equal(stats["action"]["mean"], base["action"]["mean"])
    infos[0]["features"]["action"]["shape"] = [7]
    with pytest.raises(RuntimeError, match="no action stats of shape \\(7,\\).*privacy.stats=clients"):
        federation_stats(cfg, infos)


def test_privacy_settings_flower_cannot_account_are_refused():
    base = {"privacy.mode": "server-clipping", "fl.weighting": "uniform", "model.pretrained": "base"}
    assert load_config("smoke", base).privacy.on and not load_config("smoke").privacy.on
    refusals = [
        ({"fl.strategy": "fedadam"}, "counts a FedAvg mean"),
        ({"fl.weighting": "frames"}, "set fl.weighting=uniform"),
        ({"privacy.noise_multiplier": 0}, "privacy.noise_multiplier must be > 0 to count epsilon"),
        ({"privacy.mode": "adaptive"}, "shrinks the norm when most updates are clipped"),
        ({"privacy.mode": "local"}, "privacy.mode: one of off, server-clipping, client-clipping"),
        ({"privacy.target_delta": 1.5}, "privacy.target_delta must be in"),
        ({"model.pretrained": "tiny"}, "model.pretrained=tiny has none.*privacy.stats=clients"),
        ({"model.environment_state": True}, "no stats for model.environment_state"),
        ({"privacy.stats": "noised"}, "privacy.stats: one of pretrained, clients"),
        ({"privacy.mode": "client-clipping", "fl.transport_dtype": "bfloat16"}, "clips fp32 weights, not bf16"),
    ]
    for overrides, message in refusals:
        with pytest.raises(ConfigError, match=message):
            load_config("smoke", {**base, **overrides})


def test_a_resumed_run_normalizes_with_the_stats_it_started_with(stats):
    """Saved when the run starts; on resume the saved stats win over what the clients pool now (their
    datasets, or how zk0 pools them, may have changed), and the change is said."""
    from zk0lib.fl.server_app import NORMALIZATION_FILE

    cfg = _cfg(2)
    first = _server(cfg, [11, 12])
    started = transport.stats_to_record(stats)
    assert first.stats_it_started_with(started) is started
    saved = first.run.path / NORMALIZATION_FILE
    assert transport.stats_digest(transport.record_from_bytes(saved.read_bytes())) == transport.stats_digest(started)

    moved = transport.stats_to_record({k: {s: v + 1.0 for s, v in d.items()} for k, d in stats.items()})
    lines = []
    resumed = FederatedServer(cfg, first.run, NodeList([11, 12]), resume=True)
    resumed.book.log = lines.append
    kept = resumed.stats_it_started_with(moved)
    assert transport.stats_digest(kept) == transport.stats_digest(started) != transport.stats_digest(moved)
    assert any("differ from those this run started with" in line for line in lines)


# ----------------------------------------------------------------------------- secure aggregation (SecAgg+)


class SecAggGrid(NodeList):
    """A grid that hands each message to its node's client in process: each node keeps its own Context (where
    Flower's secaggplus_mod keeps its keys between stages) and gets its own copy of the message, as a real
    transport would; an exception in a client becomes its error reply. It keeps every reply for inspection."""

    def __init__(self, clients: dict[int, object]):
        from flwr.app import Context

        super().__init__(list(clients))
        self.clients = clients
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in clients
        }
        self.replies: list[Message] = []

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error

        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            m = copy.deepcopy(m)
            try:
                handler, context = self.clients[node], self.contexts[node]  # through the ClientApp's mods, in order
                reply = client_app.clip_when_asked(
                    m, context, lambda m2, c2, h=handler: client_app.secagg_when_asked(m2, c2, h)
                )
            except Exception as e:  # noqa: BLE001 - what a ClientApp's runtime does with a handler's exception
                reply = Message(Error(code=0, reason=str(e)), reply_to=m)
            out.append(reply)
        self.replies += out
        return out


def _secagg_round(cfg, local, examples, global_w, broken=()):
    """One SecAgg+ round through the server's secure_round, clients answering with `local` (NaN weights for
    the partitions in `broken`)."""
    nodes = [101, 57, 9, 230][: len(cfg.data.clients)]

    def client(pid):
        def train(m, _context):  # what client_train answers under SecAgg+: fp32 weights in the order received
            assert m.content["config"][client_app.SECAGG] is True
            received = transport.decode_arrays(m.content["arrays"])
            weights = {k: local[pid][k] * (float("nan") if pid in broken else 1.0) for k in received}
            metrics = MetricRecord(
                {"num-examples": examples[pid], "partition-id": pid, "samples": 8, "train_loss": 1.0 + pid}
            )
            return Message(RecordDict({"arrays": transport.to_numpy_record(weights), "metrics": metrics}), reply_to=m)

        return train

    server = _server(cfg, nodes)
    server.grid = SecAggGrid({node: client(pid) for pid, node in enumerate(nodes)})
    server.max_weight = float(max(examples.values()))
    strategy = make_strategy(cfg)
    rd = RoundData(1)
    train_config, _ = round_configs(cfg, "fingerprint")
    aggregated = server.secure_round(strategy, rd, transport.to_numpy_record(global_w), train_config)
    return transport.decode_arrays(aggregated), server, rd


def test_secaggplus_aggregate_equals_the_plain_one_and_the_server_sees_no_single_update():
    """privacy.secure_aggregation=secaggplus: Flower's SecAgg+ workflow and mod (keys, shares, masks: all
    Flower's) between zk0's server and its clients' train handler. The unmasked aggregate is the plain
    weighted FedAvg mean within the quantization's step; no client's reply carries its weights or update; a
    client whose update is not finite drops out and the others' mean is still recovered."""
    cfg = _cfg(3, strategy="fedavg", weighting="frames")
    cfg.privacy.secure_aggregation = "secaggplus"
    global_w = _weights(0)
    local = {i: {k: global_w[k] + 0.1 * (i + 1) * _weights(10 + i)[k] for k in global_w} for i in range(3)}
    examples = {0: 100, 1: 300, 2: 50}
    plain, _, _ = _round(_cfg(3, strategy="fedavg", weighting="frames"), local, examples, global_w)
    secure, server, rd = _secagg_round(cfg, local, examples, global_w)
    step = 2 * cfg.privacy.secagg_clipping_range / 2**22  # the quantization's resolution
    for k in global_w:
        torch.testing.assert_close(secure[k], plain[k], rtol=0, atol=10 * step)
    masked = [r for r in server.grid.replies if not r.has_error()]
    assert len(masked) == 4 * 3  # four stages, three clients
    assert all(sum(len(a.data) for rec in r.content.array_records.values() for a in rec.values()) == 0 for r in masked)
    assert rd.secagg["exchanges"] == 4 and rd.secagg["bytes_received"] > 0 and rd.bytes_received > 0
    assert sorted(rd.train) == ["c0", "c1", "c2"] and rd.train["c1"]["weight"] == 300.0
    assert rd.train["c2"]["train_loss"] == 3.0 and rd.train["c0"]["secagg-clipped-values"] == 0
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    again, _, _ = _secagg_round(cfg, local, examples, global_w)
    assert all(torch.equal(again[k], secure[k]) for k in global_w)  # the rounding is seeded by round and client
    assert np.array_equal(np.random.get_state()[1], before)  # and numpy's global generator is handed back

    cfg.fl.min_train_clients = 2
    secure, server, rd = _secagg_round(cfg, local, examples, global_w, broken=(1,))
    expected = {k: (100 * local[0][k] + 50 * local[2][k]) / 150 for k in global_w}
    for k in global_w:
        torch.testing.assert_close(secure[k], expected[k], rtol=0, atol=10 * step)
    assert sorted(rd.train) == ["c0", "c2"] and len(rd.failures) == 1
    assert rd.failures[0]["client"] == "c1" and "not finite" in rd.failures[0]["reason"]
    cfg.fl.min_train_clients = 3
    with pytest.raises(RuntimeError, match="SecAgg\\+ aggregated 2 client updates, fl.min_train_clients=3"):
        _secagg_round(cfg, local, examples, global_w, broken=(1,))


def test_secaggplus_settings_it_cannot_serve_are_refused():
    base = {"privacy.secure_aggregation": "secaggplus"}
    load_config("smoke", base)
    with pytest.raises(ConfigError, match="privacy.secure_aggregation: one of off, secaggplus"):
        load_config("smoke", {"privacy.secure_aggregation": "secagg"})
    with pytest.raises(ConfigError, match="not combined yet"):
        load_config(
            "smoke",
            {**base, "privacy.mode": "server-clipping", "fl.weighting": "uniform", "model.pretrained": "base"},
        )
    with pytest.raises(ConfigError, match="set fl.transport_dtype=float32"):
        load_config("smoke", {**base, "fl.transport_dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="needs at least 2 clients a round"):
        load_config("smoke", {**base, "fl.fraction_train": 0.1})
    with pytest.raises(ConfigError, match="secagg_threshold must be in"):
        load_config("smoke", {**base, "privacy.secagg_threshold": 0})
