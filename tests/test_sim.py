"""Simulated SO-101 labs: expert, recording to LeRobot datasets, open-loop replay, closed-loop rollouts."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from zk0lib.config import ConfigError, load_config
from zk0lib.sim.labs import CLIENT_LABS, LABS, UNSEEN_LAB
from zk0lib.sim.record import RECORD_INFO, check_expert, record_lab, replay_success
from zk0lib.sim.reference import inference_variants
from zk0lib.sim.rollout import HoldStillPolicy, ScriptedExpertPolicy, rollout, wilson_interval

IMAGE = 64


@pytest.fixture(scope="module")
def cache(home):
    return home / "data_cache"


@pytest.fixture(scope="module")
def recording(cache):
    return record_lab("lab-blue", 3, cache, image_size=IMAGE, seed=0, workers=2)


def test_labs_differ_like_owners_setups():
    assert set(CLIENT_LABS) | {UNSEEN_LAB} == set(LABS)
    tasks = {LABS[name].task for name in LABS}
    assert len(tasks) == len(LABS)
    assert LABS["lab-red"].task == "pick up the red cube and place it on the green target"
    assert len({LABS[n].digest() for n in LABS}) == len(LABS)


@pytest.mark.parametrize("lab", sorted(LABS))
def test_expert_and_replay_succeed_in_every_lab(lab, cache):
    result = check_expert(lab, 4, seed=0, cache_dir=cache)
    assert sum(result["expert"]) >= 0.95 * 4
    assert sum(result["replay"]) >= 0.95 * 4


def test_recorded_lab_is_a_lerobot_dataset(recording, cache):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    assert recording.episodes == 3 and recording.attempts >= 3
    ds = LeRobotDataset("zk0/lab-blue", root=recording.root)
    assert ds.meta.fps == 30 and ds.meta.total_episodes == 3 and ds.meta.robot_type == "so101_follower"
    assert ds.meta.features["observation.state"]["names"][0] == "shoulder_pan.pos"
    item = ds[0]
    assert tuple(item["observation.state"].shape) == (6,) and tuple(item["action"].shape) == (6,)
    for cam in ("front", "wrist"):
        assert ds.meta.features[f"observation.images.{cam}"]["dtype"] == "video"
        assert tuple(item[f"observation.images.{cam}"].shape) == (3, IMAGE, IMAGE)
    assert item["task"] == LABS["lab-blue"].task
    info = json.loads((recording.root / RECORD_INFO).read_text())
    assert len(info["episode_seeds"]) == 3


def test_recording_holds_the_environment_state_the_simulator_knew(recording, cache):
    """observation.environment_state: the cube where the scene put it at each frame, the target fixed;
    read back it is what the lab's seeded reset draws, and the cube ends on the target."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from zk0lib.sim.env import ENVIRONMENT_NAMES, LabEnv

    ds = LeRobotDataset("zk0/lab-blue", root=recording.root)
    assert ds.meta.features["observation.environment_state"]["names"] == ENVIRONMENT_NAMES
    table = ds.hf_dataset.with_format("numpy")
    env_state = np.asarray(table["observation.environment_state"])
    episode = np.asarray(table["episode_index"])
    info = json.loads((recording.root / RECORD_INFO).read_text())
    env = LabEnv(LABS["lab-blue"], IMAGE, cache)
    try:
        for ep, seed in enumerate(info["episode_seeds"]):
            rows = env_state[episode == ep]
            env.reset(seed=seed)
            np.testing.assert_allclose(rows[0], env.environment_state(), atol=1e-5)
            (cx0, cy0), (cx1, cy1) = rows[0, :2], rows[-1, :2]
            region = np.asarray(LABS["lab-blue"].cube_region)
            assert np.all(region[0] <= (cx0, cy0)) and np.all((cx0, cy0) <= region[1])
            assert np.ptp(rows[:, 3:], axis=0).max() == 0  # the target does not move
            assert np.hypot(cx1 - cx0, cy1 - cy0) > 0.05  # the cube was carried ...
            assert np.hypot(cx1 - rows[-1, 3], cy1 - rows[-1, 4]) < 0.03  # ... onto the target
    finally:
        env.close()


