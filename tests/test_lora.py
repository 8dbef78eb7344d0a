"""Federated LoRA (model.peft.method=lora): real PEFT adapters on the shipped tiny base, real Flower runs."""

import copy
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from zk0lib import data, model, train
from zk0lib.config import ConfigError, load_config
from zk0lib.runs import RunRecord

LORA = {"model.pretrained": "base", "model.peft.method": "lora", "model.peft.r": "4"}
LORA_RUN = [f"--set={k}={v}" for k, v in LORA.items()] + [
    "--set=fl.transport_dtype=bfloat16",
    "--set=fl.strategy=fedadam",
]


@pytest.fixture(scope="module")
def lora_cfg():
    return load_config("smoke", LORA)


@pytest.fixture
def lora_bundle(lora_cfg, clients, stats):
    return model.build_policy(lora_cfg, clients[0].meta, stats)


def _adapted_linears(policy) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in policy.modules() if isinstance(m, LoraLayer)]


def test_only_adapters_train_and_their_size_is_the_lora_arithmetic(lora_bundle):
    names = [n for n, _ in model.trainable_parameters(lora_bundle.policy)]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    layers = _adapted_linears(lora_bundle.policy)
    expected = sum(4 * (m.in_features + m.out_features) for m in layers)  # r x (in + out) per adapted Linear
    assert model.parameter_counts(lora_bundle.policy)["trainable"] == expected
    targets = {n.split(".base_model.model.")[-1] for n, m in lora_bundle.policy.named_modules() if m in layers}
    assert any("lm_expert" in t and t.endswith("q_proj") for t in targets)  # SmolVLA's default targets
    assert not any("vision" in t or "text_model" in t for t in targets)  # the VLM is not adapted by default


