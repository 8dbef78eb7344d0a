"""Synthetic SO-101-shaped LeRobot datasets, written offline with lerobot's own writer.

Each episode moves a 6-joint arm from a random start towards a random goal pose shown as a marker in
the front camera; the cameras draw the arm from its joint state, so a policy must look to act well.
Used by the `smoke` preset and the tests: small, fast, real AV1 video, deterministic by seed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from zk0lib import env

JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
JOINT_NAMES = [f"{j}.pos" for j in JOINTS]
CAMERAS = ("front", "wrist")
FPS = 30
GENERATOR_VERSION = 1

# Colours of the goal marker per variant, and the background each variant's "lab" has.
_MARKERS = [("red", (220, 40, 40)), ("blue", (40, 80, 230)), ("yellow", (230, 210, 40)), ("purple", (150, 60, 200))]
_BACKGROUNDS = [(70, 70, 70), (110, 90, 60), (50, 80, 100), (90, 60, 90)]
_HOME = np.array([0.0, -40.0, 60.0, 20.0, 0.0, 30.0], dtype=np.float32)
_SPAN = np.array([60.0, 35.0, 35.0, 30.0, 45.0, 0.0], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticSpec:
    variant: int
    episodes: int
    frames: int
    image_size: int
    seed: int

    def digest(self) -> str:
        raw = json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:10]


def task_text(variant: int) -> str:
    colour = _MARKERS[variant % len(_MARKERS)][0]
    return f"move the gripper to the {colour} marker and close it"


def features(image_size: int) -> dict:
    vec = {"dtype": "float32", "shape": (6,), "names": JOINT_NAMES}
    video = {"dtype": "video", "shape": (image_size, image_size, 3), "names": ["height", "width", "channels"]}
    return {
        "observation.state": dict(vec),
        "action": dict(vec),
        **{f"observation.images.{cam}": dict(video) for cam in CAMERAS},
    }


def episode(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(states, actions, goal) of one episode: first-order tracking of the goal with seeded noise."""
    rng = np.random.default_rng([spec.seed, spec.variant, index])
    goal = _HOME + rng.uniform(-1, 1, 6).astype(np.float32) * _SPAN
    state = _HOME + rng.normal(0, 5, 6).astype(np.float32)
    states, actions = [], []
    for t in range(spec.frames):
        target = goal.copy()
        target[5] = 30.0 if t < spec.frames // 2 else -10.0  # open, then close the gripper
        action = state + 0.15 * (target - state)
        states.append(state.copy())
        actions.append(action.astype(np.float32))
        state = (action + rng.normal(0, 0.2, 6)).astype(np.float32)
    return np.stack(states), np.stack(actions), goal


def _point(joints: np.ndarray, size: int) -> tuple[float, float]:
    """Planar forward kinematics of pan/lift/elbow into image coordinates."""
    pan, lift, elbow = np.deg2rad(joints[:3])
    reach = 0.22 + 0.12 * np.cos(lift) + 0.1 * np.cos(lift + elbow)
    x = 0.5 + reach * np.sin(pan)
    y = 0.85 - reach * np.cos(pan) * 1.3
    return float(np.clip(x, 0.05, 0.95) * size), float(np.clip(y, 0.05, 0.95) * size)


def _disk(img: np.ndarray, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    h, w = img.shape[:2]
    yy, xx = np.ogrid[:h, :w]
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour


def render(spec: SyntheticSpec, state: np.ndarray, goal: np.ndarray) -> dict[str, np.ndarray]:
    size = spec.image_size
    bg = _BACKGROUNDS[spec.variant % len(_BACKGROUNDS)]
    marker = _MARKERS[spec.variant % len(_MARKERS)][1]
    front = np.empty((size, size, 3), dtype=np.uint8)
    front[:] = bg
    gx, gy = _point(goal, size)
    front[int(gy) - size // 16 : int(gy) + size // 16 + 1, int(gx) - size // 16 : int(gx) + size // 16 + 1] = marker
    base = (size / 2, size * 0.9)
    ex, ey = _point(state, size)
    for k in np.linspace(0, 1, 12):
        _disk(front, base[0] + k * (ex - base[0]), base[1] + k * (ey - base[1]), size / 40 + 1, (230, 230, 230))
    grip = float(np.clip((state[5] + 10) / 40, 0, 1))
    _disk(front, ex, ey, size / 20 + 2 * grip, (40, 200, 90))
    # The wrist camera sees the goal marker offset by where the gripper is, rotated by wrist roll.
    wrist = np.empty((size, size, 3), dtype=np.uint8)
    wrist[:] = tuple(int(c * 0.6) for c in bg)
    dx, dy = (gx - ex) * 1.5, (gy - ey) * 1.5
    roll = np.deg2rad(state[4])
    rx, ry = dx * np.cos(roll) - dy * np.sin(roll), dx * np.sin(roll) + dy * np.cos(roll)
    _disk(wrist, size / 2 + rx, size / 2 + ry, size / 8, marker)
    jaw = int(size * (0.1 + 0.3 * grip))
    wrist[: size // 6, size // 2 - jaw - 3 : size // 2 - jaw] = (200, 200, 200)
    wrist[: size // 6, size // 2 + jaw : size // 2 + jaw + 3] = (200, 200, 200)
    return {"front": front, "wrist": wrist}


def ensure_synthetic_dataset(spec: SyntheticSpec, repo_id: str, parent: Path) -> Path:
    """Write the dataset once under `parent` (atomically: temp folder, then rename); return its root."""
    root = parent / f"{repo_id.replace('/', '__')}-{spec.digest()}"
    if (root / "meta" / "info.json").exists():
        return root
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{root.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from zk0lib.env import native_stderr_to, quiet

    quiet()
    with native_stderr_to(parent / "encode.log"):
        _write(spec, repo_id, tmp, LeRobotDataset)
    shutil.rmtree(tmp / "images", ignore_errors=True)  # the writer's emptied frame staging folders
    tmp.rename(root)
    return root


def _write(spec: SyntheticSpec, repo_id: str, tmp: Path, dataset_cls: type) -> None:
    ds = dataset_cls.create(
        repo_id=repo_id,
        fps=FPS,
        features=features(spec.image_size),
        root=tmp,
        robot_type="so101_follower",
        use_videos=True,
    )
    task = task_text(spec.variant)
    for ep in range(spec.episodes):
        states, actions, goal = episode(spec, ep)
        for state, action in zip(states, actions, strict=True):
            images = render(spec, state, goal)
            ds.add_frame(
                {
                    "observation.state": state,
                    "action": action,
                    **{f"observation.images.{cam}": img for cam, img in images.items()},
                    "task": task,
                }
            )
        env.save_episode(ds)
    env.finalize(ds)
