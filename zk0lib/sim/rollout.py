"""Closed-loop evaluation: run a policy in a lab and report whether it picks and places the cube.

Any lerobot policy works (`select_action` plus its pre/post processors). Only the frames the policy
consumes are rendered: a chunking policy like SmolVLA looks at the cameras once per action chunk.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zk0lib.sim.labs import LabSpec, get_lab
from zk0lib.sim.record import episode_seed

MAX_FRAMES = 450  # 15 s at 30 fps; the expert needs ~4.7 s


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    stage: str
    frames: int
    policy_calls: int
    video: str | None = None


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sound at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(lab: str, episodes: list[EpisodeResult], seconds: float) -> dict[str, Any]:
    from zk0lib.sim.env import STAGES

    n = len(episodes)
    successes = sum(e.success for e in episodes)
    furthest = [STAGES.index(e.stage) for e in episodes]
    return {
        "lab": lab,
        "episodes": n,
        "success_rate": successes / n if n else float("nan"),
        "success_ci": list(wilson_interval(successes, n)),
        "stage_counts": {s: sum(1 for f in furthest if f == i) for i, s in enumerate(STAGES)},
        "stage_reached": {s: sum(1 for f in furthest if f >= i) / n for i, s in enumerate(STAGES) if i} if n else {},
        "furthest_stage": STAGES[max(furthest)] if n else "none",
        "mean_frames": float(np.mean([e.frames for e in episodes])) if n else float("nan"),
        "seconds": seconds,
    }


def _needs_observation(policy: Any) -> bool:
    """Whether select_action will look at this frame: chunking policies with actions queued will not."""
    queues = getattr(policy, "_queues", None)
    if not isinstance(queues, dict) or set(queues) != {"action"}:
        return True  # policies that stack past observations need every frame
    return len(queues["action"]) == 0


def _observation(env: Any, images: dict[str, np.ndarray], task: str, device: torch.device) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "observation.state": torch.from_numpy(env.joint_state()).unsqueeze(0).to(device),
        # privileged: for reference policies; camera policies leave it out of their features
        "observation.environment_state": torch.from_numpy(env.environment_state()).unsqueeze(0).to(device),
    }
    for cam, img in images.items():
        obs[f"observation.images.{cam}"] = (
            torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=torch.float32) / 255.0
        )
    obs["task"] = [task]
    return obs


@torch.no_grad()
def rollout(
    policy: Any,
    processors: tuple[Any, Any] | None,
    lab: LabSpec | str,
    episodes: int,
    seed: int = 0,
    image_size: int = 128,
    cache_dir: Path | None = None,
    max_frames: int = MAX_FRAMES,
    video_dir: Path | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Run `policy` for `episodes` seeded episodes in `lab`: per-episode results and a summary.

    The summary has the success rate with its Wilson 95% interval, the share of episodes that reached
    each stage (reached the cube, grasped, lifted, placed), the furthest stage and the mean episode
    length. With `video_dir`, every frame is rendered and an mp4 per episode is written there.
    """
    from zk0lib.sim.env import CAMERAS, LabEnv

    lab = get_lab(lab) if isinstance(lab, str) else lab
    pre, post = processors if processors is not None else (None, None)
    device = torch.device(device)
    env = LabEnv(lab, image_size, cache_dir)
    cameras = CAMERAS if getattr(policy, "needs_images", True) else ()  # state-only policies: nothing rendered
    if hasattr(policy, "bind_env"):
        policy.bind_env(env)
    if hasattr(policy, "eval"):
        policy.eval()
    results: list[EpisodeResult] = []
    t0 = time.perf_counter()
    try:
        for i in range(episodes):
            ep_seed = episode_seed(lab, seed, i, purpose=1)
            env.reset(seed=ep_seed)
            policy.reset()
            torch.manual_seed(ep_seed)  # the policy's sampling noise: an episode's result depends on nothing before it
            frames_for_video: list[np.ndarray] = []
            batch: dict[str, Any] | None = None
            calls = 0
            success = False
            for frame in range(max_frames):
                want_video = video_dir is not None
                if batch is None or _needs_observation(policy) or want_video:
                    images = env.render_cameras(CAMERAS if want_video else cameras)
                    if want_video:
                        frames_for_video.append(_annotate(images, lab.task, env.stage_name, frame))
                    if batch is None or _needs_observation(policy):
                        batch = _observation(env, {c: images[c] for c in cameras}, lab.task, device)
                        batch = pre(batch) if pre is not None else batch
                        calls += 1
                action = policy.select_action(batch)
                action = post(action) if post is not None else action
                success, failed = env.step_frame(torch.as_tensor(action).reshape(-1)[:6].float().cpu().numpy())
                if success or failed:
                    break
            video = None
            if video_dir is not None:
                video = str(write_video(frames_for_video, Path(video_dir) / f"{lab.name}-episode{i:03d}.mp4"))
            results.append(EpisodeResult(ep_seed, success, env.stage_name, frame + 1, calls, video))
    finally:
        env.close()
    return {"summary": summarize(lab.name, results, time.perf_counter() - t0), "episodes": [asdict(r) for r in results]}


