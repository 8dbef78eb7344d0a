"""Tiny offline SmolVLA, trainable weights, checkpoints that reload elsewhere, the smolvla_base sizes."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from zk0lib import model
from zk0lib.config import load_config


def test_tiny_policy_is_smolvla_with_lerobot_freezing(session_bundle):
    policy = session_bundle.policy
    assert type(policy).__name__ == "SmolVLAPolicy"
    counts = model.parameter_counts(policy)
    assert 0 < counts["trainable"] < counts["total"]
    names = [n for n, _ in model.trainable_parameters(policy)]
    assert all("vlm_with_expert.vlm." not in n for n in names)  # train_expert_only: the VLM is frozen
    assert any("lm_expert" in n for n in names)


def test_same_seed_same_weights(smoke_cfg, clients, stats, session_bundle):
    other = model.build_policy(smoke_cfg, clients[1].meta, stats)
    assert model.frozen_fingerprint(other.policy) == model.frozen_fingerprint(session_bundle.policy)
    a, b = model.get_trainable(other.policy), model.get_trainable(session_bundle.policy)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_get_set_trainable(fresh_bundle):
    weights = model.get_trainable(fresh_bundle.policy)
    shifted = {k: v + 1.0 for k, v in weights.items()}
    model.set_trainable(fresh_bundle.policy, shifted)
    assert all(torch.equal(model.get_trainable(fresh_bundle.policy)[k], shifted[k]) for k in weights)
    with pytest.raises(ValueError, match="1 missing"):
        model.set_trainable(fresh_bundle.policy, dict(list(weights.items())[1:]))
    name = next(iter(weights))
    with pytest.raises(ValueError, match=f"weight {name}: shape"):
        model.set_trainable(fresh_bundle.policy, {**weights, name: torch.zeros(3)})


def _tensor_sum(bundle_or_policy):
    return float(sum(p.detach().double().sum() for p in bundle_or_policy.parameters()))


RELOAD = textwrap.dedent("""
    import json, sys
    from zk0lib.model import ensure_tiny_vlm
    if sys.argv[2] == "fresh-cache":
        ensure_tiny_vlm()  # what any zk0 command does on a new machine
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.policies.factory import make_pre_post_processors
    policy = SmolVLAPolicy.from_pretrained(sys.argv[1])
    pre, post = make_pre_post_processors(policy.config, pretrained_path=sys.argv[1])
    print(json.dumps({"sum": float(sum(p.double().sum() for p in policy.parameters())),
                      "steps": len(pre.steps), "vlm": policy.config.vlm_model_name}))
