"""The tiny pretrained base: `zk0 base` end to end at tiny scale, and the base shipped in the repository."""

import json

import pytest

from zk0lib.base import BASE_RECORD, BaseSpec
from zk0lib.config import SHIPPED_BASE, ConfigError, load_config
from zk0lib.model import TINY_VLM_REPO, load_policy, parameter_counts
from zk0lib.sim.labs import CLIENT_LABS, LABS, community_labs, get_lab


def test_community_labs_are_seeded_and_distinct_from_the_clients():
    labs = community_labs(12, seed=0)
    assert [lab.digest() for lab in labs] == [lab.digest() for lab in community_labs(12, seed=0)]
    assert [lab.name for lab in labs] != [lab.name for lab in community_labs(12, seed=1)]
    client_tasks = {LABS[name].task for name in LABS}
    assert not client_tasks & {lab.task for lab in labs}
    assert len({(lab.camera_offset, lab.light) for lab in labs}) == 12
    # named in a config (the community preset): the same lab whatever count drew it
    assert get_lab("community-0-011") == labs[11] and get_lab("community-1-000") == community_labs(1, seed=1)[0]
    with pytest.raises(KeyError, match="community-<seed>-<index>"):
        get_lab("community-0")
    cfg = load_config("community")
    assert [c.lab for c in cfg.data.clients] == [lab.name for lab in community_labs(32, seed=0)]
    assert not set(CLIENT_LABS) & {c.lab for c in cfg.data.clients + cfg.data.eval_only}
    with pytest.raises(ConfigError, match=r"data.clients.0.lab: unknown lab 'community-0'"):
        load_config("demo", {"data.clients.0.lab": "community-0"})


def test_base_spec_refuses_bad_values():
    with pytest.raises(ConfigError, match="episodes_per_lab"):
        BaseSpec.from_overrides(["episodes_per_lab=0"])
    with pytest.raises(ConfigError, match="KEY one of"):
        BaseSpec.from_overrides(["no_such_key=1"])
    with pytest.raises(ConfigError, match="action_vision must be trained or frozen"):
        BaseSpec.from_overrides(["action_vision=both"])


def test_action_pretraining_on_the_frozen_grounded_vision_path(clients, stats, home):
    """action_vision=frozen: the vision encoder and connector stop training, the sets serve their cached
    embeddings, and a training step moves the VLM layers and the expert but not the vision path; with
    the default, the sets serve pixels and the vision path trains."""
    import torch

    from zk0lib import data, model, train
    from zk0lib.base import action_sets, experiment_config
    from zk0lib.cache import embedding_key

    spec = BaseSpec.from_overrides(["action_vision=frozen", "batch_size=4"])
    cfg = experiment_config(spec, home / "data_cache")
    bundle = model.build_policy(cfg, clients[0].meta, stats)
    sets = action_sets(spec, bundle, clients, home / "data_cache")
    vlm = bundle.policy.model.vlm_with_expert.get_vlm_model()
    vision = {
        n: p.detach().clone() for n, p in [*vlm.vision_model.named_parameters(), *vlm.connector.named_parameters()]
    }
    item = sets[0][0]
    assert embedding_key("observation.images.front") in item and "observation.images.front" not in item
    before = {n: p.detach().clone() for n, p in bundle.policy.named_parameters() if p.requires_grad}
    assert before and not any("vision_model" in n or "connector" in n for n in before)
    assert any(".text_model." in n for n in before) and any("lm_expert" in n for n in before)
    optimizer, scheduler = train.make_optimizer(bundle.policy, 2, 0)
    stream = data.BatchStream(torch.utils.data.ConcatDataset(sets), spec.batch_size, 0).batches(0)
    train.train_steps(bundle, stream, optimizer, scheduler, 2, cfg, label="test")
    after = dict(bundle.policy.named_parameters())
    moved = {n for n, p in before.items() if not torch.equal(p, after[n].detach())}
    assert any(".text_model." in n for n in moved) and any("lm_expert" in n for n in moved)
    for name, p in [*vlm.vision_model.named_parameters(), *vlm.connector.named_parameters()]:
        assert torch.equal(p.detach(), vision[name]), name

    trained = BaseSpec()
    bundle = model.build_policy(experiment_config(trained, home / "data_cache"), clients[0].meta, stats)
    (pixels, *_) = action_sets(trained, bundle, clients, home / "data_cache")
    assert "observation.images.front" in pixels[0]
    assert all(p.requires_grad for p in bundle.policy.model.vlm_with_expert.get_vlm_model().vision_model.parameters())


SETTINGS = [
    "labs=2", "episodes_per_lab=2", "image_size=64", "grounding_episodes=1", "grounding_frames=4",
    "grounding_steps=4", "action_steps=6", "chunk_steps=2", "batch_size=4", "num_workers=0", "aim_episodes=1",
]  # fmt: skip
BASE_ARGS = [x for s in SETTINGS for x in ("--set", s)]


