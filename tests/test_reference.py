"""The reference policy: an MLP told the cube's and target's positions, trained on a recorded lab's
LeRobot dataset and rolled out in closed loop (real simulator, real dataset, no rendering)."""

import json

import numpy as np
import pytest

from zk0lib.sim.record import record_lab
from zk0lib.sim.reference import ReferenceSpec, chunk_error, closed_loop, read_frames, train_reference


@pytest.fixture(scope="module")
def recording(home):
    return record_lab("lab-red", 12, home / "data_cache", image_size=32, seed=0)


@pytest.fixture(scope="module")
def frames(recording):
    return read_frames("zk0/lab-red", recording.root, list(range(10)), 12), read_frames(
        "zk0/lab-red", recording.root, [10, 11], 12
    )


def test_frames_carry_chunks_and_the_episode_start(frames):
    train, _ = frames
    assert train.chunks.shape[1:] == (12, 6) and train.state.shape[1] == 6 and train.environment.shape[1] == 6
    first = np.flatnonzero(np.any(train.start[1:] != train.start[:-1], axis=1)) + 1  # episode boundaries
    assert len(first) == 9  # 10 episodes
    np.testing.assert_array_equal(train.start[first], train.environment[first])  # the start is frame 0's
    np.testing.assert_array_equal(train.chunks[first - 1, -1], train.chunks[first - 1, 0])  # padded at the end
    assert train.inputs("start").shape[1] == 12 and train.inputs("none").shape[1] == 6


def test_reference_policy_places_the_cube_after_a_short_run(frames):
    train, held = frames
    policy, fit = train_reference(ReferenceSpec(head="mse", samples=256_000), train)
    assert fit["steps"] == 1000 and fit["final_loss"] < 0.1
    error = chunk_error(policy, held)
    assert len(error) == 6 and max(error[:5]) < 15.0  # degrees, played part of the chunk (expert moves ~40)
    loop = closed_loop(policy, ["lab-red"], 6, max_frames=300)
    pooled = loop["pooled"]
    assert pooled["episodes"] == 6 and sum(pooled["stage_counts"].values()) == 6
    assert pooled["successes"] > 0, pooled  # it picks and places from the positions alone


def test_flow_head_trains_and_samples_seeded_chunks(frames):
    train, held = frames
    policy, _ = train_reference(ReferenceSpec(head="flow", samples=8192, batch_size=64), train)
    assert chunk_error(policy, held, seed=1) == chunk_error(policy, held, seed=1)
    assert chunk_error(policy, held, seed=1) != chunk_error(policy, held, seed=2)


def test_bad_specs_and_datasets_without_environment_state_are_refused(tmp_path):
    from zk0lib import synth

    with pytest.raises(ValueError, match="head must be one of mse, flow"):
        ReferenceSpec(head="diffusion")
    with pytest.raises(ValueError, match="n_action_steps must be in 1..chunk=12"):
        ReferenceSpec(n_action_steps=20)
    root = synth.ensure_synthetic_dataset(synth.SyntheticSpec(0, 2, 20, 32, 0), "zk0/synth-a", tmp_path)
    with pytest.raises(ValueError, match="has no observation.environment_state"):
        read_frames("zk0/synth-a", root, [0], 12)