""")


@pytest.mark.parametrize("where", ["same-cache", "fresh-cache"])
def test_checkpoint_reloads_in_a_fresh_process_elsewhere(fresh_bundle, tmp_path, home, where):
    model.set_trainable(fresh_bundle.policy, {k: v + 0.5 for k, v in model.get_trainable(fresh_bundle.policy).items()})
    saved = tmp_path / "ckpt"
    model.save_policy(fresh_bundle, saved)
    text = " ".join(p.read_text() for p in saved.glob("*.json"))
    assert str(home) not in text and str(tmp_path) not in text  # no absolute paths baked in
    moved = tmp_path / "elsewhere" / "policy"  # "another machine": another folder, another cwd
    shutil.copytree(saved, moved)
    shutil.rmtree(saved)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if where == "fresh-cache":
        env["HF_HOME"] = str(tmp_path / "new-hf-home")
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, str(moved), where],
        cwd=tmp_path / "elsewhere",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["vlm"] == model.TINY_VLM_REPO
    assert result["sum"] == pytest.approx(_tensor_sum(fresh_bundle.policy), rel=1e-12)
    assert result["steps"] == len(fresh_bundle.preprocessor.steps)


def test_load_policy_round_trip(fresh_bundle, tmp_path, heldout_set, smoke_cfg):
    from zk0lib.evaluation import evaluate

    model.save_policy(fresh_bundle, tmp_path / "p")
    model.save_policy(fresh_bundle, tmp_path / "p")  # overwriting an existing checkpoint is atomic too
    loaded = model.load_policy(tmp_path / "p")
    assert evaluate(loaded, heldout_set, smoke_cfg) == evaluate(fresh_bundle, heldout_set, smoke_cfg)


def test_smolvla_base_sizes_offline():
    sizes = model.smolvla_base_sizes()
    assert round(sizes["parameters"]["total"] / 1e6, 1) == 450.0
    assert round(sizes["parameters"]["trainable"] / 1e6, 1) == 99.9
    b = sizes["bytes_per_round"]
    assert b["trainable_bf16"] * 2 == b["trainable_fp32"]
    assert b["trainable_bf16"] / b["full_state_dict_fp32"] <= 0.12


def test_pretrained_policy_offline_is_a_clear_error(clients, stats):
    cfg = load_config("zk0-hub", {"model.device": "cpu"})
    with pytest.raises(model.ModelNotAvailableError) as err:
        model.build_policy(cfg, clients[0].meta, stats)
    message = str(err.value)
    assert "huggingface-cli download lerobot/smolvla_base" in message
    assert "HuggingFaceTB/SmolVLM2-500M-Video-Instruct" in message
    assert "model.pretrained=tiny" in message


def test_trainable_weights_are_fp32_when_lerobot_loads_the_vlm_in_bf16(smoke_cfg, clients, stats, tmp_path):
    """A policy whose config has load_vlm_weights (as smolvla_base's has): lerobot loads its VLM in bf16.
    Every trainable parameter zk0 trains and sends is fp32, and an update far below a weight's bf16
    spacing survives an optimizer step."""
    import copy

    from zk0lib import data

    tiny = model.build_policy(smoke_cfg, clients[0].meta, stats)
    vlm = tmp_path / "vlm"  # the tiny VLM's config and tokenizer, with weights, as a Hub VLM folder has them
    model._tiny_vlm_folder(vlm)
    tiny.policy.model.vlm_with_expert.vlm.save_pretrained(vlm)
    tiny.policy.config.vlm_model_name, tiny.policy.config.load_vlm_weights = str(vlm), True
    model.save_policy(tiny, tmp_path / "policy")
    cfg = copy.deepcopy(smoke_cfg)
    cfg.model.pretrained = str(tmp_path / "policy")
    bundle = model.build_policy(cfg, clients[0].meta, stats)
    vlm_dtypes = {p.dtype for p in bundle.policy.model.vlm_with_expert.vlm.parameters()}
    assert torch.bfloat16 in vlm_dtypes  # lerobot's own loading: the frozen VLM stays bf16
    trainable = model.trainable_parameters(bundle.policy)
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable), [
        n for n, p in trainable if p.dtype != torch.float32
    ]
    name, weight = next((n, p) for n, p in trainable if "lm_expert" in n and p.dim() == 2)
    before = weight.detach().clone()
    spacing = float(before.abs().max().to(torch.bfloat16).float()) / 128  # bf16 spacing at the largest value
    optimizer = torch.optim.SGD([p for _, p in trainable], lr=1.0)
    optimizer.zero_grad()
    weight.grad = torch.full_like(weight, spacing / 1000)  # a step 1/1000 of the bf16 spacing
    optimizer.step()
    moved = (weight.detach() - before).abs().max()
    assert float(moved) == pytest.approx(spacing / 1000, rel=1e-2), name
    ds = data.open_dataset(clients[0], clients[0].train_episodes, bundle.config, None)
    batch = bundle.preprocessor(data.collate_or_skip([ds[0], ds[1]]))
    loss = bundle.policy.forward(batch)[0]
    assert torch.isfinite(loss)  # the mixed bf16 VLM / fp32 expert model runs


def test_every_process_builds_the_same_aux_head_and_it_travels(smoke_cfg, clients, stats):
    """train.aux_environment_state in a federation: the server and each client build the head from the same
    seed, so its weights start equal everywhere, and they are among the trainable weights that travel."""
    import copy

    import numpy as np

    from zk0lib import auxiliary

    cfg = copy.deepcopy(smoke_cfg)
    cfg.model.train_expert_only, cfg.train.aux_environment_state = False, 0.5
    with_env = {**stats, auxiliary.OBS_ENV_STATE: {"mean": np.zeros(6), "std": np.ones(6)}}
    a, b = (model.build_policy(cfg, clients[0].meta, with_env) for _ in range(2))
    wa, wb = model.get_trainable(a.policy), model.get_trainable(b.policy)
    heads = [k for k in wa if k.startswith(auxiliary.HEAD + ".")]
    assert heads and all(torch.equal(wa[k], wb[k]) for k in heads)
    plain = model.build_policy(smoke_cfg, clients[0].meta, stats)  # the head's seed leaves the rest as it was
    shared = [k for k in model.get_trainable(plain.policy) if k in wa]
    assert shared and all(torch.equal(wa[k], model.get_trainable(plain.policy)[k]) for k in shared[:5])
    with pytest.raises(ValueError, match="needs observation.environment_state in the datasets"):
        model.build_policy(cfg, clients[0].meta, stats)


def test_a_normalized_feature_without_stats_is_an_error_naming_it(smoke_cfg, clients, stats):
    """lerobot's normalizer would pass a feature without stats through raw; zk0 stops before round 1."""
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature

    features = {
        "observation.state": PolicyFeature(FeatureType.STATE, (6,)),
        "observation.images.front": PolicyFeature(FeatureType.VISUAL, (3, 48, 48)),
        "action": PolicyFeature(FeatureType.ACTION, (6,)),
    }
    norm = {
        "VISUAL": NormalizationMode.IDENTITY,
        "STATE": NormalizationMode.MEAN_STD,
        "ACTION": NormalizationMode.MIN_MAX,
    }
    model.check_stats_cover(features, norm, stats)  # images are not normalized: no stats needed
    without = {k: v for k, v in stats.items() if k != "observation.state"}
    with pytest.raises(ValueError, match=r"observation\.state \(STATE, MEAN_STD: no mean/std\)"):
        model.check_stats_cover(features, norm, without)
    no_max = {**stats, "action": {k: v for k, v in stats["action"].items() if k != "max"}}
    with pytest.raises(ValueError, match=r"action \(ACTION, MIN_MAX: no max\)"):
        model.check_stats_cover(features, norm, no_max)
    with pytest.raises(ValueError, match=r"observation\.state .*data\.rename_map"):
        model.build_policy(smoke_cfg, clients[0].meta, without)
