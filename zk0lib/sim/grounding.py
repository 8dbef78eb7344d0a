"""Grounding images: camera frames of expert episodes labelled with where the cube and target are.

What the VLM of a real base learns from captioned and grounded images before it ever sees an action
(smolvla_base starts from SmolVLM2, pretrained on such data) is what a tiny VLM with random weights
lacks. This makes that data in the labs: frames of the scripted expert's episodes (so the arm is where
it is during real tasks, occlusions included), each labelled with the cube's and the target's position
on the table and the cube's position in the gripper's frame (what the wrist camera sees).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from zk0lib.sim.labs import LabSpec
from zk0lib.sim.record import keeps_torch_threads, pool_workers

GROUNDING_VERSION = 1
FRONT_LABELS = ("cube_x", "cube_y", "target_x", "target_y")  # metres, world frame (table plane)
WRIST_LABELS = ("cube_gx", "cube_gy", "cube_gz")  # metres, the cube in the gripper body's frame


def _lab_frames(lab: LabSpec, episodes: int, per_episode: int, image_size: int, cache_dir: str, seed: int) -> dict:
    import torch

    from zk0lib.sim.env import LabEnv, run_expert_episode
    from zk0lib.sim.record import episode_seed

    torch.set_num_threads(1)
    env = LabEnv(lab, image_size, Path(cache_dir))
    rng = np.random.default_rng([lab.seed, seed, 3])
    out: dict[str, list] = {"front": [], "wrist": [], "front_labels": [], "wrist_labels": []}
    gripper = env._model.body("gripper").id
    try:
        for k in range(episodes):
            ep_seed = episode_seed(lab, seed, k, purpose=3)
            length = sum(1 for _ in run_expert_episode(env, ep_seed, render=False))
            picks = set(rng.choice(length, size=min(per_episode, length), replace=False).tolist())
            for t, _ in enumerate(run_expert_episode(env, ep_seed, render=False)):
                if t not in picks:
                    continue
                images = env.render_cameras()
                block = env._data.sensor("block_pos").data.copy()
                rot = env._data.xmat[gripper].reshape(3, 3)
                local = rot.T @ (block - env._data.xpos[gripper])
                out["front"].append(images["front"])
                out["wrist"].append(images["wrist"])
                out["front_labels"].append([block[0], block[1], env._goal_pos[0], env._goal_pos[1]])
                out["wrist_labels"].append(local)
    finally:
        env.close()
    return {k: np.asarray(v, dtype=np.uint8 if k in ("front", "wrist") else np.float32) for k, v in out.items()}


def grounding_set(
    labs: list[LabSpec],
    episodes: int,
    per_episode: int,
    cache_dir: Path,
    image_size: int = 128,
    seed: int = 0,
    workers: int | None = None,
) -> dict[str, np.ndarray]:
    """Frames and labels of `episodes` expert episodes per lab (`per_episode` random frames each), made
    once with `workers` processes (None or 0: as many as pay, see `record.pool_workers`; one lab each at
    most) and cached as one .npz under data_cache/grounding/."""
    key = json.dumps([[lab.digest() for lab in labs], episodes, per_episode, image_size, seed, GROUNDING_VERSION])
    path = Path(cache_dir) / "grounding" / f"grounding-{hashlib.sha256(key.encode()).hexdigest()[:10]}.npz"
    if path.exists():
        with np.load(path) as f:
            return dict(f)
    args = [(lab, episodes, per_episode, image_size, str(cache_dir), seed) for lab in labs]
    workers = min(pool_workers(workers, len(labs) * episodes), len(labs))
    if workers <= 1:
        with keeps_torch_threads():
            parts = [_lab_frames(*a) for a in args]
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(_lab_frames, *zip(*args, strict=True)))
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    merged["lab"] = np.concatenate([np.full(len(p["front"]), i, dtype=np.int16) for i, p in enumerate(parts)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(tmp, **merged)
    os.replace(tmp, path)
    return merged