def _annotate(images: dict[str, np.ndarray], task: str, stage: str, frame: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    tile = np.concatenate(list(images.values()), axis=1)
    canvas = Image.new("RGB", (max(tile.shape[1], 256), tile.shape[0] + 28), (0, 0, 0))
    canvas.paste(Image.fromarray(tile), (0, 28))
    draw = ImageDraw.Draw(canvas)
    draw.text((3, 1), task[:60], fill=(255, 255, 255))
    draw.text((3, 14), f"frame {frame}  stage: {stage}", fill=(255, 220, 80))
    return np.asarray(canvas)


def write_video(frames: list[np.ndarray], path: Path, fps: int = 30) -> Path:
    """H.264 mp4 (plays in browsers and notebooks), written to a temp name then renamed."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    h, w = frames[0].shape[:2]
    av.logging.set_level(av.logging.ERROR)  # x264 prints its statistics at INFO when it closes
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = w - w % 2, h - h % 2
        stream.pix_fmt = "yuv420p"
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: stream.height, : stream.width]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    tmp.replace(path)
    return path


class ScriptedExpertPolicy:
    """The lab's scripted expert as a policy with privileged access to the scene: an upper bound."""

    needs_images = False

    def __init__(self) -> None:
        self.env: Any = None
        self._held: np.ndarray | None = None
        self._frame = 0

    def bind_env(self, env: Any) -> None:
        self.env = env

    def reset(self) -> None:
        self._frame = 0

    def select_action(self, batch: dict[str, Any]) -> torch.Tensor:
        from zk0lib.sim.env import FRAMES_PER_DECISION

        if self._frame % FRAMES_PER_DECISION == 0:
            self._held = self.env.expert_targets()
        self._frame += 1
        return torch.from_numpy(self._held).unsqueeze(0)


class HoldStillPolicy:
    """Commands the current joint positions: the arm does nothing. A lower bound (0%)."""

    needs_images = False

    def reset(self) -> None:
        pass

    def select_action(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["observation.state"]


@torch.no_grad()
def aim_error(
    bundle: Any, labs: list[LabSpec], episodes: int, seed: int = 0, image_size: int = 128, cache_dir: Path | None = None
) -> dict[str, Any]:
    """Does the policy aim at the cube? At the start of held-out episodes (cube positions no recording
    used), the shoulder_pan of its first action chunk against the scripted expert's, in degrees; and, as
    the bar to beat, the error of always playing the expert's mean first chunk (a policy that ignores
    the image). Only the image tells where the cube is at that moment: the state is the same home pose."""
    from zk0lib.auxiliary import estimator_of
    from zk0lib.sim.env import CAMERAS, FRAMES_PER_DECISION, LabEnv

    policy, pre, post = bundle.policy, bundle.preprocessor, bundle.postprocessor
    policy.eval()
    estimator = estimator_of(policy)
    per_lab: dict[str, Any] = {}
    all_pred, all_expert = [], []
    for lab in labs:
        env = LabEnv(lab, image_size, cache_dir)
        pred, expert, estimates, truths = [], [], [], []
        try:
            for k in range(episodes):
                ep_seed = episode_seed(lab, seed, k, purpose=2)
                env.reset(seed=ep_seed)
                batch = pre(_observation(env, env.render_cameras(CAMERAS), lab.task, bundle.device))
                torch.manual_seed(ep_seed)
                policy.reset()
                chunk = post(policy.predict_action_chunk(batch)).float().cpu().numpy()[0]
                pred.append(chunk[:, 0])
                if estimator is not None:  # model.estimate_environment_state: its estimate, in metres
                    est = estimator.captured["estimate"][0].float() * estimator.std + estimator.mean
                    estimates.append(est.cpu().numpy())
                    truths.append(env.environment_state())
                targets = []
                for frame in range(len(chunk)):
                    if frame % FRAMES_PER_DECISION == 0:
                        held = env.expert_targets()
                    targets.append(held[0])
                    env.step_frame()
                expert.append(np.asarray(targets))
        finally:
            env.close()
        pred_a, expert_a = np.asarray(pred), np.asarray(expert)
        per_lab[lab.name] = {
            "pan_error_deg": float(np.abs(pred_a - expert_a).mean()),
            "pan_error_if_mean_deg": float(np.abs(expert_a.mean(0) - expert_a).mean()),
        }
        if estimator is not None:
            per_lab[lab.name] |= _estimate_errors(np.asarray(estimates), np.asarray(truths), estimator.mean)
        all_pred.append(pred_a)
        all_expert.append(expert_a)
    pred_a, expert_a = np.concatenate(all_pred), np.concatenate(all_expert)
    last_p, last_e = pred_a[:, -1], expert_a[:, -1]
    corr = float(np.corrcoef(last_p, last_e)[0, 1]) if last_p.std() > 0 and last_e.std() > 0 else float("nan")
    keys = ("cube_error_cm", "cube_error_if_mean_cm", "target_error_cm", "target_error_if_mean_cm")
    means = {k: float(np.mean([v[k] for v in per_lab.values()])) for k in keys} if estimator is not None else {}
    return means | {
        "episodes": int(len(pred_a)),
        "pan_error_deg": float(np.mean([v["pan_error_deg"] for v in per_lab.values()])),
        "pan_error_if_mean_deg": float(np.mean([v["pan_error_if_mean_deg"] for v in per_lab.values()])),
        "pan_correlation": corr,  # of the chunk's last pan, predicted vs expert, over all episodes
        # how much the chunk's last pan moves with the cube: a policy blind to the image has ~0 spread
        "pan_spread_deg": float(last_p.std()),
        "expert_pan_spread_deg": float(last_e.std()),
        "labs": per_lab,
    }


def _estimate_errors(estimates: np.ndarray, truths: np.ndarray, mean: torch.Tensor) -> dict[str, float]:
    """A state estimator's errors on the table (x, y), cube and target, in cm, and the errors of guessing the
    training mean (the bar an estimator that ignores the image meets)."""
    guess = mean.cpu().numpy()

    def cm(a: np.ndarray, b: np.ndarray, part: slice, b_part: slice | None = None) -> float:
        diff = a[..., part] - b[..., part if b_part is None else b_part]
        return float(np.linalg.norm(diff[..., :2], axis=-1).mean() * 100)

    cube, target = slice(0, 3), slice(3, 6)
    return {
        "cube_error_cm": cm(estimates, truths, cube),
        "cube_error_if_mean_cm": cm(np.broadcast_to(guess, truths.shape), truths, cube),
        "target_error_cm": cm(estimates, truths, target),
        "target_error_if_mean_cm": cm(np.broadcast_to(guess, truths.shape), truths, target),
        # the cube's estimate against where the target is: near 0 when it takes the target for the cube
        "cube_estimate_to_target_cm": cm(estimates, truths, cube, target),
    }
