"""Evaluation videos (notebook 03): the policy's replanned action chunks drawn against a recorded held-out
episode, and closed-loop episodes in the simulated labs, as mp4 files next to the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from zk0lib.runs import RunRecord

_TRACE_COLOURS = {"recorded": (235, 235, 235), "predicted": (255, 150, 40)}


def predicted_actions(bundle: Any, repo_id: str, root: Path, episode: int, seed: int = 0):
    """Replan like the policy acts (a new chunk every n_action_steps frames) on a recorded episode.

    Returns (frames DataFrame in the joint_chart format with kind recorded/predicted, camera images per
    frame). The noise of each chunk is fixed by (seed, frame), so the video is reproducible."""
    import torch
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from zk0lib.train import derive_seed

    policy = bundle.policy
    ds = LeRobotDataset(repo_id, root=root, episodes=[episode])
    ds_chunks = LeRobotDataset(
        repo_id, root=root, episodes=[episode], delta_timestamps=resolve_delta_timestamps(policy.config, ds.meta)
    )
    names = ds.meta.features["action"].get("names") or [f"j{i}" for i in range(6)]
    step = policy.config.n_action_steps
    recorded, predicted, images, times = [], [], [], []
    policy.eval()
    with torch.no_grad():
        for t in range(len(ds)):
            item = ds[t]
            recorded.append(item["action"].numpy())
            times.append(float(item["timestamp"]))
            images.append(
                {k: (item[k].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for k in ds.meta.camera_keys}
            )
            if t % step == 0:
                batch = torch.utils.data.default_collate([ds_chunks[t]])
                g = torch.Generator().manual_seed(derive_seed(seed, t))
                noise = torch.randn(1, policy.config.chunk_size, policy.config.max_action_dim, generator=g)
                chunk = bundle.postprocessor(
                    policy.predict_action_chunk(bundle.preprocessor(batch), noise=noise.to(bundle.device))
                )
                plan = chunk[0].float().cpu().numpy()
            predicted.append(plan[t % step])
    policy.reset()
    rows = []
    for kind, values in (("recorded", np.stack(recorded)), ("predicted", np.stack(predicted))):
        for j, name in enumerate(names):
            rows.append(
                pd.DataFrame(
                    {"frame": np.arange(len(values)), "time": times, "joint": name, "kind": kind, "value": values[:, j]}
                )
            )
    return pd.concat(rows, ignore_index=True), images


def prediction_video(
    frames: pd.DataFrame, images: list[dict[str, np.ndarray]], path: Path, title: str = "", fps: int = 30
) -> Path:
    """Camera frames with the recorded and predicted traces of each joint drawn beside them."""
    from PIL import Image, ImageDraw

    from zk0lib.sim.rollout import write_video

    joints = list(dict.fromkeys(frames["joint"]))
    series = {
        (j, k): frames[(frames.joint == j) & (frames.kind == k)]["value"].to_numpy()
        for j in joints
        for k in _TRACE_COLOURS
    }
    n = len(images)
    cams = np.concatenate(list(images[0].values()), axis=1)
    cam_h, cam_w = max(cams.shape[0], 192), cams.shape[1]
    panel_w, panel_h = 180, cam_h // 3
    width, height = cam_w + 2 * panel_w, cam_h + 18
    out = []
    for t in range(n):
        canvas = Image.new("RGB", (width, height), (20, 20, 24))
        canvas.paste(Image.fromarray(np.concatenate(list(images[t].values()), axis=1)), (0, 18))
        draw = ImageDraw.Draw(canvas)
        draw.text(
            (3, 3), f"{title}  frame {t}/{n - 1}   white: recorded  orange: predicted"[:120], fill=(255, 255, 255)
        )
        for idx, joint in enumerate(joints):
            x0, y0 = cam_w + (idx % 2) * panel_w, 18 + (idx // 2) * panel_h
            both = np.concatenate([series[(joint, k)] for k in _TRACE_COLOURS])
            lo, hi = float(np.nanmin(both)), float(np.nanmax(both))
            span = max(hi - lo, 1e-6)
            draw.rectangle([x0 + 2, y0 + 2, x0 + panel_w - 3, y0 + panel_h - 3], outline=(70, 70, 80))
            draw.text((x0 + 5, y0 + 3), joint.replace(".pos", ""), fill=(180, 180, 190))
            for kind, colour in _TRACE_COLOURS.items():
                ys = series[(joint, kind)][: t + 1]
                pts = [
                    (x0 + 4 + (panel_w - 8) * i / max(n - 1, 1), y0 + panel_h - 5 - (panel_h - 18) * (v - lo) / span)
                    for i, v in enumerate(ys)
                ]
                if len(pts) > 1:
                    draw.line(pts, fill=colour, width=1)
        out.append(np.asarray(canvas))
    return write_video(out, Path(path), fps=fps)


def prediction_videos(run: RunRecord, bundle: Any, episodes_per_client: int = 1, out: Path | None = None) -> list[Path]:
    """For held-out episodes of each client: camera frames with predicted and recorded joint traces."""
    from zk0lib import data

    cfg = run.config()
    out = Path(out or run.path / "videos" / "predictions")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, spec in enumerate(cfg.data.clients):
        client = data.open_client(cfg, i)
        for ep in client.heldout_episodes[:episodes_per_client]:
            frames, images = predicted_actions(bundle, client.repo_id, client.root, ep, seed=cfg.eval.seed)
            frames.to_csv(out / f"{spec.name}-episode{ep:03d}.csv", index=False)
            paths.append(
                prediction_video(
                    frames,
                    images,
                    out / f"{spec.name}-episode{ep:03d}.mp4",
                    f"{spec.name} held-out episode {ep}",
                    fps=int(client.meta.fps),
                )
            )
    return paths


def rollout_videos(run: RunRecord, bundle: Any, episodes: int = 1, out: Path | None = None) -> dict[str, Any]:
    """Closed-loop episodes of the run's policy in each simulated lab of its config, with an mp4 each."""
    from zk0lib.evaluation import lab_rollout, sim_labs
    from zk0lib.runs import write_json

    cfg = run.config()
    out = Path(out or run.path / "videos" / "closed_loop")
    results = {name: lab_rollout(cfg, bundle, spec, out, episodes) for name, (spec, _) in sim_labs(cfg).items()}
    if results:
        write_json(out / "rollouts.json", results)
    return results


def show_videos(paths: list[Path | str], width: int = 560) -> None:
    from IPython.display import HTML, Video, display

    for p in paths:
        display(HTML(f"<b>{Path(p).name}</b>"), Video(str(p), embed=True, width=width))