def test_tiny_smolvla_leaves_the_environment_state_out(recording, smoke_cfg, stats):
    """Camera policies do not read privileged state: it is not among the tiny SmolVLA's input features."""
    from zk0lib import model
    from zk0lib.data import load_metadata

    meta = load_metadata("zk0/lab-blue", recording.root)
    bundle = model.build_policy(smoke_cfg, meta, {**stats, **{k: v for k, v in meta.stats.items() if k not in stats}})
    assert "observation.environment_state" not in bundle.policy.config.input_features
    assert "observation.state" in bundle.policy.config.input_features


def test_smolvla_told_the_answer_reads_the_environment_state_through_its_state(
    recording, cache, smoke_cfg, stats, tmp_path
):
    """model.environment_state (ladder rung 1): the cube's and target's positions, normalized with the
    federation's stats, follow the joints in the state SmolVLA reads, in training batches and in the
    rollout's observations; the saved policy reloads with the step; datasets without it are refused."""
    import dataclasses

    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from zk0lib import data, model
    from zk0lib.data import load_metadata

    meta = load_metadata("zk0/lab-blue", recording.root)
    all_stats = {**stats, **{k: v for k, v in meta.stats.items() if k not in stats}}
    cfg = dataclasses.replace(smoke_cfg, model=dataclasses.replace(smoke_cfg.model, environment_state=True))
    bundle = model.build_policy(cfg, meta, all_stats)
    assert "observation.environment_state" in bundle.policy.config.input_features

    chunk = {"action": [i / meta.fps for i in range(cfg.model.chunk_size)]}
    item = LeRobotDataset("zk0/lab-blue", root=recording.root, delta_timestamps=chunk)[5]
    batch = bundle.preprocessor(torch.utils.data.default_collate([item]))
    env_stats = all_stats["observation.environment_state"]
    expected = (item["observation.environment_state"] - torch.as_tensor(env_stats["mean"])) / (
        torch.as_tensor(env_stats["std"]) + 1e-8
    )
    assert batch["observation.state"].shape == (1, 12)
    torch.testing.assert_close(batch["observation.state"][0, 6:], expected.float(), atol=1e-4, rtol=1e-4)
    plain = model.build_policy(smoke_cfg, meta, all_stats).preprocessor(torch.utils.data.default_collate([item]))
    torch.testing.assert_close(batch["observation.state"][:, :6], plain["observation.state"])
    loss, _ = bundle.policy.forward(batch)
    assert torch.isfinite(loss)

    model.save_policy(bundle, tmp_path / "told")
    again = model.load_policy(tmp_path / "told")
    obs = {
        "observation.state": item["observation.state"][None],
        "observation.environment_state": item["observation.environment_state"][None],
        **{k: v[None] for k, v in item.items() if k.startswith("observation.images.") and not k.endswith("_is_pad")},
        "task": [item["task"]],
    }
    action = again.postprocessor(again.policy.select_action(again.preprocessor(obs)))
    assert action.shape == (1, 6) and torch.isfinite(action).all()
    with pytest.raises(ValueError, match="observation.environment_state"):
        again.preprocessor({k: v for k, v in obs.items() if k != "observation.environment_state"})
    r = rollout(again.policy, (again.preprocessor, again.postprocessor), "lab-blue", 1, 0, IMAGE, cache, 15)
    assert r["summary"]["episodes"] == 1  # the rollout's observations carry what the step needs

    # zk0 sim variants: the saved policy under other inference settings, on the runs' rollout seeds
    lab = json.dumps([{"name": "lab-blue", "source": "sim", "lab": "lab-blue"}])
    demo = load_config(
        "demo",
        [
            f"data.clients={lab}",
            f"output.data_cache={cache}",
            f"data.sim_image_size={IMAGE}",
            "eval.rollout_max_frames=15",
        ],
    )
    chunk = again.policy.config.chunk_size
    variants = [{}, {"n_action_steps": 1, "denoise_steps": 2}]
    record = inference_variants(demo, tmp_path / "told", variants, 1, tmp_path / "variants", log=lambda _: None)
    saved, played = record["rows"]
    assert record["labs"] == ["lab-blue", "lab-unseen"] and saved["closed_loop"]["pooled"]["episodes"] == 1
    assert (saved["n_action_steps"], saved["denoise_steps"]) == (cfg.model.n_action_steps, cfg.model.num_denoise_steps)
    assert (played["n_action_steps"], played["denoise_steps"]) == (1, 2)
    blue = saved["closed_loop"]["labs"]["lab-blue"]
    for key in ("stage_counts", "mean_frames", "success_rate"):  # the saved settings reproduce a plain rollout
        assert blue[key] == r["summary"][key], key
    assert json.loads((tmp_path / "variants" / "variants.json").read_text())["rows"][1]["n_action_steps"] == 1
    assert "play 1 of" in (tmp_path / "variants" / "variants.md").read_text()
    with pytest.raises(ConfigError, match=f"chunks of {chunk} frames"):
        inference_variants(demo, tmp_path / "told", [{"n_action_steps": chunk + 1}], 1, tmp_path / "v2")

    with pytest.raises(ValueError, match="only sim recordings carry it"):
        model.build_policy(cfg, data.open_client(smoke_cfg, 0).meta, stats)  # the smoke preset's synthetic data


