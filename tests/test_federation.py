"""Transport encoding, reply checks, and real Flower runs end to end (simulation SuperLink, Ray, clients)."""

import copy
import json
import os

import numpy as np
import psutil
import pytest
import torch

from zk0lib import model
from zk0lib.config import load_config
from zk0lib.fl import startup, transport
from zk0lib.runs import RunRecord

FLOWER_PROCESSES = (
    "flower-superlink",
    "flower-superexec",
    "flwr-simulation",
    "flwr-serverapp",
    "flwr-clientapp",
    "raylet",
    "gcs_server",
    "ray::",
    "dashboard",
    "wandb-core",
)


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g)}


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("bfloat16", 2)])
def test_payload_is_parameter_count_times_dtype_size(dtype, size, session_bundle):
    weights = model.get_trainable(session_bundle.policy)
    count = sum(w.numel() for w in weights.values())
    record = transport.encode_arrays(weights, dtype)
    assert transport.payload_bytes(record) == count * size
    delta = transport.encode_arrays(weights, dtype, reference=weights)
    assert transport.payload_bytes(delta) == count * size


def test_float32_round_trip_is_exact():
    w = _weights()
    back = transport.decode_arrays(transport.encode_arrays(w, "float32"))
    assert all(torch.equal(back[k], w[k]) for k in w)


def test_bfloat16_deltas_keep_small_updates():
    """bf16 weights round a 1e-4 update away; a bf16 delta from the global weights keeps it."""
    global_w = {k: v + 1.0 for k, v in _weights().items()}
    local = {k: v + 1e-4 for k, v in global_w.items()}
    as_weights = transport.decode_arrays(transport.encode_arrays(local, "bfloat16"))
    as_delta = transport.decode_arrays(transport.encode_arrays(local, "bfloat16", reference=global_w), global_w)
    err_weights = max(float((as_weights[k] - local[k]).abs().max()) for k in local)
    err_delta = max(float((as_delta[k] - local[k]).abs().max()) for k in local)
    assert err_delta < 1e-6 < 1e-3 < err_weights


def test_flower_numpy_records_decode():
    w = _weights()
    back = transport.decode_arrays(transport.to_numpy_record(w))
    assert all(torch.equal(back[k], w[k]) for k in w)


def test_update_checks():
    w = _weights()
    assert transport.check_update(transport.encode_arrays(w, "float32"), w) is None
    missing = transport.encode_arrays({"a.weight": w["a.weight"]}, "float32")
    assert "keys differ" in transport.check_update(missing, w)
    wrong = transport.encode_arrays({**w, "b.bias": torch.zeros(6)}, "float32")
    assert "b.bias: shape (6,) != (5,)" in transport.check_update(wrong, w)


def test_stats_record_round_trip(stats):
    record = transport.stats_to_record(stats)
    back = transport.stats_from_record(record)
    assert set(back) == {"action", "observation.state", "observation.images.front", "observation.images.wrist"}
    np.testing.assert_array_equal(back["action"]["mean"], np.asarray(stats["action"]["mean"], dtype=np.float64))
    assert transport.stats_digest(record) == transport.stats_digest(transport.stats_to_record(back))


def test_run_config_forms():
    cfg = load_config("smoke", "fl.num_rounds=5")
    assert transport.config_from_run_config({"config-json": transport.encode_config(cfg)}) == cfg
    assert transport.config_from_run_config({"preset": "smoke", "set": "fl.num_rounds=5", "config-json": ""}) == cfg


def test_incompatible_or_invalid_clients_are_refused():
    a = {
        "name": "a",
        "fps": 30,
        "validation-errors": 0,
        "features": {"action": {"shape": [6], "names": ["j"] * 6}, "observation.images.top": {"dtype": "video"}},
    }
    b = copy.deepcopy(a) | {"name": "b", "fps": 15}
    with pytest.raises(RuntimeError, match=r"b: fps = 15 but a has 30"):
        startup.check_compatible([a, b], load_config("smoke"))
    b = copy.deepcopy(a) | {"name": "b", "validation-errors": 2, "validation-summary": "timestamps.doubled ep 3"}
    with pytest.raises(RuntimeError, match="b: 2 errors .timestamps.doubled ep 3"):
        startup.check_compatible([a, b], load_config("smoke"))
    startup.check_compatible([a, b], load_config("smoke", "data.allow_invalid=true"))


# ----------------------------------------------------------------------------- end to end


