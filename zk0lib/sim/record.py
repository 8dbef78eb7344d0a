"""Recording a lab's demonstrations as a LeRobot v3 dataset (AV1 video) with the scripted expert.

Worker processes simulate and render episodes; the parent writes them in seed order with lerobot's
writer, so the dataset is the same whatever the number of workers. Episode attempt k uses the seed
(lab seed, recording seed, k); attempts where the expert fails are counted and not saved. The dataset
is cached under data_cache/datasets/sim/ and recorded again only when the lab, the episode count, the
image size, the seed or the recorder changes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from zk0lib import env
from zk0lib.sim.labs import LabSpec, get_lab

RECORDER_VERSION = 2  # 2: observation.environment_state (older recordings are recorded again, never mixed)
RECORD_INFO = "zk0_recording.json"
MAX_ATTEMPT_FACTOR = 3  # give up after 3x the requested episodes


@dataclass
class Recording:
    lab: str
    root: Path
    episodes: int
    attempts: int
    failed: int
    frames: int
    seconds: float
    episode_seeds: list[int]
    noise_deg: float = 0.0  # std of the execution offset while recording (0: the expert's targets as is)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds else float("nan")


def episode_seed(lab: LabSpec, seed: int, k: int, purpose: int = 0) -> int:
    """Seeds of recorded episodes (purpose 0) and of closed-loop evaluations (purpose 1) never meet."""
    return int(np.random.SeedSequence([lab.seed, purpose, seed, k]).generate_state(1)[0] & 0x7FFFFFFF)


def features(image_size: int) -> dict[str, dict]:
    from zk0lib.sim.env import CAMERAS, ENVIRONMENT_NAMES, JOINT_NAMES

    vec = {"dtype": "float32", "shape": (6,), "names": JOINT_NAMES}
    video = {"dtype": "video", "shape": (image_size, image_size, 3), "names": ["height", "width", "channels"]}
    return {
        "observation.state": dict(vec),
        "action": dict(vec),
        "observation.environment_state": {"dtype": "float32", "shape": (6,), "names": ENVIRONMENT_NAMES},
        **{f"observation.images.{c}": dict(video) for c in CAMERAS},
    }


def dataset_root(
    cache_dir: Path, lab: LabSpec, episodes: int, image_size: int, seed: int, noise_deg: float = 0.0
) -> Path:
    parts: list[Any] = [lab.digest(), episodes, image_size, seed, RECORDER_VERSION]
    if noise_deg:
        parts.append(float(noise_deg))
    key = json.dumps(parts)
    return cache_dir / "datasets" / "sim" / f"{lab.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}
EPISODES_PER_WORKER = 4  # a worker process costs ~8 s to start (spawn, imports, scene): ~3 episodes at 64 px


@contextmanager
def keeps_torch_threads() -> Iterator[None]:
    """Restores this process's torch thread count: simulating in-process sets one thread, as a worker's
    does, and training after it in the same process must not run on fewer threads (its floats would differ
    from a run that found the recording cached)."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pool_workers(requested: int | None, episodes: int) -> int:
    """Processes to simulate `episodes` episodes with: `requested` when it is given (>= 1); when it is 0 or
    None, as many as pay. The recording process encodes the videos on a core of its own, so only the other
    cores can simulate, each for at least EPISODES_PER_WORKER episodes. On 2 cores that is one, in this
    process: there two workers never paid (8 episodes at 128 px: 31.3 s against 30.5 in-process; 3 at
    64 px: 17.6 s against 8.4)."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores - 1, episodes // EPISODES_PER_WORKER))


def _init_worker(lab: LabSpec, image_size: int, cache_dir: str, noise_deg: float = 0.0) -> None:
    import torch

    from zk0lib.sim.env import LabEnv

    torch.set_num_threads(1)
    _WORKER["env"] = LabEnv(lab, image_size, Path(cache_dir))
    _WORKER["noise_deg"] = noise_deg


def _simulate(seed: int) -> dict[str, Any]:
    """One expert episode: frames (state, action, camera images) and whether it succeeded."""
    from zk0lib.sim.env import run_expert_episode

    env = _WORKER["env"]
    frames = list(run_expert_episode(env, seed, noise_deg=_WORKER["noise_deg"]))
    return {
        "seed": seed,
        "success": env.stage == 4,
        "states": np.stack([f.state for f in frames]),
        "actions": np.stack([f.action for f in frames]),
        "environment": np.stack([f.environment_state for f in frames]),
        "images": {cam: np.stack([f.images[cam] for f in frames]) for cam in frames[0].images},
    }


def simulate_episodes(
    lab: LabSpec, seeds: list[int], image_size: int, cache_dir: Path, workers: int, noise_deg: float = 0.0
) -> Iterator[dict]:
    """Episodes for `seeds`, in order, from `workers` processes (or this one when workers <= 1)."""
    if workers <= 1:
        with keeps_torch_threads():  # a worker runs on one thread; this process goes on with its own count
            _init_worker(lab, image_size, str(cache_dir), noise_deg)
            try:
                yield from map(_simulate, seeds)
            finally:
                _WORKER.pop("env").close()
        return
    # spawn: no GL context or torch threads inherited from this process. A worker that dies raises
    # BrokenProcessPool here instead of being replaced silently.
    pool = ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("spawn"),
        initializer=_init_worker,
        initargs=(lab, image_size, str(cache_dir), noise_deg),
    )
    try:
        todo = iter(seeds)
        pending = deque(pool.submit(_simulate, s) for s in islice(todo, 2 * workers))
        while pending:
            episode = pending.popleft().result()
            for s in islice(todo, 1):
                pending.append(pool.submit(_simulate, s))
            yield episode
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- recording


def record_lab(
    lab: LabSpec | str,
    episodes: int,
    cache_dir: Path,
    image_size: int = 128,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    noise_deg: float = 0.0,
) -> Recording:
    """The lab's dataset of `episodes` successful expert demonstrations (recorded now, or cached).

    `noise_deg` > 0 records them with execution noise (see `run_expert_episode`)."""
    lab = get_lab(lab) if isinstance(lab, str) else lab
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1 (got {episodes})")
    if noise_deg < 0:
        raise ValueError(f"noise_deg must be >= 0 (got {noise_deg})")
    root = dataset_root(cache_dir, lab, episodes, image_size, seed, noise_deg)
    if (root / RECORD_INFO).exists():
        return Recording(**{**json.loads((root / RECORD_INFO).read_text()), "root": root})
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from zk0lib.env import native_stderr_to, quiet
    from zk0lib.sim.env import FPS

    quiet()
    workers = pool_workers(workers, episodes)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seeds = [episode_seed(lab, seed, k) for k in range(episodes * MAX_ATTEMPT_FACTOR)]
    saved: list[int] = []
    attempts = frames = 0
    with native_stderr_to(root.parent / "encode.log"):
        ds = LeRobotDataset.create(
            repo_id=f"zk0/{lab.name}",
            fps=FPS,
            features=features(image_size),
            root=tmp,
            robot_type="so101_follower",
            use_videos=True,
        )
        episodes_iter = simulate_episodes(lab, seeds, image_size, cache_dir, workers, noise_deg)
        for ep in episodes_iter:
            attempts += 1
            if ep["success"]:
                for i in range(len(ep["states"])):
                    ds.add_frame(
                        {
                            "observation.state": ep["states"][i],
                            "action": ep["actions"][i],
                            "observation.environment_state": ep["environment"][i],
                            **{f"observation.images.{cam}": imgs[i] for cam, imgs in ep["images"].items()},
                            "task": lab.task,
                        }
                    )
                env.save_episode(ds)
                saved.append(ep["seed"])
                frames += len(ep["states"])
                if progress is not None:
                    progress(len(saved), episodes)
            if len(saved) == episodes:
                episodes_iter.close()
                break
        env.finalize(ds)
    if len(saved) < episodes:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"lab {lab.name}: the expert succeeded in only {len(saved)} of {attempts} attempts; "
            f"{episodes} episodes were asked for"
        )
    shutil.rmtree(tmp / "images", ignore_errors=True)
    rec = Recording(
        lab.name, root, episodes, attempts, attempts - len(saved), frames, time.perf_counter() - t0, saved, noise_deg
    )
    (tmp / RECORD_INFO).write_text(json.dumps({**asdict(rec), "root": None}, indent=2))
    os.replace(tmp, root)
    return rec


def replay_success(lab: LabSpec | str, root: Path, image_size: int = 128, cache_dir: Path | None = None) -> list[bool]:
    """Replay every recorded episode's 6-dim joint targets open loop in a fresh scene: did each succeed?"""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from zk0lib.sim.env import LabEnv

    lab = get_lab(lab) if isinstance(lab, str) else lab
    info = json.loads((root / RECORD_INFO).read_text())
    if info.get("noise_deg"):
        raise ValueError(
            f"{root}: recorded with execution noise (noise_deg={info['noise_deg']}); its actions are the expert's "
            "intended targets, not what the arm executed, so an open-loop replay cannot reproduce the episodes"
        )
    ds = LeRobotDataset(f"zk0/{lab.name}", root=root)
    actions = np.asarray(ds.hf_dataset["action"], dtype=np.float32)
    episode_index = np.asarray(ds.hf_dataset["episode_index"])
    env = LabEnv(lab, image_size, cache_dir or root.parents[2])
    results = []
    try:
        for ep, seed in enumerate(info["episode_seeds"]):
            env.reset(seed=seed)
            success = False
            for action in actions[episode_index == ep]:
                success, failed = env.step_frame(action)
                if success or failed:
                    break
            results.append(success)
    finally:
        env.close()
    return results


def check_expert(
    lab: LabSpec | str, episodes: int, seed: int = 0, cache_dir: Path | None = None
) -> dict[str, list[bool]]:
    """The scripted expert on `episodes` recording seeds (no rendering), and for the episodes it
    succeeded in (those a recording keeps), the open-loop replay of its joint targets rounded to
    float32 as a dataset stores them: did each succeed?"""
    from zk0lib.sim.env import LabEnv, run_expert_episode

    lab = get_lab(lab) if isinstance(lab, str) else lab
    env = LabEnv(lab, 64, cache_dir)
    expert, replay = [], []
    try:
        for k in range(episodes):
            ep_seed = episode_seed(lab, seed, k)
            actions = [np.asarray(f.action, dtype=np.float32) for f in run_expert_episode(env, ep_seed, render=False)]
            expert.append(env.stage == 4)
            if not expert[-1]:
                continue
            env.reset(seed=ep_seed)
            success = False
            for action in actions:
                success, failed = env.step_frame(action)
                if success or failed:
                    break
            replay.append(success)
        return {"expert": expert, "replay": replay}
    finally:
        env.close()