def test_calibration_table_of_a_lab_with_the_expert_and_hold_still(recording, tmp_path, capsys):
    from zk0lib.cli import main
    from zk0lib.config import ClientConfig, load_config
    from zk0lib.sim.reference import calibrate

    cfg = load_config("demo", {"data.sim_episodes": 12, "data.sim_image_size": 32, "data.heldout_episodes": 2})
    cfg.data.clients = [ClientConfig("lab-red", source="sim", lab="lab-red")]  # the fixture's recording
    spec = ReferenceSpec(head="mse", samples=64_000)
    record = calibrate(cfg, [spec], 2, tmp_path, max_frames=200, command="test", log=lambda line: None)
    assert [r["name"] for r in record["rows"]] == ["scripted expert", "hold still", f"reference {spec.label}"]
    expert, still, ref = record["rows"]
    assert record["labs"] == ["lab-red", "lab-unseen"]
    assert expert["closed_loop"]["pooled"]["successes"] == 2 and still["closed_loop"]["pooled"]["successes"] == 0
    assert (
        set(ref["closed_loop"]["labs"]) == {"lab-red", "lab-unseen"} and ref["closed_loop"]["pooled"]["episodes"] == 2
    )
    assert ref["train"]["steps"] == 250 and len(ref["chunk_error"]) == 6 and ref["heldout_frames"] > 0
    assert json.loads((tmp_path / "reference.json").read_text()) == json.loads(json.dumps(record))
    table = (tmp_path / "reference.md").read_text()
    assert table.count("\n") == 5 and "| scripted expert | 2/2 [" in table and "64,000" in table

    assert main(["sim", "reference", "--preset", "smoke", "--out", str(tmp_path / "no")]) == 2
    assert "simulated labs only" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert main(["sim", "reference", "--heads", "diffusion", "--out", str(tmp_path / "no")]) == 2
    assert "head must be one of mse, flow" in capsys.readouterr().err


def _aux_steps(policy, batch, optimizer, steps: int) -> list[float]:
    """`steps` optimizer steps on the auxiliary loss alone; its value at each."""
    from zk0lib import auxiliary

    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        policy.forward(batch)
        aux = auxiliary.aux_loss(policy, batch)
        aux.backward()
        optimizer.step()
        losses.append(float(aux.detach()))
    return losses


def test_the_aux_head_trains_the_vlm_layers_to_locate_the_cube_and_is_not_saved(recording, tmp_path):
    """train.aux_environment_state (rung 2): a head on the VLM's prefix output predicts the recording's
    environment state; its loss reaches the trainable VLM layers (not the frozen connector), a few steps
    lower it, the flow-matching step carries it, and saved policies leave the head out."""
    import torch
    from safetensors import safe_open

    from zk0lib import auxiliary, data, model, train
    from zk0lib.config import ClientConfig, ConfigError, load_config

    overrides = {"data.sim_episodes": 12, "data.sim_image_size": 32, "data.heldout_episodes": 2}
    with pytest.raises(ConfigError, match="set model.train_expert_only=false"):
        load_config("demo", {**overrides, "train.aux_environment_state": 1.0})
    cfg = load_config(
        "demo",
        {
            **overrides,
            "model.train_expert_only": False,
            "model.freeze_connector": True,
            "data.cache": "features",
            "train.aux_environment_state": 1.0,
        },
    )
    cfg.data.clients = [ClientConfig("lab-red", source="sim", lab="lab-red")]  # the fixture's recording
    client = data.open_client(cfg, 0)
    stats = data.pooled_train_stats([client])
    bundle = model.build_policy(cfg, client.meta, stats)
    policy, head = bundle.policy, auxiliary.head_of(bundle.policy)
    names = [n for n, _ in model.trainable_parameters(policy)]
    assert head is not None and any(n.startswith("zk0_aux_head.") for n in names)
    frames = data.open_for(cfg, client, client.train_episodes, bundle.config)
    embedded = data.embedded_for(cfg, frames, bundle)
    batch = bundle.preprocessor(data.collate_or_skip([embedded[i] for i in range(0, 160, 10)]))
    policy.train()
    params = [p for _, p in model.trainable_parameters(policy)]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    policy.forward(batch)
    aux = auxiliary.aux_loss(policy, batch)
    with torch.no_grad():
        predicted = head(head.captured["prefix"], head.captured["mask"])
    target = batch[auxiliary.OBS_ENV_STATE].reshape(16, -1)  # one position vector per item, not broadcast
    assert predicted.shape == target.shape == (16, 6)
    expected = ((predicted - (target - head.mean) / head.std) ** 2).mean()
    assert float(aux.detach()) == pytest.approx(float(expected), rel=1e-5)
    aux.backward()  # the auxiliary loss alone
    vlm = policy.model.vlm_with_expert.get_vlm_model()
    layer = dict(vlm.text_model.named_parameters())["layers.0.self_attn.q_proj.weight"]
    assert layer.grad is not None and float(layer.grad.abs().sum()) > 0  # it reaches the VLM layers
    assert all(q.grad is None for q in vlm.connector.parameters())  # and not the frozen vision path
    losses = _aux_steps(policy, batch, optimizer, 25)
    assert losses[-1] < 0.75 * losses[0], losses  # it learns (32-pixel frames here, 25 steps)
    optimizer.zero_grad()
    loss, _ = train.fedprox_backward(policy, batch, [p.detach().clone() for p in params], 0.0)
    assert torch.isfinite(loss) and head.last > 0 and head.query.grad is not None  # the step adds the head's loss
    model.save_policy(bundle, tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("zk0_aux_head") for k in f.keys())
    assert auxiliary.head_of(bundle.policy) is head  # still training after the save
    model.load_policy(tmp_path / "saved")


