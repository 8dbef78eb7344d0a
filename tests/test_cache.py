"""Training caches: frames decoded once, tasks tokenized once, frozen image features computed once. The
cached paths give lerobot's items and batches, and the same loss, as decoding the videos does."""

import copy

import numpy as np
import pytest
import torch

from zk0lib import cache, data, model
from zk0lib.config import ConfigError, load_config


@pytest.fixture(scope="module")
def cached_cfg(smoke_cfg):
    cfg = copy.deepcopy(smoke_cfg)
    cfg.data.cache = "frames"
    return cfg


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_frame_cache_gives_lerobots_items_key_for_key(cached_cfg, clients, session_bundle, train_set):
    client = clients[0]
    cached = data.open_for(cached_cfg, client, client.train_episodes, session_bundle.config)
    assert isinstance(cached, cache.CachedItems) and len(cached) == len(train_set)
    for i in range(len(train_set)):  # every item: chunk padding at episode ends, timestamps, tasks, frames
        _same(train_set[i], cached[i])
    store = cached.store
    assert store.info["frames"] == client.meta.total_frames and not store.bad
    again = data.open_for(cached_cfg, client, client.heldout_episodes, session_bundle.config)
    assert again.store.root == store.root  # one store per dataset, whatever the episodes


def test_cached_batches_give_the_same_loss(cached_cfg, clients, fresh_bundle, train_set):
    client = clients[0]
    cached = data.open_for(cached_cfg, client, client.train_episodes, fresh_bundle.config)
    features_cfg = copy.deepcopy(cached_cfg)
    features_cfg.data.cache = "features"
    embedded = data.embedded_for(features_cfg, cached, fresh_bundle)
    assert isinstance(embedded, cache.EmbeddedItems)
    picks = [0, 3, len(train_set) - 1, len(train_set) // 2]
    policy = fresh_bundle.policy
    policy.train()
    noise = torch.randn(
        len(picks), policy.config.chunk_size, policy.config.max_action_dim, generator=torch.Generator().manual_seed(0)
    )
    time_ = torch.full((len(picks),), 0.4)
    losses = {}
    for name, ds in (("videos", train_set), ("frames", cached), ("features", embedded)):
        batch = fresh_bundle.preprocessor(data.collate_or_skip([ds[i] for i in picks]))
        losses[name] = policy.forward(batch, noise=noise, time=time_)[0].item()
    embedded_batch = data.collate_or_skip([embedded[i] for i in picks])
    assert not any(k.startswith("observation.images.") and not k.endswith("_is_pad") for k in embedded_batch)
    assert losses["frames"] == losses["videos"]  # the same pixels
    assert losses["features"] == pytest.approx(losses["videos"], rel=1e-5)  # the same embeddings, batched otherwise


def test_features_are_refused_while_the_vision_path_trains(cached_cfg, clients, stats):
    cfg = copy.deepcopy(cached_cfg)
    cfg.model.train_expert_only = False
    bundle = model.build_policy(cfg, clients[0].meta, stats)
    ds = data.open_for(cfg, clients[0], clients[0].train_episodes, bundle.config)
    with pytest.raises(
        ValueError, match="cannot be cached while the vision path trains.*data.cache=frames|frame cache"
    ):
        cache.with_image_features(ds, bundle, cfg.cache_dir)
    with pytest.raises(ConfigError, match="data.cache=features needs the vision path frozen"):
        load_config("smoke", {"data.cache": "features", "model.train_expert_only": False})
    with pytest.raises(ConfigError, match="data.cache must be one of none, frames, features"):
        load_config("smoke", {"data.cache": "pixels"})


def test_an_undecodable_episode_is_marked_and_its_items_skipped(corrupted_client, session_bundle, tmp_path):
    """A corrupt video does not stop the store's build: the episode is recorded as bad and reading one of
    its items fails the way decoding does, so training skips that batch and counts it."""
    client = corrupted_client
    every = list(range(client.meta.total_episodes))
    ds = data.open_dataset(client, every, session_bundle.config, None, tmp_path / "cache")
    assert ds.store.bad and len(ds.store.bad) < len(every), ds.store.bad  # the broken episode, not all
    bad = next(iter(ds.store.bad))
    where = np.flatnonzero(ds.columns["episode_index"].numpy() == bad)
    skipped = data.SkipUndecodable(ds)[int(where[0])]
    assert "could not be decoded when the frame cache was built" in skipped["__error__"]
    good = np.flatnonzero(ds.columns["episode_index"].numpy() != bad)
    assert "__error__" not in data.SkipUndecodable(ds)[int(good[0])]


def test_tasks_are_tokenized_once_with_the_batch_padding(clients, stats, smoke_cfg):
    """Two clients' tasks in one batch, and each alone: the remembered tokens are the tokenizer's own."""
    bundle = model.build_policy(smoke_cfg, clients[0].meta, stats)  # tokenize_tasks_once is on
    plain = model.build_policy(smoke_cfg, clients[0].meta, stats)
    for step in plain.preprocessor.steps:
        if hasattr(step, "_tokenize_text") and isinstance(step._tokenize_text, cache._RememberedTokens):
            step._tokenize_text = step._tokenize_text.tokenize
    sets = [data.open_dataset(c, c.train_episodes, bundle.config, None) for c in clients]
    tasks = {s[0]["task"] for s in sets}
    assert len(tasks) == 2
    items = [sets[0][0], sets[1][0], sets[0][1]]
    for batch_items in (items, items[:1], items[1:2]):
        a = bundle.preprocessor(data.collate_or_skip(batch_items))
        b = plain.preprocessor(data.collate_or_skip(batch_items))
        for key in ("observation.language.tokens", "observation.language.attention_mask"):
            assert torch.equal(a[key], b[key]), key


def test_the_vlm_layers_learn_to_read_cached_features_with_the_connector_frozen(cached_cfg, clients, stats):
    """model.freeze_connector with train_expert_only off: the VLM layers train, the vision path stays frozen,
    so the features cache serves it, and a step moves the VLM layers and leaves the connector as it was."""
    overrides = {"data.cache": "features", "model.train_expert_only": False, "model.freeze_connector": True}
    assert load_config("smoke", overrides).model.freeze_connector
    cfg = copy.deepcopy(cached_cfg)
    cfg.model.train_expert_only, cfg.model.freeze_connector, cfg.data.cache = False, True, "features"
    bundle = model.build_policy(cfg, clients[0].meta, stats)
    names = [n for n, _ in model.trainable_parameters(bundle.policy)]
    assert any(".text_model.layers.0." in n for n in names), names
    assert not any(".connector." in n or ".vision_model." in n for n in names)
    frames = data.open_for(cfg, clients[0], clients[0].train_episodes, bundle.config)
    embedded = data.embedded_for(cfg, frames, bundle)
    assert isinstance(embedded, cache.EmbeddedItems)
    policy = bundle.policy
    policy.train()
    vlm = policy.model.vlm_with_expert.get_vlm_model()
    layer = dict(vlm.text_model.named_parameters())["layers.0.self_attn.q_proj.weight"]
    before = {"layer": layer.detach().clone(), "connector": [q.detach().clone() for q in vlm.connector.parameters()]}
    optimizer = torch.optim.SGD([q for _, q in model.trainable_parameters(policy)], lr=0.1)
    batch = bundle.preprocessor(data.collate_or_skip([embedded[i] for i in range(4)]))
    policy.forward(batch)[0].backward()
    optimizer.step()
    assert not torch.equal(layer, before["layer"])
    assert all(torch.equal(q, b) for q, b in zip(vlm.connector.parameters(), before["connector"], strict=True))
