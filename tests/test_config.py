import json

import pytest

from zk0lib.config import PRESETS, ConfigError, ExperimentConfig, flat_items, load_config, parse_overrides


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    assert ExperimentConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_hub_preset_is_the_real_experiment():
    cfg = load_config("zk0-hub")
    assert [c.repo_id for c in cfg.data.clients] == [
        "lerobot/svla_so100_pickplace",
        "lerobot/svla_so100_stacking",
        "lerobot/svla_so100_sorting",
        "lerobot/svla_so101_pickplace",
    ]
    assert cfg.model.pretrained == "lerobot/smolvla_base"
    assert (cfg.fl.strategy, cfg.fl.proximal_mu, cfg.train.lr, cfg.train.batch_size) == ("fedprox", 0.01, 1e-4, 64)
    assert cfg.model.device == "cuda"


@pytest.mark.parametrize(
    "overrides",
    [
        "fl.num_rounds=7 train.lr=3e-4 eval.max_frames=none",
        ["fl.num_rounds=7", "train.lr=3e-4", "eval.max_frames=none"],
        {"fl.num_rounds": 7, "train.lr": 3e-4, "eval.max_frames": None},
    ],
)
def test_overrides_in_every_form(overrides):
    cfg = load_config("smoke", overrides)
    assert (cfg.fl.num_rounds, cfg.train.lr, cfg.eval.max_frames) == (7, 3e-4, None)


def test_nested_and_json_overrides():
    cfg = load_config(
        "smoke", {"data.clients.1.heldout_episodes": "1", "data.rename_map": '{"observation.images.top": "x"}'}
    )
    assert cfg.data.clients[1].heldout_episodes == 1
    assert cfg.data.rename_map == {"observation.images.top": "x"}
    assert flat_items(cfg)["fl.num_rounds"] == cfg.fl.num_rounds


@pytest.mark.parametrize(
    "override, message",
    [
        ("fl.proximal_mu=-0.1", "fl.proximal_mu must be >= 0"),
        ("fl.num_rounds=0", "fl.num_rounds must be >= 1"),
        ("fl.strategy=fedbogus", "unknown strategy 'fedbogus'"),
        ("fl.fraction_train=1.5", "fl.fraction_train must be in [0, 1]"),
        ("fl.fraction_evaluate=-0.5", "fl.fraction_evaluate must be in [0, 1]"),
        ("fl.fraction_train=0", "no client would train"),
        ("fl.min_train_clients=3", "fl.min_train_clients must be in [0, 2]"),
        ("fl.transport_dtype=float16", "fl.transport_dtype"),
        (
            "data.heldout_episodes=5",
            "held-out (5) and validation (1) episodes must be fewer than data.synthetic_episodes (6)",
        ),
        ("data.clients.0.episodes=3", "held-out (2) and validation (1) episodes must be fewer than episodes used (3)"),
        ("data.clients.0.source=ftp", "unknown source 'ftp'"),
        ("data.clients.0.source=local", "a local dataset needs its folder"),
        ("data.clients.0.source=hub data.clients.0.repo_id=pickplace", "a Hub dataset id"),
        ("train.local_steps=0", "train.local_steps must be >= 1"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("train.lr=0", "train.lr must be > 0"),
        ("train.max_skipped_fraction=1", "train.max_skipped_fraction must be in [0, 1)"),
        ("model.device=tpu", "model.device"),
        ("model.n_action_steps=11", "model.n_action_steps must be in [1, chunk_size=10]"),
        ("eval.every=0", "eval.every must be >= 1"),
        ("eval.where=moon", "eval.where"),
        ("output.run_id=a/b", "output.run_id"),
    ],
)
def test_each_bad_value_names_its_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", override)
    assert message in str(err.value)


def test_missing_local_dataset_root(tmp_path):
    with pytest.raises(ConfigError, match="no LeRobot dataset at"):
        load_config("smoke", {"data.clients.0.source": "local", "data.clients.0.root": str(tmp_path / "nope")})


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", "fl.num_rounds=0 fl.proximal_mu=-1")
    assert "fl.num_rounds" in str(err.value) and "fl.proximal_mu" in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("fl.nope=1", "unknown config key 'fl.nope'"),
        ("nope.x=1", "no section 'nope'"),
        ("fl.num_rounds=three", "expected an integer"),
        ("fl.num_rounds=2.5", "expected an integer"),
        ("train.amp=maybe", "expected true/false"),
        ("data.clients.9.name=x", "index '9'"),
        ("fl.num_rounds", "is not key=value"),
        ("preset=demo", "choose the preset with --preset"),
    ],
)
def test_bad_override_syntax(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", override)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")


def test_parse_overrides_keeps_equals_in_values():
    assert parse_overrides('data.rename_map={"a":"b=c"}') == {"data.rename_map": '{"a":"b=c"}'}


def test_validation_episodes_split_apart_from_the_held_out_ones():
    from zk0lib.data import split_episodes

    cfg = load_config("demo")
    client = cfg.data.clients[0]
    train, val, held = split_episodes(cfg, client, 20)
    assert len(held) == cfg.data.heldout_episodes and len(val) == cfg.data.val_episodes == 1
    assert sorted(train + val + held) == list(range(20)) and not set(val) & set(held)
    cfg.data.val_episodes = 4
    train4, val4, held4 = split_episodes(cfg, client, 20)
    assert held4 == held and len(val4) == 4 and not set(val4) & set(train4)  # the test episodes do not move
    cfg.data.val_episodes = 17
    with pytest.raises(ValueError, match="lower data.heldout_episodes or data.val_episodes"):
        split_episodes(cfg, client, 20)
    with pytest.raises(ConfigError, match=r"validation \(17\) episodes must be fewer than data.sim_episodes"):
        load_config("demo", {"data.val_episodes": 17})