def _zk0_home_of(proc: psutil.Process) -> str | None:
    """The ZK0_HOME a process or its nearest ancestor runs under (Ray clears it in some of its helpers)."""
    try:
        for p in [proc, *proc.parents()]:
            if home := p.environ().get("ZK0_HOME"):
                return home
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        pass
    return None


def _alive_flower_processes(since: float) -> list[str]:
    """Flower/Ray processes started since `since` by this test session (its ZK0_HOME), still alive."""
    home = os.environ["ZK0_HOME"]
    found = []
    for p in psutil.process_iter(["cmdline", "create_time", "name"]):
        cmd = " ".join(p.info["cmdline"] or [p.info["name"] or ""])
        if p.info["create_time"] >= since - 1 and any(k in cmd for k in FLOWER_PROCESSES):
            if _zk0_home_of(p) in (home, None):  # None: cannot tell, so it counts
                found.append(f"{p.pid}: {cmd[:120]}")
    return found


def test_smoke_train_completes_with_complete_records(smoke_run, home):
    out, seconds, _ = smoke_run
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "round 2/2" in out.stdout and "run directory:" in out.stdout
    run = RunRecord(home / "reports" / "runs" / "e2e-smoke")
    steps = run.config().train.local_steps
    for name in ("synth-0", "synth-1"):  # each client's progress inside a round reaches the terminal, through Ray
        assert f"client {name} in round 2: step {steps - 1}/{steps}, loss" in out.stdout, out.stdout[-3000:]
    summary = run.summary()
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    rounds = run.rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    cfg = run.config()
    trainable = summary["parameters"]["trainable"]
    for r in rounds[1:]:
        assert set(r["train"]["clients"]) == {"synth-0", "synth-1"} and r["sampled"] == ["synth-0", "synth-1"]
        for name, m in r["train"]["clients"].items():
            assert m["steps"] == cfg.train.local_steps and m["samples"] == cfg.train.local_steps * cfg.train.batch_size
            assert m["proximal_mu"] == cfg.fl.proximal_mu > 0  # fedprox
            assert m["weight"] == summary["clients"][name]["train-frames"]  # fl.weighting=frames
            for key in ("train_loss", "train_loss_std", "prox_term", "grad_norm", "update_norm", "seconds"):
                assert np.isfinite(m[key])
        assert r["bytes_sent"] == r["bytes_received"] == 2 * trainable * 4
        assert r["failures"] == []
    for r in rounds:
        assert set(r["eval"]["clients"]) == {"synth-0", "synth-1"}
        assert r["eval"]["mean"]["loss_ci"][0] <= r["eval"]["mean"]["loss"] <= r["eval"]["mean"]["loss_ci"][1]
    assert summary["final"]["round"] == 2
    for r in rounds:  # one validation episode per client, apart from the held-out ones
        assert {n: v["episodes"] for n, v in r["eval"]["validation"]["clients"].items()} == {"synth-0": 1, "synth-1": 1}
    by_val = min(rounds[1:], key=lambda r: r["eval"]["validation"]["loss"])
    assert summary["best"]["round"] == by_val["round"] and summary["best"]["selected_on"] == "validation"
    assert summary["best"]["loss"] == by_val["eval"]["mean"]["loss"]  # reported on the test episodes
    assert all(r["eval"]["eval_only"]["unseen"]["episodes"] == cfg.data.synthetic_episodes for r in rounds)
    config = json.loads((run.path / "config.json").read_text())
    assert config["environment"]["packages"]["flwr"] and config["config"]["fl"]["num_rounds"] == 2