@pytest.fixture(scope="module")
def short_base(zk0_cli, tmp_path_factory):
    """`zk0 base` at tiny scale in one go: its folder."""
    out = tmp_path_factory.mktemp("bases") / "base"
    result = zk0_cli("base", "--out", str(out), *BASE_ARGS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out


def test_short_pretraining_end_to_end(short_base):
    out = short_base
    record = json.loads((out / BASE_RECORD).read_text())
    assert record["spec"]["action_steps"] == 6 and record["grounding"]["steps"] == 4 and record["parts"] == 1
    assert record["data"]["episodes"] == 4 and record["data"]["train_episodes"] == 2
    assert [h["step"] for h in record["action"]["history"]][-1] == 6
    assert set(record["aim"]) == {"community (held-out positions)", "client labs (never seen)"}
    assert set(record["aim"]["client labs (never seen)"]["labs"]) == set(LABS)
    aim = record["aim"]["client labs (never seen)"]
    assert aim["expert_pan_spread_deg"] > 1.0  # five cube positions: the expert's pan differs between them
    bundle = load_policy(out)  # SmolVLAPolicy.from_pretrained underneath
    assert parameter_counts(bundle.policy)["total"] == record["parameters"]["total"]
    # pretrained as a whole: the VLM trained too (expert-only training would leave ~36% trainable)
    counts = record["parameters"]
    assert counts["trainable"] > 0.8 * counts["total"]


def test_a_base_made_in_parts_is_the_base_made_in_one(short_base, zk0_cli):
    """Parts of 2 action steps (the spec's chunk), each a fresh process: the first ends after grounding and
    a chunk, the next ones resume from the saved chunk; the finished base equals the one made in one go."""
    from safetensors.torch import load_file

    out = short_base.parent / "in-parts"
    first = zk0_cli("base", "--out", str(out), "--part-steps", "2", *BASE_ARGS)
    assert first.returncode == 3, first.stdout[-2000:] + first.stderr[-3000:]
    assert "step 2/6" in first.stdout and "run the same command again" in first.stdout
    assert not (out / BASE_RECORD).exists()  # nothing half-written where the base goes
    second = zk0_cli("base", "--out", str(out), "--part-steps", "2", *BASE_ARGS)
    assert second.returncode == 3 and "resuming part 2" in second.stdout and "after step 2/6" in second.stdout
    assert "grounding step" not in second.stdout  # grounding is not done again
    last = zk0_cli("base", "--out", str(out), *BASE_ARGS)
    assert last.returncode == 0, last.stdout[-2000:] + last.stderr[-3000:]
    assert "resuming part 3" in last.stdout and "after step 4/6" in last.stdout
    record, whole = (json.loads((p / BASE_RECORD).read_text()) for p in (out, short_base))
    assert record["parts"] == 3 and [h["step"] for h in record["action"]["history"]] == [2, 4, 6]
    assert [h["train_loss"] for h in record["action"]["history"]] == pytest.approx(
        [h["train_loss"] for h in whole["action"]["history"]], abs=1e-6
    )
    ours, theirs = load_file(out / "model.safetensors"), load_file(short_base / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-6
    fresh = zk0_cli("base", "--out", str(out), "--part-steps", "2", "--fresh", *BASE_ARGS)
    assert fresh.returncode == 3 and "resuming" not in fresh.stdout  # --fresh starts over


def test_shipped_base_matches_its_record():
    record = json.loads((SHIPPED_BASE / BASE_RECORD).read_text())
    spec = BaseSpec(**record["spec"])
    config = json.loads((SHIPPED_BASE / "config.json").read_text())
    assert config["vlm_model_name"] == TINY_VLM_REPO
    assert config["chunk_size"] == config["n_action_steps"] == spec.chunk_size
    assert config["num_steps"] == spec.num_denoise_steps
    labs = community_labs(spec.labs, spec.seed)
    assert [(lab.name, lab.digest()) for lab in labs] == [(x["name"], x["digest"]) for x in record["labs"]]
    assert not {lab.name for lab in labs} & set(CLIENT_LABS)
    bundle = load_policy(SHIPPED_BASE)
    assert parameter_counts(bundle.policy)["total"] == record["parameters"]["total"]


def test_demo_and_study_fine_tune_the_base_with_the_vlm_frozen(clients, stats):
    import torch
    from safetensors.torch import load_file

    from zk0lib.model import build_policy

    for preset in ("demo", "study"):
        cfg = load_config(preset)
        assert cfg.model.pretrained == "base" and cfg.model.freeze_vision_encoder and cfg.model.train_expert_only
    cfg = load_config("smoke", {"model.pretrained": "base"})
    bundle = build_policy(cfg, clients[0].meta, stats)
    trainable = {n for n, p in bundle.policy.named_parameters() if p.requires_grad}
    assert trainable and not any("vlm." in n and "lm_expert" not in n for n in trainable)
    saved = load_file(SHIPPED_BASE / "model.safetensors")
    params = dict(bundle.policy.named_parameters())
    assert set(params) <= set(saved), sorted(set(params) - set(saved))[:3]
    for name, param in params.items():  # every weight is the base's, none a fresh initialization
        assert torch.equal(param.detach().cpu(), saved[name]), name