def test_recording_is_cached_and_independent_of_workers(recording, cache, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    again = record_lab("lab-blue", 3, cache, image_size=IMAGE, seed=0, workers=2)
    assert again.root == recording.root and again.seconds == recording.seconds  # read from the cache
    shutil.copytree(cache / "sim", tmp_path / "sim")  # the lab's scene and decimated meshes, not its recording
    threads = torch.get_num_threads()
    single = record_lab("lab-blue", 3, tmp_path, image_size=IMAGE, seed=0, workers=1)
    assert torch.get_num_threads() == threads  # simulated here on one thread; this process keeps its count
    a = LeRobotDataset("zk0/lab-blue", root=recording.root).hf_dataset
    b = LeRobotDataset("zk0/lab-blue", root=single.root).hf_dataset
    np.testing.assert_array_equal(np.asarray(a["action"]), np.asarray(b["action"]))
    np.testing.assert_array_equal(np.asarray(a["observation.state"]), np.asarray(b["observation.state"]))


def test_open_loop_replay_of_the_recording(recording, cache):
    assert all(replay_success("lab-blue", recording.root, image_size=IMAGE, cache_dir=cache))


def test_rollout_of_the_expert_and_of_a_still_arm(cache, tmp_path):
    expert = rollout(
        ScriptedExpertPolicy(), None, "lab-red", 2, image_size=IMAGE, cache_dir=cache, video_dir=tmp_path / "videos"
    )
    s = expert["summary"]
    assert s["success_rate"] == 1.0 and s["furthest_stage"] == "placed" and s["stage_reached"]["grasped"] == 1.0
    assert s["success_ci"] == pytest.approx(list(wilson_interval(2, 2)))
    video = expert["episodes"][0]["video"]
    import av

    with av.open(video) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == expert["episodes"][0]["frames"]

    still = rollout(HoldStillPolicy(), None, "lab-red", 2, image_size=IMAGE, cache_dir=cache, max_frames=60)
    assert still["summary"]["success_rate"] == 0.0 and still["summary"]["furthest_stage"] == "none"
    assert all(e["frames"] == 60 for e in still["episodes"])


def test_cli_aim_measures_saved_policies_in_the_presets_labs(tmp_path, capsys):
    """`zk0 sim aim`: the shipped base's first chunk at held-out cube positions in the demo's five labs,
    against the expert's; a folder without a policy and a preset without labs are refused."""
    from zk0lib.cli import main
    from zk0lib.config import SHIPPED_BASE

    out = tmp_path / "aim.json"
    assert (
        main(["sim", "aim", "--preset", "demo", "--policy", str(SHIPPED_BASE), "--episodes", "2", "--out", str(out)])
        == 0
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["labs"]) == {*CLIENT_LABS, UNSEEN_LAB} and row["episodes"] == 10
    assert row["expert_pan_spread_deg"] > 1.0 and row["pan_error_deg"] > 0 and row["pan_error_if_mean_deg"] > 0
    assert (
        f"| {SHIPPED_BASE} | {row['pan_error_deg']:.1f} | {row['pan_error_if_mean_deg']:.1f} |"
        in capsys.readouterr().out
    )
    assert main(["sim", "aim", "--preset", "demo", "--policy", str(tmp_path)]) == 1
    assert "no saved policy there" in capsys.readouterr().err
    assert main(["sim", "aim", "--preset", "smoke", "--policy", str(SHIPPED_BASE)]) == 2
    assert "no simulated lab" in capsys.readouterr().err


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    lo, hi = wilson_interval(10, 10)
    assert 0.65 < lo < 0.75 and hi == 1.0


def test_cli_check_reports_a_table(home):
    out = subprocess.run(
        [sys.executable, "-m", "zk0lib.cli", "sim", "check", "--lab", "lab-red", "--episodes", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lab-red" in out.stdout and "2/2" in out.stdout


def test_the_real_path_shape_on_labs_from_the_base_with_closed_loop_before_and_after(home, zk0_cli, recording):
    """The real path at tiny scale: a pretrained policy folder (the shipped base), FedAdam, bf16 deltas,
    evaluation on the clients, W&B offline, and closed loop in the labs before and after fine-tuning."""
    import time

    from test_federation import _alive_flower_processes  # tests/ is on sys.path

    from zk0lib.runs import RunRecord

    labs = [{"name": lab, "source": "sim", "lab": lab} for lab in ("lab-red", "lab-blue")]
    settings = {
        "data.clients": json.dumps(labs),
        "data.eval_only": '[{"name": "lab-unseen", "source": "sim", "lab": "lab-unseen"}]',
        "data.sim_episodes": 3,
        "data.sim_image_size": IMAGE,
        "data.heldout_episodes": 1,
        "model.pretrained": "base",
        "fl.strategy": "fedadam",
        "fl.transport_dtype": "bfloat16",
        "fl.num_rounds": 1,
        "eval.where": "clients",
        "eval.rollout_episodes": 1,
        "eval.rollout_max_frames": 30,
        "eval.rollout_round0": "true",
        "output.wandb": "true",
    }
    t0 = time.time()
    out = zk0_cli(
        "train",
        "--preset",
        "smoke",
        "--run-id",
        "e2e-labs",
        *(x for k, v in settings.items() for x in ("--set", f"{k}={v}")),
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert _alive_flower_processes(t0) == []
    run = RunRecord(home / "reports" / "runs" / "e2e-labs")
    rounds, trainable = run.rounds(), run.summary()["parameters"]["trainable"]
    first = rounds[0]  # the shipped base, closed loop before any fine-tuning, in the same labs
    assert first["round"] == 0 and set(first["rollout"]["labs"]) == {"lab-red", "lab-blue", "lab-unseen"}
    assert set(first["eval"]["clients"]) == {"lab-red", "lab-blue"}  # the clients judged the base too
    assert run.summary()["start_rollout"]["round"] == 0
    last = rounds[-1]
    assert set(last["train"]["clients"]) == {"lab-red", "lab-blue"}
    assert all(m["proximal_mu"] == 0 for m in last["train"]["clients"].values())  # fedadam: no FedProx term
    assert last["bytes_received"] == 2 * trainable * 2  # bf16 deltas up
    assert last["bytes_sent"] == 2 * trainable * 2 + 2 * trainable * 4  # bf16 weights to train, fp32 to judge
    assert set(last["eval"]["clients"]) == {"lab-red", "lab-blue"} and "lab-unseen" in last["eval"]["eval_only"]
    labs_done = last["rollout"]["labs"]
    assert set(labs_done) == {"lab-red", "lab-blue", "lab-unseen"} and labs_done["lab-unseen"]["role"] == "eval_only"
    for lab in labs_done.values():
        assert lab["summary"]["episodes"] == 1 and lab["episodes"][0]["frames"] <= 30
    assert last["rollout"]["clients"]["episodes"] == 2
    assert run.summary()["final_rollout"]["labs"]["lab-red"]["episodes"] == 1
    assert "closed-loop success" in out.stdout
    offline = list((run.path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))  # one W&B run, written offline

    bench = zk0_cli("bench", "comms", "--run", str(run.path))  # the model rebuilt on its own, not from the record
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-4000:]
    result = json.loads((home / "reports" / "bench" / "comms.json").read_text())
    assert result["run"]["matches"] and result["run"]["upload_bytes_per_client_round"] == [trainable * 2]
    assert result["smolvla_base"]["trainable_bf16_share_of_full"] <= 0.12
    assert result["smolvla_base_lora_r16"]["trainable_fp32_share_of_full"] <= 0.01  # LoRA: <= 1% at the default r
    assert "-> match" in bench.stdout


def test_recorded_lab_validates_clean(recording):
    from zk0lib.validate import validate_dataset

    report = validate_dataset(recording.root, decode="full", chunk_size=10)
    assert report.findings == [], report.table()


def test_execution_noise_takes_the_arm_off_the_expert_path_and_the_labels_bring_it_back(cache, tmp_path):
    from zk0lib.sim.env import LabEnv, run_expert_episode
    from zk0lib.sim.labs import get_lab
    from zk0lib.sim.record import dataset_root, episode_seed

    lab = get_lab("lab-red")
    env = LabEnv(lab, IMAGE, cache)
    try:
        for k in range(2):
            seed = episode_seed(lab, 0, k)
            clean = list(run_expert_episode(env, seed, render=False))
            noisy = list(run_expert_episode(env, seed, render=False, noise_deg=5.0))
            assert env.stage == 4  # the expert still places the cube
            assert len(noisy) > len(clean)  # corrections take time
            n = min(len(clean), len(noisy))
            off_path = np.abs(np.stack([f[0] for f in noisy[:n]]) - np.stack([f[0] for f in clean[:n]]))[:, :4]
            assert off_path.max() > 2.0  # degrees: the executed arm left the clean path
            lag = np.abs(np.stack([f[0] for f in noisy[3:]])[:, 0] - np.stack([f[1] for f in noisy[:-3]])[:, 0])
            assert lag.mean() > 0.6  # the recorded target is not what the arm did (noise-free: ~0.55)
    finally:
        env.close()
    # recordings with noise get their own cache entry; noise-free keys are unchanged by the option
    assert dataset_root(cache, lab, 20, 128, 0, 5.0) != dataset_root(cache, lab, 20, 128, 0)
    assert dataset_root(cache, lab, 20, 128, 0, 0.0) == dataset_root(cache, lab, 20, 128, 0)
    fake = tmp_path / "noisy"
    fake.mkdir()
    (fake / RECORD_INFO).write_text(json.dumps({"noise_deg": 5.0, "episode_seeds": [1]}))
    with pytest.raises(ValueError, match="cannot reproduce the episodes"):
        replay_success("lab-red", fake, image_size=IMAGE, cache_dir=cache)
    with pytest.raises(ValueError, match="noise_deg must be >= 0"):
        record_lab("lab-red", 1, cache, IMAGE, noise_deg=-1.0)