def test_the_rehearsal_reads_its_report_from_a_runs_own_record(smoke_run, home):
    """`zk0 rehearse`'s readiness report (bytes per message, peak RSS, time per phase, checkpoint size) from
    the smoke run's record; its config puts the two synthetic clients on a smolvla_base-shaped policy."""
    from zk0lib import rehearse
    from zk0lib.launch import RunResult

    run = RunRecord(home / "reports" / "runs" / "e2e-smoke")
    report = rehearse.run_report(RunResult.of(run, 12.0), "simulation")
    rounds = {r["round"]: r for r in run.rounds()}
    assert report["status"] == "completed"
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        record = rounds[row["round"]]
        assert row["sent_mib"] == round(record["bytes_sent"] / 2**20, 1) > 0
        assert set(row["message_mib"]) == {"synth-0", "synth-1"}
        assert sum(m["payload-bytes"] for m in record["train"]["clients"].values()) == record["bytes_received"]
        assert all(v > 100 for v in row["client_peak_rss_mib"].values()) and row["server_peak_rss_mib"] > 100
        assert 0 < row["seconds"]["step"] <= row["seconds"]["client_steps"] <= row["seconds"]["round"]
    assert report["final_checkpoint_mib"] > 1 and report["startup_seconds"]["build_policy"] > 0
    text = rehearse.markdown(
        {"pretrained": "x", "device": "cpu", "ready": True, "build": {"seconds": 0}, "runs": [report],
         "expected_mib": {"trainable_fp32": 381.0, "trainable_bf16": 190.5}}
    )  # fmt: skip
    assert "| 1 |" in text and "| 2 |" in text and "simulation" in text

    cfg = rehearse.rehearsal_config("/models/smolvla_base", "cpu", ["fl.num_rounds=1"])
    assert cfg.model.pretrained == "/models/smolvla_base" and len(cfg.data.clients) == 2
    assert cfg.fl.num_rounds == 1 and cfg.train.local_steps == 2 and cfg.train.batch_size == 2
    assert set(cfg.data.rename_map.values()) == {"observation.images.camera1", "observation.images.camera2"}


def test_smoke_train_changes_global_weights_only(smoke_run, home, smoke_cfg, clients, stats):
    final = model.load_policy(home / "reports" / "runs" / "e2e-smoke" / "checkpoints" / "final")
    initial = model.build_policy(smoke_cfg, clients[0].meta, stats)
    assert model.frozen_fingerprint(final.policy) == model.frozen_fingerprint(initial.policy)
    a, b = model.get_trainable(final.policy), model.get_trainable(initial.policy)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert (home / "reports" / "runs" / "e2e-smoke" / "checkpoints" / "best" / "model.safetensors").exists()


def test_smoke_train_is_fast_and_leaves_no_process(smoke_run):
    _, seconds, t0 = smoke_run
    assert _alive_flower_processes(t0) == []
    print(f"zk0 train --preset smoke took {seconds:.0f} s")


def test_bad_config_fails_before_anything_starts(home, zk0_cli):
    out = zk0_cli("train", "--preset", "smoke", "--run-id", "never", "--set", "fl.num_rounds=0")
    assert out.returncode == 2 and "fl.num_rounds must be >= 1" in out.stderr
    assert not (home / "reports" / "runs" / "never").exists()


def test_wandb_round_metrics_are_client_prefixed():
    from zk0lib.tracking import flatten_round

    record = {
        "round": 2,
        "train": {"clients": {"a": {"train_loss": 1.0}}, "aggregate": {"train_loss": 1.0}},
        "eval": {
            "clients": {"a": {"loss": 0.5, "loss_ci": [0.4, 0.6]}},
            "mean": {"loss": 0.5},
            "extra": {"unseen": {"loss": 0.9}},
        },
        "bytes_sent": 10,
        "failures": [],
        "seconds": {"round": 3.0},
    }
    flat = flatten_round(record)
    assert flat["train/a/train_loss"] == 1.0 and flat["eval/a/loss"] == 0.5 and flat["eval/unseen/loss"] == 0.9
    assert flat["eval/mean/loss"] == 0.5 and flat["comms/bytes_sent"] == 10 and "eval/a/loss_ci" not in flat
    record["eval"]["eval_only"] = record["eval"].pop("extra")  # today's name; `extra` is what older runs wrote
    assert flatten_round(record) == flat


@pytest.fixture(scope="module")
def many_owners_private_run(zk0_cli, home):
    """One Flower run read by two tests: eight smoke owners on two Ray actors (fl.client_num_cpus=1, two loader
    workers each), from the shipped base, under client-level DP with client-side clipping and a budget
    that allows two of three rounds. Returns (completed process, its config as sent, epsilon after r rounds)."""
    from zk0lib.fl import privacy

    clients = [
        {"name": f"many-{i}", "repo_id": f"zk0/synthetic-many-{i}", "source": "synthetic", "variant": i % 3}
        for i in range(8)
    ]
    overrides = {
        "data.clients": json.dumps(clients),
        "fl.num_rounds": "3",
        "fl.client_num_cpus": "1",
        "fl.weighting": "uniform",
        "train.local_steps": "2",
        "train.num_workers": "2",
        "eval.every": "3",  # round 0, then round 2: the last the budget allows is judged as a last round is
        "eval.max_frames": "8",
        "eval.action_frames": "2",
        "model.pretrained": "base",  # privacy.stats=pretrained (the default): the base's stats, none from clients
        "privacy.mode": "client-clipping",
        "privacy.noise_multiplier": "1.0",
        "privacy.clipping_norm": "0.01",
    }
    cfg = load_config("smoke", overrides)
    eps = [privacy.epsilon_after(cfg, r) for r in range(4)]
    overrides["privacy.max_epsilon"] = f"{(eps[2] + eps[3]) / 2:.6f}"
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    out = zk0_cli("train", "--preset", "smoke", "--run-id", "e2e-many-private", *sets)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out, load_config("smoke", overrides), eps