def test_a_round_moves_the_adapters_and_nothing_else(lora_bundle, lora_cfg, train_set):
    policy = lora_bundle.policy
    before_frozen = model.frozen_fingerprint(policy)
    before = model.get_trainable(policy)
    stream = data.batch_stream(train_set, lora_cfg.train.batch_size, 0, 0)
    optimizer, scheduler = train.make_optimizer(policy, 3, 0)
    train.train_steps(lora_bundle, stream, optimizer, scheduler, 3, lora_cfg)
    after = model.get_trainable(policy)
    assert model.frozen_fingerprint(policy) == before_frozen  # the pretrained weights stayed
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_merged_checkpoint_reloads_in_a_fresh_process_with_the_same_actions(lora_bundle, tmp_path, train_set):
    with torch.no_grad():  # make the adapters non-trivial (lora_B starts at zero)
        for _, p in model.trainable_parameters(lora_bundle.policy):
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / "final"
    model.save_policy(lora_bundle, folder)
    adapter = json.loads((folder / model.ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    assert json.loads((folder / "config.json").read_text())["use_peft"] is False  # a plain lerobot policy

    batch = lora_bundle.preprocessor(next(iter(torch.utils.data.DataLoader(train_set, batch_size=2))))
    noise = torch.randn(2, lora_bundle.policy.config.chunk_size, lora_bundle.policy.config.max_action_dim)
    torch.save({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)} | {"noise": noise}, tmp_path / "in.pt")
    lora_bundle.policy.eval()
    with torch.no_grad():
        ours = lora_bundle.policy.predict_action_chunk(batch, noise=noise)
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy\n"
        "from zk0lib import model\n"
        "model._install_tiny_vlm_if_named(Path(sys.argv[1]))\n"
        "policy = SmolVLAPolicy.from_pretrained(sys.argv[1]).eval()\n"
        "batch = torch.load(sys.argv[2])\n"
        "noise = batch.pop('noise')\n"
        "with torch.no_grad():\n"
        "    torch.save(policy.predict_action_chunk(batch, noise=noise), sys.argv[3])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_lora_needs_a_pretrained_policy():
    with pytest.raises(ConfigError, match="model.peft.method=lora adapts a pretrained policy"):
        load_config("smoke", {"model.peft.method": "lora"})
    with pytest.raises(ConfigError, match="model.peft.method: none or lora"):
        load_config("smoke", {"model.peft.method": "dora"})


def test_federated_lora_exchanges_only_adapters(zk0_cli, home, clients, stats):
    """Two rounds of real Flower with LoRA, FedAdam's server step and bf16 deltas: what travelled, what
    was saved."""
    out = zk0_cli("train", "--preset", "smoke", "--run-id", "e2e-lora", *LORA_RUN)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = RunRecord(home / "reports" / "runs" / "e2e-lora")
    summary = run.summary()
    cfg = run.config()
    rebuilt = model.build_policy(cfg, clients[0].meta, stats)
    adapters = model.parameter_counts(rebuilt.policy)["trainable"]
    assert summary["parameters"]["trainable"] == adapters
    for r in run.rounds()[1:]:
        assert r["bytes_received"] == 2 * adapters * 2  # two clients, bf16 deltas of the adapters only
        assert r["bytes_sent"] == 2 * adapters * 2
    final = run.path / "checkpoints" / "final"
    reloaded = model.load_policy(final)
    plain = copy.deepcopy(cfg)
    plain.model.peft.method = "none"
    base = model.build_policy(plain, clients[0].meta, stats)  # the pretrained base, no adapters
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(base.policy, str(final / model.ADAPTER_DIR))
    merged = adapted.merge_and_unload().state_dict()
    for k, v in reloaded.policy.state_dict().items():  # saved merged = pretrained base + the saved adapter
        np.testing.assert_allclose(v.numpy(), merged[k].numpy(), rtol=1e-6, atol=1e-6)
    # what `zk0 publish` uploads: the card says what the adapter is, and its own loading recipe works
    from zk0lib.hub import prepare_folder

    folder = prepare_folder(run.path, "owner/zk0-lora")
    card = (folder / "README.md").read_text()
    assert "## LoRA adapter" in card and "rank 4" in card and f"{adapters:,} trainable parameters" in card
    assert 'PeftModel.from_pretrained(base, "owner/zk0-lora", subfolder="adapter")' in card and "- lora" in card
    again = PeftModel.from_pretrained(
        model.build_policy(plain, clients[0].meta, stats).policy, str(folder), subfolder="adapter"
    )
    for k, v in again.merge_and_unload().state_dict().items():
        np.testing.assert_allclose(v.numpy(), merged[k].numpy(), rtol=1e-6, atol=1e-6)


def test_a_stopped_run_resumes_to_the_uninterrupted_result(zk0_cli, home):
    """SIGTERM to zk0 alone (what `timeout` or a job scheduler sends) in round 2 of the LoRA + FedAdam + bf16
    run: zk0 stops the SuperLink, the simulation and Ray (they run in their own session, so the signal does
    not reach them), marks the run stopped and says how to go on. Then --resume: the adapters, FedAdam's
    moments and the RNG states come back from the resume state, the run ends where the uninterrupted one
    did, no Flower process is left, and a completed run is not resumed. (The one stop-and-resume test: a
    plain run's resume is the same code with other trainable weights; after a kill -9 of the whole tree the
    record still says running, and resume reads the same state.)"""
    from test_faults import kill_after_round_1  # tests/ is on sys.path
    from test_federation import _alive_flower_processes

    reference = RunRecord(home / "reports" / "runs" / "e2e-lora")
    if not (reference.path / "summary.json").exists():
        assert zk0_cli("train", "--preset", "smoke", "--run-id", "e2e-lora", *LORA_RUN).returncode == 0
    t0 = time.time()
    run, err = kill_after_round_1(home, "killed-lora", *LORA_RUN, sig=signal.SIGTERM)
    assert "zk0: stopped by SIGTERM" in err and "zk0 train --resume" in err, err[-3000:]
    assert _alive_flower_processes(t0) == []  # nothing left running after the stop
    assert run.summary()["status"] == "failed" and "stopped by SIGTERM" in run.summary()["error"]
    out = zk0_cli("train", "--resume", str(run.path))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "resuming run killed-lora after round 1" in out.stdout
    assert [r["round"] for r in run.rounds()] == [0, 1, 2]  # no gap, no duplicate
    summary, ref = run.summary(), reference.summary()
    assert summary["status"] == "completed" and summary["resumed"][0]["after_round"] == 1
    assert summary["final"]["loss"] == pytest.approx(ref["final"]["loss"], abs=1e-6)
    assert summary["final"]["action_mae"] == pytest.approx(ref["final"]["action_mae"], abs=1e-6)
    assert summary["totals"]["train_samples"] == ref["totals"]["train_samples"]
    assert _alive_flower_processes(t0) == []

    again = zk0_cli("train", "--resume", str(run.path))
    assert again.returncode == 1 and "already completed" in again.stderr
