"""Dataset checks and repairs, run before training instead of failing hours into it.

Community SO-100/101 datasets break training in known ways: timestamps that violate the 1/fps
tolerance (doubled frames at episode boundaries), time jumps in merged datasets, video packets that
cannot be decoded, NaN actions, joints that never move, clients whose features do not line up. The
checks read the dataset's files directly (parquet, meta, videos), so they also work on datasets that
lerobot would load and then train on silently wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zk0lib import env
from zk0lib.sources import dataset_key

SEVERITIES = ("error", "warning", "info")
DEFAULT_KEYS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
# Findings that make an episode untrustworthy: a repair drops the episode.
EPISODE_ERRORS = ("video.decode", "timestamps.backwards", "timestamps.jump", "values.nonfinite")


class DatasetInvalidError(RuntimeError):
    """Validation found errors and neither data.repair nor data.allow_invalid is set."""


@dataclass
class Finding:
    check: str
    severity: str
    message: str
    fix: str
    client: str = ""
    dataset: str = ""
    episode: int | None = None
    frame: int | None = None  # frame index within the episode
    frames: list[int] = field(default_factory=list)  # every affected frame of the episode, when several


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    checked: list[dict[str, Any]] = field(default_factory=list)  # per dataset: what was read and how long it took

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def extend(self, other: Report) -> Report:
        self.findings += other.findings
        self.checked += other.checked
        return self

    def to_frame(self):
        import pandas as pd

        cols = ["client", "dataset", "episode", "frame", "check", "severity", "message", "fix"]
        rows = [
            {**{c: getattr(f, c) for c in cols}, "frames": len(f.frames) or (1 if f.frame is not None else 0)}
            for f in self.findings
        ]
        df = pd.DataFrame(rows, columns=[*cols, "frames"])
        order = {s: i for i, s in enumerate(SEVERITIES)}
        return df.sort_values(
            ["severity", "client", "episode"], key=lambda c: c.map(order) if c.name == "severity" else c
        ).reset_index(drop=True)

    def table(self, max_rows: int = 40) -> str:
        if not self.findings:
            return "no findings"
        df = self.to_frame()[["client", "episode", "frame", "check", "severity", "message"]]
        text = df.head(max_rows).to_string(index=False, max_colwidth=90)
        more = f"\n... and {len(df) - max_rows} more" if len(df) > max_rows else ""
        return f"{text}{more}\n{len(self.errors)} errors, {len(self.warnings)} warnings"

    def save(self, directory: Path, name: str) -> tuple[Path, Path]:
        from zk0lib.runs import atomic_write_text

        directory = Path(directory)
        csv_path, json_path = directory / f"{name}.csv", directory / f"{name}.json"
        atomic_write_text(csv_path, self.to_frame().to_csv(index=False))
        atomic_write_text(json_path, json.dumps(self.to_dict(), indent=2, default=str))
        return csv_path, json_path

    def to_dict(self) -> dict[str, Any]:
        return {
            "findings": [asdict(f) for f in self.findings],
            "checked": self.checked,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Report:
        return cls([Finding(**f) for f in raw["findings"]], raw.get("checked", []))


# ----------------------------------------------------------------------------- reading the files


@dataclass
class DatasetFiles:
    """A LeRobot v3 dataset as its files say it is."""

    root: Path
    info: dict[str, Any]
    table: Any  # pandas DataFrame of every frame, in file order
    episodes: Any  # pandas DataFrame of meta/episodes
    tasks: dict[int, str]
    stats: dict[str, Any] | None

    @classmethod
    def read(cls, root: Path) -> DatasetFiles:
        import pandas as pd

        root = Path(root)
        info = json.loads((root / "meta" / "info.json").read_text())
        data = sorted((root / "data").rglob("*.parquet"))
        table = pd.concat([pd.read_parquet(p) for p in data], ignore_index=True) if data else pd.DataFrame()
        episodes = pd.concat(
            [pd.read_parquet(p) for p in sorted((root / "meta" / "episodes").rglob("*.parquet"))], ignore_index=True
        )
        tasks_df = (
            pd.read_parquet(root / "meta" / "tasks.parquet") if (root / "meta" / "tasks.parquet").exists() else None
        )
        tasks = (
            {}
            if tasks_df is None
            else {int(i): str(t) for t, i in zip(tasks_df.index, tasks_df["task_index"], strict=True)}
        )
        stats_path = root / "meta" / "stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
        return cls(root, info, table, episodes, tasks, stats)

    @property
    def fps(self) -> float:
        return float(self.info["fps"])

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.info["features"].items() if f.get("dtype") == "video"]

    def vector(self, key: str) -> np.ndarray:
        return np.stack(self.table[key].to_numpy()).astype(np.float64)

    def video_path(self, episode: dict, key: str) -> Path:
        return self.root / self.info["video_path"].format(
            video_key=key,
            chunk_index=int(episode[f"videos/{key}/chunk_index"]),
            file_index=int(episode[f"videos/{key}/file_index"]),
        )


# ----------------------------------------------------------------------------- checks


def validate_dataset(
    root: str | Path,
    name: str = "",
    client: str = "",
    chunk_size: int | None = None,
    decode: str = "full",
    sample_fraction: float = 0.1,
    seed: int = 0,
    action_margin: float = 0.25,
    backend: str | None = None,
) -> Report:
    """All checks on one dataset. `decode`: "full" (every frame of every camera), "sample" (a seeded
    `sample_fraction` of each episode's frames, its first and last always), or "none"."""
    if decode not in ("full", "sample", "none"):
        raise ValueError(f"decode must be full, sample or none (got {decode!r})")
    t0 = time.perf_counter()
    files = DatasetFiles.read(Path(root))
    name = name or files.root.name
    report = Report()

    def add(check: str, severity: str, message: str, fix: str, **where: Any) -> None:
        report.findings.append(Finding(check, severity, message, fix, client=client, dataset=name, **where))

    worst = _check_timestamps(files, add)
    _check_values(files, add, action_margin)
    _check_structure(files, add, chunk_size)
    t_decode = time.perf_counter()
    decoded = _check_videos(files, add, decode, sample_fraction, seed, backend)
    report.checked.append(
        {
            "client": client,
            "dataset": name,
            "root": str(files.root),
            "episodes": len(files.episodes),
            "frames": len(files.table),
            "cameras": files.video_keys,
            "decode": decode,
            "decoded_frames": decoded,
            "decode_seconds": time.perf_counter() - t_decode,
            "seconds": time.perf_counter() - t0,
            "worst_step_deviation_s": worst,
        }
    )
    return report


def _episode_rows(files: DatasetFiles):
    """(episode index, row positions in file order) per episode."""
    ep = files.table["episode_index"].to_numpy()
    for e in sorted(set(ep.tolist())):
        yield int(e), np.flatnonzero(ep == e)


def _check_timestamps(files: DatasetFiles, add: Any) -> dict[int, float]:
    dt = 1.0 / files.fps
    tol = max(1e-4, 0.01 * dt)  # lerobot's default tolerance, or 1% of a frame for float32 timestamps
    ts_all = files.table["timestamp"].to_numpy().astype(np.float64)
    worst: dict[int, float] = {}
    fix_doubled = "repair drops the doubled frames and re-times the episode (--repair / data.repair=true)"
    for ep, rows in _episode_rows(files):
        ts = ts_all[rows]
        frame_index = files.table["frame_index"].to_numpy()[rows]
        steps = np.diff(ts)
        worst[ep] = float(np.max(np.abs(steps - dt))) if len(steps) else 0.0
        back = np.flatnonzero(steps < -tol)
        if len(back):
            add(
                "timestamps.backwards",
                "error",
                f"timestamps go backwards {len(back)} time(s), first at frame "
                f"{back[0] + 1} ({ts[back[0]]:.4f} s -> {ts[back[0] + 1]:.4f} s)",
                "repair drops the episode; or re-export it in time order",
                episode=ep,
                frame=int(back[0] + 1),
                frames=[int(b + 1) for b in back],
            )
        doubled = np.flatnonzero(np.abs(steps) <= tol)
        if len(doubled):
            add(
                "timestamps.doubled",
                "error",
                f"{len(doubled)} doubled frame(s): the timestamp of frame "
                f"{doubled[0] + 1} repeats the previous one ({ts[doubled[0]]:.4f} s)",
                fix_doubled,
                episode=ep,
                frame=int(doubled[0] + 1),
                frames=[int(d + 1) for d in doubled],
            )
        jumps = np.flatnonzero(steps > 1.5 * dt)
        if len(jumps):
            j = jumps[0]
            add(
                "timestamps.jump",
                "error",
                f"{len(jumps)} time jump(s): {steps[j]:.3f} s between frames {j} and "
                f"{j + 1} (~{round(steps[j] / dt) - 1} frames missing)",
                "repair drops the episode; or split it where the time jumps",
                episode=ep,
                frame=int(j + 1),
                frames=[int(x + 1) for x in jumps],
            )
        off = np.flatnonzero((np.abs(steps - dt) > tol) & (np.abs(steps) > tol) & (steps <= 1.5 * dt) & (steps >= -tol))
        if len(off):
            add(
                "timestamps.step",
                "error",
                f"{len(off)} step(s) off 1/fps by more than {tol * 1000:.2f} ms "
                f"(worst {worst[ep] * 1000:.2f} ms at frame {off[0] + 1})",
                fix_doubled,
                episode=ep,
                frame=int(off[0] + 1),
                frames=[int(x + 1) for x in off],
            )
        if not np.array_equal(frame_index, np.arange(len(rows))):
            add(
                "timestamps.frame_index",
                "warning",
                "frame_index is not 0..N-1 in file order",
                "repair rewrites the episode's frame indices",
                episode=ep,
            )
    return worst


def _check_values(files: DatasetFiles, add: Any, margin: float) -> None:
    names = files.info["features"]
    ep_all = files.table["episode_index"].to_numpy()
    fi_all = files.table["frame_index"].to_numpy()
    state = files.vector("observation.state") if "observation.state" in files.table else None
    for key in ("observation.state", "action"):
        if key not in files.table:
            continue
        values = files.vector(key)
        joint_names = names.get(key, {}).get("names") or [str(i) for i in range(values.shape[1])]
        bad = ~np.isfinite(values)
        if bad.any():
            for ep in sorted(set(ep_all[bad.any(axis=1)].tolist())):
                rows = np.flatnonzero((ep_all == ep) & bad.any(axis=1))
                joints = sorted({joint_names[j] for j in np.flatnonzero(bad[rows].any(axis=0))})
                add(
                    "values.nonfinite",
                    "error",
                    f"{len(rows)} frame(s) with NaN/Inf in {key} ({', '.join(joints)})",
                    "repair drops the episode; or fix the recording",
                    episode=int(ep),
                    frame=int(fi_all[rows[0]]),
                    frames=[int(fi_all[r]) for r in rows],
                )
        finite = np.where(bad, np.nan, values)
        spread = np.nanmax(finite, axis=0) - np.nanmin(finite, axis=0)
        for j in np.flatnonzero(spread == 0):
            add(
                "values.dead_joint",
                "warning",
                f"{key} joint {joint_names[j]} never moves (always {np.nanmin(finite[:, j]):.4g})",
                "check the motor and its calibration; a constant input carries no information",
                episode=None,
            )
    if state is not None and "action" in files.table:
        action = files.vector("action")
        lo, hi = np.nanmin(state, axis=0), np.nanmax(state, axis=0)
        pad = margin * np.maximum(hi - lo, 1e-6)
        outside = (action < lo - pad) | (action > hi + pad)
        joint_names = names.get("action", {}).get("names") or [str(i) for i in range(action.shape[1])]
        for ep in sorted(set(ep_all[outside.any(axis=1)].tolist())):
            rows = np.flatnonzero((ep_all == ep) & outside.any(axis=1))
            joints = sorted({joint_names[j] for j in np.flatnonzero(outside[rows].any(axis=0))})
            add(
                "values.action_range",
                "warning",
                f"{len(rows)} action(s) outside the observed state range by more "
                f"than {margin:.0%} of it ({', '.join(joints)})",
                "check the action units and calibration",
                episode=int(ep),
                frame=int(fi_all[rows[0]]),
                frames=[int(fi_all[r]) for r in rows],
            )


def _check_structure(files: DatasetFiles, add: Any, chunk_size: int | None) -> None:
    lengths = {int(e): int(n) for e, n in zip(files.episodes["episode_index"], files.episodes["length"], strict=True)}
    if chunk_size:
        for ep, n in lengths.items():
            if n < chunk_size:
                add(
                    "structure.short_episode",
                    "warning",
                    f"episode of {n} frames is shorter than the policy's "
                    f"action chunk ({chunk_size}): most of its targets would be padding",
                    "leave it out (data.clients.N.episodes) or lower model.chunk_size",
                    episode=ep,
                )
    counted = files.table.groupby("episode_index").size().to_dict()
    for ep, n in lengths.items():
        if counted.get(ep, 0) != n:
            add(
                "structure.length",
                "error",
                f"meta says {n} frames, the data holds {counted.get(ep, 0)}",
                "repair rewrites the episode",
                episode=ep,
            )
    for ep, task_index in files.table.groupby("episode_index")["task_index"].first().items():
        if not files.tasks.get(int(task_index), "").strip():
            add(
                "structure.task",
                "error",
                f"episode has no task string (task_index {task_index})",
                "give every episode its instruction (meta/tasks.parquet)",
                episode=int(ep),
            )
    if files.stats is None:
        add("structure.stats_missing", "error", "meta/stats.json is missing", "repair recomputes the stats")
        return
    for key in ("observation.state", "action"):
        if key not in files.table:
            continue
        if key not in files.stats:
            add("structure.stats_missing", "error", f"no stats for {key}", "repair recomputes the stats")
            continue
        values = files.vector(key)
        values = values[np.isfinite(values).all(axis=1)]
        stored_mean, stored_std = np.asarray(files.stats[key]["mean"]), np.asarray(files.stats[key]["std"])
        scale = np.maximum(values.std(axis=0), 1e-3)
        drift = np.max(np.abs(values.mean(axis=0) - stored_mean) / scale)
        drift_std = np.max(np.abs(values.std(axis=0) - stored_std) / scale)
        if drift > 0.01 or drift_std > 0.01:
            add(
                "structure.stats_stale",
                "warning",
                f"stored {key} stats do not match the data (mean off by "
                f"{drift:.2f} std, std off by {drift_std:.2f} std)",
                "repair recomputes the stats",
            )


def _check_videos(files: DatasetFiles, add: Any, decode: str, fraction: float, seed: int, backend: str | None) -> int:
    """Decode the frames each episode's rows point at; report the frames that do not decode."""
    if decode == "none" or not files.video_keys:
        return 0
    from lerobot.datasets.video_utils import decode_video_frames

    from zk0lib.sim.record import RECORD_INFO

    rng = np.random.default_rng(seed)
    ts_all = files.table["timestamp"].to_numpy().astype(np.float64)
    fi_all = files.table["frame_index"].to_numpy()
    tol = max(1e-4, 0.01 / files.fps)
    decoded = 0
    episodes = {int(r["episode_index"]): r for r in files.episodes.to_dict("records")}
    # A simulated lab's cameras are rendered: no noise, so a view that holds still (the wrist camera while
    # the arm carries the cube over the plain table) repeats its frame exactly, as only a stalled stream
    # does on a real camera, whose sensor noise changes every frame. They are not judged for stalls, and
    # their frames are not compared.
    judge_stalls = decode == "full" and not (files.root / RECORD_INFO).exists()
    for ep, rows in _episode_rows(files):
        picks = np.arange(len(rows))
        if decode == "sample" and len(rows) > 2:
            k = max(2, math.ceil(fraction * len(rows)))
            picks = np.unique(np.concatenate([[0, len(rows) - 1], rng.choice(len(rows), k, replace=False)]))
        for key in files.video_keys:
            meta = episodes.get(ep)
            if meta is None:
                add(
                    "video.decode",
                    "error",
                    f"{key}: episode missing from meta/episodes",
                    "repair drops the episode",
                    episode=ep,
                )
                continue
            path = files.video_path(meta, key)
            if not path.exists():
                add(
                    "video.decode",
                    "error",
                    f"{key}: video file {path.name} is missing",
                    "repair drops the episode",
                    episode=ep,
                )
                continue
            start = float(meta[f"videos/{key}/from_timestamp"])
            failed: list[int] = []
            first_error = ""
            change = np.full(len(rows), np.inf)  # mean |frame - previous frame| (judge_stalls only)
            previous = None
            for chunk in np.array_split(picks, max(1, math.ceil(len(picks) / 64))):
                stamps = [float(start + ts_all[rows[i]]) for i in chunk]
                try:
                    frames = decode_video_frames(path, stamps, tol, backend)
                    if judge_stalls:  # the frozen-camera check compares each frame with the one before
                        frames = frames.float()
                        joined = frames if previous is None else torch.cat([previous, frames])
                        steps = (joined[1:] - joined[:-1]).abs().flatten(1).mean(1).numpy()
                        change[chunk[len(chunk) - len(steps) :]] = steps
                        previous = frames[-1:]
                except Exception:  # noqa: BLE001 - find which frames of the chunk fail, one by one
                    previous = None
                    for i, stamp in zip(chunk, stamps, strict=True):
                        try:
                            decode_video_frames(path, [stamp], tol, backend)
                        except Exception as e:  # noqa: BLE001
                            failed.append(int(fi_all[rows[i]]))
                            first_error = first_error or f"{type(e).__name__}: {str(e).splitlines()[-1][:160]}"
                decoded += len(chunk)
            if judge_stalls and not failed:
                _check_frozen(files, add, ep, key, rows, change)
            if failed:
                add(
                    "video.decode",
                    "error",
                    f"{key}: {len(failed)} frame(s) do not decode, first {failed[0]} ({first_error})",
                    "repair drops the episode; or re-encode the video",
                    episode=ep,
                    frame=failed[0],
                    frames=failed,
                )
    return decoded


FROZEN_CHANGE = 0.5 / 255  # mean |difference| of two decoded frames below which they are the same image
FROZEN_MOTION_DEG = 5.0  # the arm moved at least this much (a joint, over the run) while the image did not


def _check_frozen(files: DatasetFiles, add: Any, ep: int, key: str, rows: np.ndarray, change: np.ndarray) -> None:
    """Runs of identical consecutive frames in one camera while the arm moves: a stalled camera stream (a USB
    camera that drops out records its last frame again and again). A still scene is not flagged: the joints
    that carry the arm through space (not the gripper or the wrist's roll, which a camera may not see) must
    move over the run, by 5 degrees (a few degrees can leave a small or coarse image unchanged). Runs shorter
    than a third of a second (at least 10 frames) are left alone."""
    if "observation.state" not in files.table:
        return
    state = np.stack(files.table["observation.state"].to_numpy()[rows]).astype(np.float64)
    names = files.info["features"]["observation.state"].get("names") or []
    if isinstance(names, list) and len(names) == state.shape[1]:  # the joints that move the arm through space
        moving = [i for i, n in enumerate(names) if "gripper" not in str(n) and "roll" not in str(n)]
        state = state[:, moving] if moving else state
    frame_index = files.table["frame_index"].to_numpy()[rows]
    shortest = max(10, int(files.fps / 3))
    same = change < FROZEN_CHANGE
    i = 0
    while i < len(same):
        if not same[i]:
            i += 1
            continue
        j = i
        while j < len(same) and same[j]:
            j += 1
        first, last = i - 1, j - 1  # frame i repeats frame i-1: the run starts one frame earlier
        if last - first + 1 >= shortest:
            moved = float((state[first : last + 1].max(0) - state[first : last + 1].min(0)).max())
            if moved >= FROZEN_MOTION_DEG:
                frames = [int(f) for f in frame_index[first : last + 1]]
                add(
                    "video.frozen",
                    "warning",
                    f"{key}: {len(frames)} identical frames in a row ({frames[0]}-{frames[-1]}) while the arm "
                    f"moved {moved:.1f} deg: the camera's stream stalled",
                    "check the camera's connection; drop the episode, or its frozen frames, from training",
                    episode=ep,
                    frame=frames[0],
                    frames=frames,
                )
        i = j


# ----------------------------------------------------------------------------- across clients


def compare_features(datasets: dict[str, dict[str, Any]], rename_map: dict[str, str]) -> Report:
    """Clients must agree on state/action shapes and joint names, fps, and (renamed) cameras.

    `datasets`: client name -> its info.json."""
    report = Report()
    names = list(datasets)
    if not names:
        return report
    ref = names[0]

    def sig(info: dict[str, Any]) -> dict[str, Any]:
        f = info["features"]
        return {
            "fps": info["fps"],
            "observation.state": (
                list(f.get("observation.state", {}).get("shape", [])),
                f.get("observation.state", {}).get("names"),
            ),
            "action": (list(f.get("action", {}).get("shape", [])), f.get("action", {}).get("names")),
            "cameras": sorted(rename_map.get(k, k) for k, v in f.items() if v.get("dtype") in ("video", "image")),
        }

    base = sig(datasets[ref])
    for name in names[1:]:
        other = sig(datasets[name])
        for key, value in other.items():
            if value != base[key]:
                check = "clients.cameras" if key == "cameras" else "clients.fps" if key == "fps" else "clients.features"
                fix = (
                    "map camera keys onto common names with data.rename_map"
                    if key == "cameras"
                    else "leave this client out, or convert its dataset to the others' layout"
                )
                report.findings.append(
                    Finding(
                        check, "error", f"{key} = {value} but {ref} has {base[key]}", fix, client=name, dataset=name
                    )
                )
    return report


def validate_clients(
    cfg: Any, decode: str | None = None, fraction: float | None = None, sources: bool = False
) -> Report:
    """Every client dataset (and evaluation-only one) of a config, then the checks across clients.

    By default the datasets training would read (repaired copies with data.repair); `sources=True`
    checks the sources themselves."""
    from zk0lib.sources import dataset_location, hub_root, source_location

    locate = source_location if sources else dataset_location
    report = Report()
    infos = {}
    for spec in [*cfg.data.clients, *cfg.data.eval_only]:
        _, root = locate(cfg, spec)
        root = root if root is not None else hub_root(spec.repo_id)
        report.extend(validate_cached(cfg, spec.name, root, decode, fraction))
        info = json.loads((root / "meta" / "info.json").read_text())
        info["features"] = {spec.rename_map.get(k, k): v for k, v in info["features"].items()}  # as it trains
        infos[spec.name] = info
    return report.extend(compare_features(infos, cfg.data.rename_map))


def config_for_datasets(cfg: Any, items: list[str]) -> Any:
    """`cfg` with one client per dataset named on the command line (a folder, or a Hub id in the local cache)
    and no evaluation-only ones: for a robot owner checking datasets without a preset."""
    from zk0lib.config import ClientConfig
    from zk0lib.sources import hub_root

    clients, seen = [], set()
    for item in items:
        path = Path(item).expanduser()
        if path.exists():
            if not (path / "meta" / "info.json").exists():
                raise ValueError(f"{item}: not a LeRobot dataset folder (it has no meta/info.json)")
            name, spec = path.name, {"source": "local", "root": str(path.resolve()), "repo_id": f"local/{path.name}"}
        elif item.count("/") == 1 and not item.startswith((".", "/")):
            if not (hub_root(item) / "meta" / "info.json").exists():
                raise ValueError(
                    f"{item}: no such folder, and not in the local dataset cache ({hub_root(item)}). Download it "
                    f"first: huggingface-cli download --repo-type dataset {item} --local-dir {hub_root(item)}"
                )
            name, spec = item.split("/")[1], {"source": "hub", "repo_id": item}
        else:
            raise ValueError(f"{item}: no such folder, and not a Hub dataset id (user/name)")
        unique, n = name, 2
        while unique in seen:
            unique, n = f"{name}-{n}", n + 1
        seen.add(unique)
        clients.append(ClientConfig(name=unique, **spec))
    cfg.data.clients, cfg.data.eval_only = clients, []
    return cfg


def check_before_training(cfg: Any, progress: Any = None) -> Report | None:
    """Validate the config's datasets; repair them with data.repair; refuse errors unless data.allow_invalid."""
    from zk0lib.sources import hub_root, repaired_root, source_location

    if cfg.data.validate == "off":
        return None
    report = validate_clients(cfg, sources=True)
    if report.errors and cfg.data.repair:
        broken = {f.client for f in report.errors if not f.check.startswith("clients.")}
        for spec in [*cfg.data.clients, *cfg.data.eval_only]:
            if spec.name not in broken:
                continue
            repo_id, root = source_location(cfg, spec)
            root = root if root is not None else hub_root(repo_id)
            dest = repaired_root(cfg.cache_dir, spec.name, root)
            if not (dest / "meta" / "info.json").exists():
                if progress is not None:
                    progress(f"repairing {spec.name} -> {dest}")
                full = validate_dataset(root, client=spec.name, chunk_size=cfg.model.chunk_size, decode="full")
                repair_dataset(root, dest, full, repo_id=repo_id or "zk0/repaired")
        report = validate_clients(cfg)
    if report.errors and not cfg.data.allow_invalid:
        hint = "" if cfg.data.repair else " --set data.repair=true trains on repaired copies;"
        raise DatasetInvalidError(
            f"the datasets have {len(report.errors)} errors; training would use them silently wrong:\n"
            f"{report.table()}\nRun `zk0 validate` for the full table;{hint} --set data.allow_invalid=true "
            "trains anyway."
        )
    return report


def validate_cached(
    cfg: Any, name: str, root: Path, decode: str | None = None, fraction: float | None = None
) -> Report:
    """validate_dataset, remembered under data_cache/validation (keyed by the dataset's files and options)."""
    decode = decode or {"off": "none"}.get(cfg.data.validate, cfg.data.validate)
    fraction = cfg.data.validate_fraction if fraction is None else fraction
    key = dataset_key(root) + json.dumps([decode, fraction, cfg.model.chunk_size, VALIDATOR_VERSION])
    path = cfg.cache_dir / "validation" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    if path.exists():
        return Report.from_dict(json.loads(path.read_text()))
    report = validate_dataset(
        root,
        name=Path(root).name,
        client=name,
        chunk_size=cfg.model.chunk_size,
        decode=decode,
        sample_fraction=fraction,
        seed=cfg.seed,
    )
    from zk0lib.runs import atomic_write_text

    atomic_write_text(path, json.dumps(report.to_dict(), default=str))
    return report


VALIDATOR_VERSION = 4  # 2: the frozen-camera check; 3: its thresholds; 4: not on rendered cameras


# ----------------------------------------------------------------------------- repairs


@dataclass
class Repair:
    source: Path
    root: Path
    dropped_episodes: list[int]
    dropped_frames: dict[int, list[int]]
    recomputed_stats: bool
    seconds: float


def repair_dataset(
    source: str | Path, dest: str | Path, report: Report | None = None, repo_id: str = "zk0/repaired"
) -> Repair:
    """A corrected copy of `source` at `dest` (the source is never touched):

    - episodes with undecodable video, time jumps, backwards time or NaN/Inf values are dropped;
    - doubled frames are dropped and their episodes re-timed (frames at exactly 1/fps);
    - stats are recomputed.
    Episodes that change are rewritten frame by frame (video re-encoded); a copy whose only problem is
    its stats keeps its files and gets new stats.
    """
    t0 = time.perf_counter()
    source, dest = Path(source), Path(dest)
    report = report or validate_dataset(source, decode="full")
    drop = sorted({f.episode for f in report.errors if f.check in EPISODE_ERRORS and f.episode is not None})
    doubled = {f.episode: f.frames for f in report.errors if f.check == "timestamps.doubled"}
    rewrite_checks = ("timestamps.doubled", "timestamps.step", "timestamps.frame_index", "structure.length")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    from zk0lib.env import native_stderr_to

    with native_stderr_to(tmp.parent / "repair.log"):
        if drop or any(f.check in rewrite_checks for f in report.findings):
            _rewrite(source, tmp, drop, doubled, repo_id)
        else:
            shutil.copytree(source, tmp)
            _recompute_stats(tmp, repo_id)
    (tmp / "zk0_repair.json").write_text(
        json.dumps(
            {
                "source": str(source),
                "dropped_episodes": drop,
                "dropped_frames": {str(k): v for k, v in doubled.items()},
            },
            indent=2,
        )
    )
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return Repair(source, dest, drop, doubled, True, time.perf_counter() - t0)


def _recompute_stats(root: Path, repo_id: str) -> None:
    from lerobot.datasets.dataset_tools import recompute_stats
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    recompute_stats(LeRobotDataset(repo_id, root=root))


def _rewrite(source: Path, dest: Path, drop: list[int], doubled: dict[int, list[int]], repo_id: str) -> None:
    """Copy every kept frame through lerobot's writer: new timestamps, new videos, new stats."""
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    files = DatasetFiles.read(source)
    src = LeRobotDataset(repo_id, root=source)
    features = {k: dict(v) for k, v in files.info["features"].items() if k not in DEFAULT_KEYS}
    for f in features.values():
        f["shape"] = tuple(f["shape"])
        f.pop("info", None)
    dst = LeRobotDataset.create(
        repo_id=repo_id,
        fps=int(files.fps),
        features=features,
        root=dest,
        robot_type=files.info.get("robot_type"),
        use_videos=bool(files.video_keys),
    )
    for ep, rows in _episode_rows(files):
        if ep in drop:
            continue
        skip = set(doubled.get(ep, []))
        for position, row in enumerate(rows):
            if position in skip:
                continue
            item = src[int(row)]  # row position = position in lerobot's table (both read the files in order)
            frame = {"task": item["task"]}
            for key, spec in features.items():
                value = item[key]
                if spec["dtype"] in ("video", "image"):
                    value = (value.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
                frame[key] = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            dst.add_frame(frame)
        env.save_episode(dst)
    env.finalize(dst)
    shutil.rmtree(dest / "images", ignore_errors=True)
