"""Decision frames: the first moments of many expert episodes, for pretraining a base that aims.

In a recorded episode only the first frame shows the arm at its home pose; from the second frame on
the joint state already says which way the arm is going. A policy trained on recordings alone learns
to continue the motion it finds in the state and, at the home pose, plays one average move whatever
the image shows (the "copycat" failure of behaviour cloning with proprioception). The images decide
only at the start, and 10 recordings per lab give 10 such frames. This makes many of them cheaply:
episode starts with new cube and target positions, each with the camera images at frame t (t = 0
for half of them, else 1-15), the joint state, and the expert's next `chunk` joint targets, exactly
what a recording of that episode would hold there. Made once per lab and cached under
data_cache/starts/.
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

STARTS_VERSION = 1
MAX_LATE_FRAME = 15


def _lab_starts(lab: LabSpec, count: int, chunk: int, image_size: int, cache_dir: str, seed: int) -> dict:
    import torch

    from zk0lib.sim.env import LabEnv, run_expert_episode
    from zk0lib.sim.record import episode_seed

    torch.set_num_threads(1)
    env = LabEnv(lab, image_size, Path(cache_dir))
    rng = np.random.default_rng([lab.seed, seed, 4])
    out: dict[str, list] = {"front": [], "wrist": [], "state": [], "action": [], "action_is_pad": []}
    try:
        for k in range(count):
            t0 = 0 if rng.random() < 0.5 else int(rng.integers(1, MAX_LATE_FRAME + 1))
            targets: list[np.ndarray] = []
            for t, (state, action, _, _) in enumerate(
                run_expert_episode(env, episode_seed(lab, seed, k, purpose=4), render=False)
            ):
                if t == t0:
                    images = env.render_cameras()
                    out["front"].append(images["front"])
                    out["wrist"].append(images["wrist"])
                    out["state"].append(state)
                if t >= t0:
                    targets.append(action)
                if len(targets) == chunk:
                    break
            if not targets:  # the episode ended before t0 (not seen: the expert's episodes last ~140 frames)
                continue
            pad = chunk - len(targets)
            out["action"].append(np.concatenate([targets, np.repeat(targets[-1:], pad, axis=0)]) if pad else targets)
            out["action_is_pad"].append(np.arange(chunk) >= len(targets))
    finally:
        env.close()
    types = {"front": np.uint8, "wrist": np.uint8, "action_is_pad": bool}
    return {k: np.asarray(v, dtype=types.get(k, np.float32)) for k, v in out.items()}


def start_set(
    labs: list[LabSpec],
    per_lab: int,
    chunk: int,
    cache_dir: Path,
    image_size: int = 128,
    seed: int = 0,
    workers: int = 2,
) -> dict[str, np.ndarray]:
    """`per_lab` decision frames per lab (images, state, the expert's next `chunk` targets, the lab's
    index for its task string), made with `workers` processes and cached as one .npz."""
    key = json.dumps([[lab.digest() for lab in labs], per_lab, chunk, image_size, seed, STARTS_VERSION])
    path = Path(cache_dir) / "starts" / f"starts-{hashlib.sha256(key.encode()).hexdigest()[:10]}.npz"
    if path.exists():
        with np.load(path) as f:
            return dict(f)
    args = [(lab, per_lab, chunk, image_size, str(cache_dir), seed) for lab in labs]
    if workers <= 1:
        parts = [_lab_starts(*a) for a in args]
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(_lab_starts, *zip(*args, strict=True)))
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    merged["lab"] = np.concatenate([np.full(len(p["front"]), i, dtype=np.int16) for i, p in enumerate(parts)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    np.savez(tmp, **merged)
    os.replace(tmp, path)
    return merged


def start_batch(starts: dict[str, np.ndarray], tasks: list[str], idx: np.ndarray) -> dict:
    """Items `idx` of a start set as a batch in the dataset's format (before the policy's preprocessor)."""
    import torch

    def image(key: str) -> torch.Tensor:
        return torch.from_numpy(starts[key][idx]).permute(0, 3, 1, 2).float() / 255.0

    return {
        "observation.images.front": image("front"),
        "observation.images.wrist": image("wrist"),
        "observation.state": torch.from_numpy(starts["state"][idx]),
        "action": torch.from_numpy(starts["action"][idx]),
        "action_is_pad": torch.from_numpy(starts["action_is_pad"][idx]),
        "task": [tasks[i] for i in starts["lab"][idx]],
    }
