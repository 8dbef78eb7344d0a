"""Flower's Deployment Engine on loopback with TLS and SuperNode authentication (`zk0 deploy-local`)."""

import json
import time

from test_federation import _alive_flower_processes  # tests/ is on sys.path

from zk0lib.runs import RunRecord


def test_deploy_local_with_tls_and_auth_matches_the_simulation(home, zk0_cli, sweep_dir):
    """One round of the smoke preset over TLS with authenticated SuperNodes on the Deployment Engine gives
    the simulation's numbers: the sweep's FedProx point ran the same config in Flower's simulation (every
    message here starts a ClientApp process, so rounds are slow: one round keeps the test short)."""
    simulated = RunRecord(sweep_dir / "runs" / "01-strategy-fedprox")
    assert simulated.summary()["status"] == "completed"
    t0 = time.time()
    out = zk0_cli(
        "deploy-local", "--preset", "smoke", "--run-id", "deployed",
        "--set", "fl.num_rounds=1", "--set", "train.local_steps=2", "--set", "fl.strategy=fedprox",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "2 SuperNodes registered and started" in out.stdout
    assert "over TLS with authenticated SuperNodes" in out.stdout
    deployed = RunRecord(home / "reports" / "runs" / "deployed")
    assert deployed.config().fl.num_rounds == 1 and simulated.config().fl.num_rounds == 1
    assert deployed.config().train.local_steps == simulated.config().train.local_steps == 2
    assert [r["round"] for r in deployed.rounds()] == [0, 1]
    assert set(deployed.rounds()[1]["train"]["clients"]) == {"synth-0", "synth-1"}
    assert set(deployed.rounds()[1]["eval"]["clients"]) == {"synth-0", "synth-1"}
    for a, b in zip(deployed.rounds(), simulated.rounds(), strict=True):  # every round, not only the last
        for key in ("loss", "action_mae"):  # whichever engine carried the messages and whoever judged: the same
            assert abs(a["eval"]["mean"][key] - b["eval"]["mean"][key]) < 1e-6
    for key in ("loss", "action_mae"):
        assert abs(deployed.summary()["final"][key] - simulated.summary()["final"][key]) < 1e-6
    assert (home / "data_cache" / "deploy" / "tls" / "ca.crt").exists()
    assert _alive_flower_processes(t0) == []


def test_unregistered_and_plaintext_supernodes_are_refused(home, zk0_cli):
    t0 = time.time()
    out = zk0_cli("deploy-local", "--preset", "smoke", "--check-refusals")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    outcome = json.loads(out.stdout)
    assert (
        outcome["unregistered"]["exited"]
        and "[code: 2004] Failed to activate SuperNode." in outcome["unregistered"]["said"]
    )
    assert outcome["plaintext"]["exited"] and outcome["plaintext"]["returncode"] != 0
    assert [n["status"] for n in outcome["superlink_nodes"]] == ["registered"]  # only the authorized key, never online
    assert _alive_flower_processes(t0) == []