def test_eight_clients_on_two_actors_keep_one_stream_each(many_owners_private_run, home):
    """Issue 14 item 7: a Ray actor serves many clients in turn; it must not keep every client's data
    loader (worker processes, prefetched batches) alive. Eight clients on two actors, two rounds: each
    actor has at most one client's loader workers at any time and its memory stays flat from round to round."""
    run = RunRecord(home / "reports" / "runs" / "e2e-many-private")
    rounds = run.rounds()[1:]
    assert [r["round"] for r in rounds] == [1, 2]
    by_pid: dict[int, list[tuple[int, dict]]] = {}
    for r in rounds:
        assert len(r["train"]["clients"]) == 8
        for m in r["train"]["clients"].values():
            by_pid.setdefault(m["pid"], []).append((r["round"], m))
    assert len(by_pid) == 2  # two actors served the eight clients
    for served in by_pid.values():
        assert len({m["partition-id"] for _, m in served}) >= 3  # each actor served several clients
        # one live stream: its loader's 2 workers (+ at most one just closing), never one per client served
        assert max(m["child_processes"] for _, m in served) <= 3
        early = max(m["rss_with_children_mib"] for rnd, m in served if rnd == 1)
        late = max(m["rss_with_children_mib"] for rnd, m in served if rnd == 2)
        assert late <= early * 1.1 + 64, (early, late)


def test_a_private_run_counts_epsilon_per_round_and_stops_before_passing_max_epsilon(many_owners_private_run, home):
    """privacy.mode=client-clipping on a real Flower run (Flower's fixedclipping_mod in zk0's ClientApp): every
    round records the epsilon Flower's accountant counts, every update arrives clipped, the run ends cleanly
    before the round that would pass max_epsilon with its last good round kept, the resume state carries the
    accountant's ledger, and the normalization stats are the pretrained base's (the clients send none)."""
    from zk0lib.fl import privacy
    from zk0lib.fl.strategy import make_strategy
    from zk0lib.runs import load_resume_state

    out, cfg, eps = many_owners_private_run
    assert "privacy: client-side clipping at 0.01" in out.stdout and "allows 2 of 3 rounds" in out.stdout
    assert "stopped before round 3: privacy budget" in out.stdout
    run = RunRecord(home / "reports" / "runs" / "e2e-many-private")
    summary, rounds = run.summary(), run.rounds()
    assert summary["status"] == "completed" and summary["stopped"]["rounds_trained"] == 2
    assert summary["normalization_stats"].startswith("pretrained (base")
    assert [r["round"] for r in rounds] == [0, 1, 2] and "privacy" not in rounds[0]
    assert "eval" not in rounds[1] and "eval" in rounds[2]  # eval.every=3: round 2 is judged as the last round
    for r in rounds[1:]:
        p = r["privacy"]
        assert p["releases"] == r["round"] and p["epsilon"] == pytest.approx(eps[r["round"]], rel=1e-6)
        assert p["delta"] == 1e-5 and p["noise_std"] == pytest.approx(1.0 * 0.01 / 8)
        assert all(m["update_norm"] > 0.01 for m in r["train"]["clients"].values())  # the clipping binds
        assert r["failures"] == [] and p["mode"] == "client-clipping"  # so every update arrived clipped
    assert summary["privacy"]["epsilon"] == rounds[-1]["privacy"]["epsilon"] <= cfg.privacy.max_epsilon
    assert (run.path / "checkpoints" / "final" / "model.safetensors").exists()
    # a resumed run goes on counting from the saved ledger
    strategy = privacy.with_privacy(run.config(), make_strategy(run.config()))
    privacy.restore_privacy(strategy, load_resume_state(run)["extra"]["privacy"])
    assert privacy.privacy_record(strategy)["epsilon"] == pytest.approx(eps[2], rel=1e-9)