@pytest.mark.parametrize("kind", ["tokens", "pixels"])
def test_the_state_estimator_reads_the_cameras_fills_the_state_and_is_saved(recording, tmp_path, kind):
    """model.estimate_environment_state (rung 2): a keypoint readout of the camera tokens (or of the frames,
    through its own CNN, which the cached-feature items then keep) estimates the cube and target positions;
    the estimate (detached) replaces the state token's environment slots, only its own loss trains it, a few
    steps lower that loss, and a saved policy reloads with the same estimator and acts from the cameras."""
    import torch

    from zk0lib import auxiliary, data, model, train
    from zk0lib.config import ClientConfig, ConfigError, load_config

    overrides = {"data.sim_episodes": 12, "data.sim_image_size": 32, "data.heldout_episodes": 2}
    with pytest.raises(ConfigError, match="train.aux_environment_state: set it > 0"):
        load_config("demo", {**overrides, "model.estimate_environment_state": kind})
    with pytest.raises(ConfigError, match="one of none, tokens, pixels"):
        load_config("demo", {**overrides, "model.estimate_environment_state": "true", "train.aux_environment_state": 1})
    with pytest.raises(ConfigError, match="choose one"):
        load_config(
            "demo",
            {
                **overrides,
                "model.estimate_environment_state": kind,
                "model.environment_state": True,
                "train.aux_environment_state": 1.0,
            },
        )
    cfg = load_config(
        "demo",
        {
            **overrides,
            "model.estimate_environment_state": kind,
            "data.cache": "features",
            "train.aux_environment_state": 1.0,
        },
    )  # the expert alone trains, beside the estimator
    cfg.data.clients = [ClientConfig("lab-red", source="sim", lab="lab-red")]  # the fixture's recording
    client = data.open_client(cfg, 0)
    stats = data.pooled_train_stats([client])
    bundle = model.build_policy(cfg, client.meta, stats)
    policy, head = bundle.policy, auxiliary.head_of(bundle.policy)
    assert head.kind == kind and head.state_size == 6
    assert any(n.startswith("zk0_aux_head.mlp") for n, _ in model.trainable_parameters(policy))
    frames = data.open_for(cfg, client, client.train_episodes, bundle.config)
    embedded = data.embedded_for(cfg, frames, bundle)
    items = [embedded[i] for i in range(0, 160, 10)]
    assert ("observation.images.front" in items[0]) == (kind == "pixels")  # frames beside their embeddings
    batch = bundle.preprocessor(data.collate_or_skip(items))
    policy.train()

    # the estimate fills the state token: another estimate, another last prefix token, the rest unchanged
    inner = policy.model
    images, img_masks = policy.prepare_images(batch)
    assert images[0].dim() == 3  # the cached embeddings

    def keep_frames() -> None:  # as policy.forward keeps them for a pixel estimator
        if kind == "pixels":
            head.captured["pixels"] = type(policy).prepare_images(policy, batch)[0]

    keep_frames()
    args = (images, img_masks, batch["observation.language.tokens"], batch["observation.language.attention_mask"])
    state = policy.prepare_state(batch)
    with torch.no_grad():
        before = inner.embed_prefix(*args, state=state)[0]
        head.mlp[-1].bias += 1.0
        keep_frames()
        after = inner.embed_prefix(*args, state=state)[0]
        head.mlp[-1].bias -= 1.0
    assert head.captured["estimate"].shape == (16, 6)
    assert torch.equal(before[:, :-1], after[:, :-1]) and not torch.allclose(before[:, -1], after[:, -1])

    # train.teacher_forcing: the chosen samples' state token carries the recorded positions, not the estimate
    with pytest.raises(ConfigError, match="train.teacher_forcing must be in"):
        load_config("demo", {**overrides, "train.teacher_forcing": 1.5})
    with pytest.raises(ConfigError, match="needs model.estimate_environment_state"):
        load_config("demo", {**overrides, "train.teacher_forcing": 1.0})
    truth, chosen = head.recorded(batch)
    recorded = batch[auxiliary.OBS_ENV_STATE].reshape(16, -1)
    assert torch.allclose(truth * head.std + head.mean, recorded, atol=1e-5)
    told = state.clone()
    told[:, 6:12] = truth
    with torch.no_grad():
        answer = inner.state_proj(told)  # the state token, as if the estimate were exactly right
    for fraction in (1.0, 0.5):
        head.teacher_forcing = fraction
        torch.manual_seed(0)
        truth, chosen = head.recorded(batch)
        assert int(chosen.sum()) == 16 if fraction == 1 else 0 < int(chosen.sum()) < 16  # (seeded: 16 items)
        with torch.no_grad():
            keep_frames()
            head.captured["truth"] = (truth, chosen)
            forced = inner.embed_prefix(*args, state=state)[0][:, -1]
        assert torch.allclose(forced[chosen], answer[chosen], atol=1e-5)
        assert torch.allclose(forced[~chosen], before[~chosen, -1], atol=1e-5)
    calls = []
    recorded_of = head.recorded
    head.recorded = lambda b: calls.append(policy.training) or recorded_of(b)
    policy.forward(batch)  # training: the forward hands the recorded positions on
    policy.eval()
    with torch.no_grad():
        policy.forward(batch)  # evaluation reads the estimate alone
    policy.train()
    assert calls == [True] and "truth" not in head.captured
    del head.recorded
    head.teacher_forcing = 0.0
    policy.zero_grad()

    loss, _ = policy.forward(batch)
    loss.backward()  # the flow-matching loss alone does not train the estimator (its estimate is detached)
    assert all(p.grad is None for p in head.parameters())
    assert inner.state_proj.weight.grad is not None
    policy.zero_grad()
    params = [p for _, p in model.trainable_parameters(policy)]
    optimizer = torch.optim.AdamW(list(head.parameters()), lr=3e-3)
    losses = _aux_steps(policy, batch, optimizer, 30)
    assert losses[-1] < 0.5 * losses[0], losses  # it learns (32-pixel frames here, 30 steps)
    policy.zero_grad()
    loss, _ = train.fedprox_backward(policy, batch, [p.detach().clone() for p in params], 0.0)
    assert torch.isfinite(loss) and head.last > 0 and head.mlp[0].weight.grad is not None

    model.save_policy(bundle, tmp_path / "saved")
    assert (tmp_path / "saved" / f"{auxiliary.ESTIMATOR_FILE}.safetensors").exists()
    loaded = model.load_policy(tmp_path / "saved")
    twin = auxiliary.head_of(loaded.policy)
    assert type(twin) is type(head) and twin.kind == kind
    other = "pixels" if kind == "tokens" else "tokens"  # going on from it as the other kind is refused
    with pytest.raises(ValueError, match=f"holds a '{kind}' estimator"):
        auxiliary.load_estimator(loaded.policy, tmp_path / "saved", kind=other)
    head.eval()
    if kind == "tokens":
        tokens = torch.randn(3, head.shape["cameras"] * head.shape["tokens"], head.shape["width"])
        with torch.no_grad():
            assert torch.allclose(head(tokens), twin(tokens))
    else:
        frames_in = [torch.rand(3, 3, 128, 128) * 2 - 1 for _ in range(head.shape["cameras"])]
        with torch.no_grad():
            assert torch.allclose(head(frames_in), twin(frames_in))
    pixels = loaded.preprocessor(data.collate_or_skip([frames[i] for i in (0, 50)]))
    loaded.policy.reset()
    with torch.no_grad():
        action = loaded.policy.select_action(pixels)  # from the cameras, through the reloaded estimator
    assert action.shape[0] == 2 and twin.captured["estimate"].shape == (2, 6)
    if kind == "pixels":  # `zk0 sim aim` reports how far the estimate is from the lab's true positions
        from zk0lib.sim.labs import get_lab
        from zk0lib.sim.rollout import aim_error

        aim = aim_error(loaded, [get_lab("lab-red")], 2, image_size=32)
        red = aim["labs"]["lab-red"]
        assert 0 < red["cube_error_cm"] < 100 and 0 < red["cube_error_if_mean_cm"] < 100
        assert aim["cube_error_cm"] == red["cube_error_cm"] and aim["target_error_cm"] > 0


