"""Reliability: failing and poisoned clients, update screening, fault-injection guard, kill -9 and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from test_federation import _alive_flower_processes  # tests/ is on sys.path

from zk0lib import data, model, train
from zk0lib.config import FAULTS_ENV, ConfigError, load_config
from zk0lib.fl import faults, transport
from zk0lib.runs import RunRecord


def test_fault_injection_is_refused_unless_enabled(monkeypatch):
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"for tests only: set {FAULTS_ENV}=1"):
        load_config("smoke", {"fl.inject_failure": "raise:1@1"})
    monkeypatch.setenv(FAULTS_ENV, "1")
    with pytest.raises(ConfigError, match="is not MODE:CLIENT@ROUND"):
        load_config("smoke", {"fl.inject_failure": "explode:1@1"})
    with pytest.raises(ConfigError, match="out of range"):
        load_config("smoke", {"fl.inject_failure": "raise:5@1"})
    assert load_config("smoke", {"fl.inject_failure": "raise:1@1,nan:0@2"}).fl.inject_failure


def test_update_screening():
    g = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    ok = {"w": torch.full((3, 2), 0.1), "b": torch.ones(2)}
    weights, problem = transport.screen_update(transport.encode_arrays(ok, "float32"), g, 10.0)
    assert problem is None and torch.equal(weights["b"], ok["b"])
    _, problem = transport.screen_update(transport.encode_arrays(ok, "float32"), g, 1.0)
    assert "exceeds fl.max_update_norm=1" in problem
    bad = faults.corrupt(transport.encode_arrays(ok, "bfloat16", reference=g), "nan")
    assert transport.screen_update(bad, g, 10.0)[1] == "update has NaN or Inf values"
    bad = faults.corrupt(transport.encode_arrays(ok, "float32"), "shape")
    assert "shape (4, 2) != (3, 2)" in transport.screen_update(bad, g, 10.0)[1]


@pytest.fixture(scope="module")
def faulty_run(home, zk0_cli):
    """Four rounds, two clients, one failing or poisoned each round; one client is enough to go on."""
    os.environ[FAULTS_ENV] = "1"  # inherited by zk0 and every Flower process it starts
    t0 = time.time()
    out = zk0_cli(
        "train", "--preset", "smoke", "--run-id", "faulty",
        "--set", "fl.num_rounds=4",
        "--set", "fl.min_train_clients=1",
        "--set", "fl.inject_failure=nan:0@1,shape:1@2,raise:0@3,exit:1@4",
        "--set", "data.cache=features",  # clients train on cached image features
    )  # fmt: skip
    del os.environ[FAULTS_ENV]
    return out, t0


def test_failed_and_rejected_clients_are_recorded_and_left_out(faulty_run, home):
    out, t0 = faulty_run
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    run = RunRecord(home / "reports" / "runs" / "faulty")
    rounds = run.rounds()
    assert run.summary()["status"] == "completed" and [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    expected = {
        1: ("synth-0", "rejected: update has NaN"),
        2: ("synth-1", "rejected: "),
        3: ("synth-0", "injected failure"),
    }
    for rnd, (client, reason) in expected.items():
        (failure,) = rounds[rnd]["failures"]
        assert failure["client"] == client and failure["round"] == rnd and reason in failure["reason"], failure
        assert rounds[rnd]["num_train_clients"] == 1 and client not in rounds[rnd]["train"]["clients"]
    assert "shape" in rounds[2]["failures"][0]["reason"]
    (died,) = rounds[4]["failures"]  # the client's process exited mid-round
    assert died["client"] == "synth-1" and rounds[4]["num_train_clients"] == 1
    assert died["reason"] == "the client's process died mid-round"
    assert rounds[3]["failures"][0]["reason"] == "injected failure: client 0 raises in round 3 (fl.inject_failure)"
    assert _alive_flower_processes(t0) == []


def test_global_weights_are_the_aggregate_of_the_accepted_updates(faulty_run, home, smoke_cfg, clients, stats):
    """Replay, in this process, the one accepted client of each round: the run's final weights are exactly
    theirs, so nothing of the rejected or failed updates reached the global model."""
    cfg = RunRecord(home / "reports" / "runs" / "faulty").config()
    bundle = model.build_policy(smoke_cfg, clients[0].meta, stats)
    sets = [data.embedded_for(cfg, data.open_for(cfg, c, c.train_episodes, bundle.config), bundle) for c in clients]
    streams = [data.BatchStream(ds, cfg.train.batch_size, cfg.train.num_workers) for ds in sets]
    for rnd, pid in ((1, 1), (2, 0), (3, 1), (4, 0)):
        train.train_round(bundle, streams[pid], cfg, rnd, pid, cfg.fl.proximal_mu)
    final = model.load_policy(home / "reports" / "runs" / "faulty" / "checkpoints" / "final")
    ours, theirs = model.get_trainable(bundle.policy), model.get_trainable(final.policy)
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5


def _kill_tree(pid: int) -> None:
    root = psutil.Process(pid)
    for p in [*root.children(recursive=True), root]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def kill_after_round_1(home, run_id: str, *args: str, sig: int = signal.SIGKILL) -> tuple[RunRecord, str]:
    """`zk0 train --preset smoke --run-id RUN_ID ARGS` stopped once round 1's resume state is written, i.e. in
    round 2: with SIGKILL, every process of its tree (zk0, SuperLink, simulation, Ray: a lost machine); with
    SIGTERM, zk0's own process only, as `timeout` or a job scheduler stops it. Returns the run and zk0's stderr."""
    run = RunRecord(home / "reports" / "runs" / run_id)
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zk0lib.cli", "train", "--preset", "smoke", "--run-id", run_id, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = run.checkpoint("resume") / "state.json"
    while not (state.exists() and json.loads(state.read_text())["round"] == 1):
        assert proc.poll() is None and time.time() - t0 < 300, "the run ended before round 1 was checkpointed"
        time.sleep(0.2)
    if sig == signal.SIGKILL:
        _kill_tree(proc.pid)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig, err[-3000:]
    return run, err


def test_a_crash_while_swapping_resume_states_falls_back_to_the_previous_round(tmp_path, monkeypatch):
    from pathlib import Path

    from zk0lib.book import RoundBook
    from zk0lib.runs import load_resume_state, resume_round, save_resume_state

    cfg = load_config("smoke", {"output.runs_dir": str(tmp_path), "output.run_id": "swap"})
    run = RunRecord.create(cfg)
    book = RoundBook(cfg, run, log=lambda _: None)
    weights = {r: transport.to_numpy_record({"w": torch.full((3,), float(r))}) for r in (1, 2)}
    save_resume_state(run, 1, weights[1], {}, book)

    rename, calls = Path.rename, []

    def killed_on_second_rename(self, target):  # resume -> .resume.old happens; .resume.tmp -> resume does not
        calls.append(self.name)
        if len(calls) == 2:
            raise SystemExit("the machine dies between the two renames")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_on_second_rename)
    with pytest.raises(SystemExit):
        save_resume_state(run, 2, weights[2], {}, book)
    monkeypatch.undo()
    assert calls == ["resume", ".resume.tmp"] and not run.checkpoint("resume").exists()
    assert resume_round(run) == 1
    state = load_resume_state(run)
    assert state["round"] == 1 and state["arrays"]["w"].tolist() == [1.0, 1.0, 1.0]

    save_resume_state(run, 2, weights[2], {}, book)  # the next round's save starts clean
    assert resume_round(run) == 2 and not (run.checkpoint("resume").parent / ".resume.old").exists()


def test_a_ray_start_up_failure_is_told_apart_from_a_failed_run(tmp_path):
    from zk0lib.fl.simulation import ray_did_not_start

    cfg = load_config("smoke", {"output.runs_dir": str(tmp_path), "output.run_id": "ray"})
    run = RunRecord.create(cfg)
    log = run.path / "flower.log"
    log.write_text("ray.exceptions.RaySystemError: System error: Failed to connect to GCS. Please check ...\n")
    assert ray_did_not_start(run, log)
    log.write_text("[zk0] 2 clients, 1,000 trainable\nray.exceptions.RaySystemError: Failed to connect to GCS\n")
    assert not ray_did_not_start(run, log)  # the ServerApp had started: a real failure of the run
    log.write_text(  # two simulations starting together on 2 cores (seen with pytest -n 2)
        "Exception: The current node timed out during startup. This could happen because some of the raylet "
        "failed to startup or the GCS has become overloaded.\nRuntimeError: Simulation Runtime crashed.\n"
    )
    assert ray_did_not_start(run, log)
    log.write_text("RuntimeError: client synth-0 raised\n")
    assert not ray_did_not_start(run, log)