def test_a_pretrained_estimator_is_shipped_in_a_base_and_kept_fixed(recording, home, tmp_path):
    """`zk0 estimator`: a pixel estimator trained on community labs' frames is written into a copy of the base
    folder with its record; model.pretrained=<that folder> loads it, and model.freeze_estimator keeps it out of
    the trainable (and so of the travelling) weights: a training step moves the expert, not the estimator."""
    import torch
    from safetensors.torch import load_file

    from zk0lib import auxiliary, data, model, train
    from zk0lib.config import SHIPPED_BASE, ClientConfig, ConfigError, load_config
    from zk0lib.estimator import (
        ESTIMATOR_RECORD,
        EstimatorSpec,
        colour_roles,
        evaluate_estimator,
        pretrain_estimator,
        task_vectors,
    )
    from zk0lib.sim.labs import community_labs, get_lab

    with pytest.raises(ConfigError, match="steps must be > 0"):
        EstimatorSpec.from_overrides(["steps=0"])
    with pytest.raises(ConfigError, match="heldout_labs must be fewer than labs"):
        EstimatorSpec.from_overrides(["labs=2", "heldout_labs=2"])
    with pytest.raises(ConfigError, match="--set width: unknown"):
        EstimatorSpec.from_overrides(["width=3"])
    spec = EstimatorSpec(
        labs=2,
        episodes_per_lab=2,
        heldout_labs=1,
        image_size=32,
        steps=6,
        batch_size=8,
        warmup_steps=2,
        reads_task=True,
    )
    out = tmp_path / "base-est"
    record = pretrain_estimator(spec, SHIPPED_BASE, out, home / "data_cache", log=lambda _: None)
    assert record["labs"] == ["community-0-000"] and record["heldout_labs"] == ["community-0-001"]
    lab = community_labs(2, 0)[0]  # the colours' roles in the labs it trained on
    assert record["colour_roles"] == colour_roles([(lab.cube_colour, lab.target_colour)])
    assert record["colour_roles"][lab.cube_colour] == {"cube": 1, "target": 0}
    assert set(record["errors"]["heldout_episodes"]) == {"community-0-000"}
    for where in ("heldout_episodes", "heldout_labs"):
        assert 0 < record["summary"][where]["cube_error_cm"] < 100
    assert np.isfinite(record["losses"]["last_100"]) and (out / ESTIMATOR_RECORD).exists()
    assert (out / "model.safetensors").read_bytes() == (SHIPPED_BASE / "model.safetensors").read_bytes()
    saved = load_file(out / f"{auxiliary.ESTIMATOR_FILE}.safetensors")

    overrides = {
        "data.sim_episodes": 12,
        "data.sim_image_size": 32,
        "data.heldout_episodes": 2,
        "model.estimate_environment_state": "pixels",
        "train.aux_environment_state": 1.0,
        "train.teacher_forcing": 1.0,
    }
    with pytest.raises(ConfigError, match="model.freeze_estimator keeps a pretrained"):
        load_config("demo", {"model.freeze_estimator": True})
    with pytest.raises(ConfigError, match="model.estimator_reads_task: the pixel estimator"):
        load_config("demo", {"model.estimator_reads_task": True})
    cfg = load_config("demo", {**overrides, "model.freeze_estimator": True})  # the shipped base has no estimator
    cfg.data.clients = [ClientConfig("lab-red", source="sim", lab="lab-red")]  # the fixture's recording
    client = data.open_client(cfg, 0)
    stats = data.pooled_train_stats([client])
    with pytest.raises(ValueError, match="has none: make one"):
        model.build_policy(cfg, client.meta, stats)
    cfg.model.pretrained = str(out)
    bundle = model.build_policy(cfg, client.meta, stats)
    policy, head = bundle.policy, auxiliary.head_of(bundle.policy)
    assert head.kind == "pixels" and all(torch.equal(v, saved[k]) for k, v in head.state_dict().items())
    names = [n for n, _ in model.trainable_parameters(policy)]
    assert names and not any(n.startswith(auxiliary.HEAD) for n in names)
    frames = data.open_for(cfg, client, client.train_episodes, bundle.config)
    batch = bundle.preprocessor(data.collate_or_skip([frames[i] for i in range(0, 80, 10)]))
    params = [p for _, p in model.trainable_parameters(policy)]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    policy.train()
    loss, _ = train.fedprox_backward(policy, batch, before, 0.01)
    optimizer.step()
    assert torch.isfinite(loss) and head.last > 0  # its loss is still measured
    assert head.frozen
    assert all(torch.equal(v, saved[k]) for k, v in head.state_dict().items())
    assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))

    # it reads the instruction: the policy's estimate is the estimator's on the frames and the task's mean token
    # embedding, computed in the policy from the batch's task tokens as pretraining computed it from the task
    assert head.shape["task_width"] == policy.model.vlm_with_expert.config.text_config.hidden_size
    policy.eval()
    with torch.no_grad():
        policy.forward(batch)
        pixels = type(policy).prepare_images(policy, batch)[0]
        task = task_vectors(out, [get_lab("lab-red").task]).expand(len(pixels[0]), -1)
        assert torch.allclose(head.captured["estimate"], head(pixels, task), atol=1e-5)
        assert not torch.allclose(head(pixels, task), head(pixels, task_vectors(out, ["pick up the blue cube"])))
    assert head.film.weight.abs().sum() > 0  # pretraining moved it from its zero start

    cfg.data.eval_only = []  # `zk0 estimator --evaluate`: the saved estimator on the config's recordings
    red = evaluate_estimator(out, cfg)["lab-red"]
    assert red["role"] == "client" and red["first_frames"]["frames"] == 12  # one first frame per episode
    assert (red["cube_colour"], red["target_colour"]) == ("red", "green")
    assert red["first_frames"]["cube_estimate_to_target_cm"] > 0
    assert 0 < red["all_frames"]["cube_error_cm"] < 100 and red["all_frames"]["frames"] > 12


def test_estimate_errors_tell_a_swap_of_cube_and_target_from_a_miss():
    """`zk0 estimator --evaluate`'s diagnostic: an estimate that puts the cube where the target is shows as 0 cm from
    the target and the cube-target distance off; an exact estimate is 0 cm off and that distance from the target."""
    import torch

    from zk0lib.sim.rollout import _estimate_errors

    truths = np.array([[0.20, 0.00, 0.02, 0.20, 0.06, 0.0], [0.25, -0.05, 0.02, 0.17, -0.05, 0.0]], np.float32)
    swapped = truths[:, [3, 4, 5, 0, 1, 2]]
    apart = 100 * np.linalg.norm(truths[:, :2] - truths[:, 3:5], axis=1).mean()  # 7 cm
    mean = torch.zeros(6)
    e = _estimate_errors(swapped, truths, mean)
    assert e["cube_estimate_to_target_cm"] == pytest.approx(0, abs=1e-5)
    assert e["cube_error_cm"] == pytest.approx(apart, rel=1e-5) and e["target_error_cm"] == pytest.approx(
        apart, rel=1e-5
    )
    e = _estimate_errors(truths, truths, mean)
    assert e["cube_error_cm"] == 0 and e["cube_estimate_to_target_cm"] == pytest.approx(apart, rel=1e-5)
