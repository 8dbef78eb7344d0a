"""The reference policy: a small MLP told where the cube and the target are, trained on a preset's client
datasets and rolled out in the labs. It calibrates the benchmark (as low-dim policies do in robomimic):
what the demonstrations and the task allow a policy that does not have to see. A camera policy that
fails where it succeeds lacks vision or samples, not data.

Input: the 6 joint positions and `observation.environment_state` (cube and target positions, recorded by
the simulator), at the episode's start (`environment=start`), at every frame (`live`) or not at all
(`none`: a blind calibration). Output: the next `chunk` frames of joint targets, of which the first
`n_action_steps` are played before it predicts again. Two heads share the network: `mse` regresses the
chunk; `flow` learns SmolVLA's objective (flow matching: x_t = t*noise + (1-t)*action, velocity target
noise - action, t ~ Beta(1.5, 1), Euler steps from noise at inference), so the two can be compared at
the same sample budgets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

ENV_KEY = "observation.environment_state"
HEADS = ("mse", "flow")
ENVIRONMENTS = ("start", "live", "none")


@dataclass
class ReferenceSpec:
    head: str = "mse"  # mse | flow
    environment: str = "start"  # start | live | none
    chunk: int = 12  # frames predicted per call (4 of the expert's 10 Hz decisions)
    n_action_steps: int = 12  # frames played open loop before predicting again
    width: int = 256
    hidden_layers: int = 2
    samples: int = 768_000  # samples seen in training (steps x batch_size)
    batch_size: int = 256
    lr: float = 1e-3
    denoise_steps: int = 5  # Euler steps of the flow head at inference
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.head not in HEADS:
            problems.append(f"head must be one of {', '.join(HEADS)} (got {self.head!r})")
        if self.environment not in ENVIRONMENTS:
            problems.append(f"environment must be one of {', '.join(ENVIRONMENTS)} (got {self.environment!r})")
        if not 1 <= self.n_action_steps <= self.chunk:
            problems.append(f"n_action_steps must be in 1..chunk={self.chunk} (got {self.n_action_steps})")
        for name in ("width", "hidden_layers", "samples", "batch_size", "denoise_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if problems:
            raise ValueError("reference policy: " + "; ".join(problems))

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.samples / self.batch_size))

    @property
    def label(self) -> str:
        return f"{self.head} {self.environment} chunk {self.chunk}/{self.n_action_steps} {self.samples:,} samples"


# ----------------------------------------------------------------------------- data


@dataclass
class Frames:
    """Every frame of some episodes: state, environment state and the next `chunk` actions (padded with
    the episode's last action)."""

    state: np.ndarray  # (N, 6)
    environment: np.ndarray  # (N, E): at that frame
    start: np.ndarray  # (N, E): at its episode's first frame
    chunks: np.ndarray  # (N, chunk, 6)

    def inputs(self, environment: str) -> np.ndarray:
        if environment == "none":
            return self.state
        return np.concatenate([self.state, self.start if environment == "start" else self.environment], axis=1)

    @staticmethod
    def concat(parts: list[Frames]) -> Frames:
        return Frames(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("state", "environment", "start", "chunks"))
        )


def read_frames(repo_id: str, root: Any, episodes: list[int], chunk: int) -> Frames:
    """The frames of `episodes` of a LeRobot dataset, from its parquet files (no video is decoded)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(repo_id, root=root, episodes=episodes)
    if ENV_KEY not in ds.meta.features:
        raise ValueError(
            f"dataset {repo_id!r} ({root}) has no {ENV_KEY}: the reference policy needs the cube's and target's "
            "positions. Simulated labs record them since recorder version 2 (`zk0 sim record` or any zk0 command "
            "records them again); real datasets do not have them"
        )
    table = ds.hf_dataset.with_format("numpy")
    state = np.asarray(table["observation.state"], np.float32)
    action = np.asarray(table["action"], np.float32)
    env = np.asarray(table[ENV_KEY], np.float32)
    episode = np.asarray(table["episode_index"])
    parts = []
    for ep in episodes:
        rows = np.flatnonzero(episode == ep)
        if len(rows) == 0:
            continue
        a = action[rows]
        padded = np.concatenate([a, np.repeat(a[-1:], chunk, axis=0)])
        windows = np.stack([padded[t : t + chunk] for t in range(len(rows))])
        parts.append(Frames(state[rows], env[rows], np.repeat(env[rows[:1]], len(rows), axis=0), windows))
    if not parts:
        raise ValueError(f"dataset {repo_id!r}: none of episodes {episodes} has frames")
    return Frames.concat(parts)


def client_frames(cfg: Any, chunk: int) -> tuple[Frames, Frames]:
    """(training, held-out) frames of the preset's client datasets, with the federation's episode split."""
    from zk0lib import data

    train, held = [], []
    for i in range(len(cfg.data.clients)):
        c = data.open_client(cfg, i)
        train.append(read_frames(c.repo_id, c.root, c.train_episodes, chunk))
        held.append(read_frames(c.repo_id, c.root, c.heldout_episodes, chunk))
    return Frames.concat(train), Frames.concat(held)


# ----------------------------------------------------------------------------- the policy


def _time_features(t: torch.Tensor, n: int = 8) -> torch.Tensor:
    freqs = torch.pi * 2.0 ** torch.arange(n, dtype=t.dtype)
    return torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)


class ReferencePolicy(torch.nn.Module):
    """The MLP with its normalization, and the `reset` / `select_action` interface the rollout uses."""

    needs_images = False  # the rollout renders nothing for it

    def __init__(self, spec: ReferenceSpec, x_stats: np.ndarray, y_stats: np.ndarray):
        super().__init__()
        self.spec = spec
        self.register_buffer("x_stats", torch.as_tensor(x_stats, dtype=torch.float32))  # (2, D): mean, std
        self.register_buffer("y_stats", torch.as_tensor(y_stats, dtype=torch.float32))  # (2, chunk*6)
        d_in, d_out = self.x_stats.shape[1], self.y_stats.shape[1]
        if spec.head == "flow":
            d_in += d_out + 16
        layers: list[torch.nn.Module] = []
        for i in range(spec.hidden_layers):
            layers += [torch.nn.Linear(d_in if i == 0 else spec.width, spec.width), torch.nn.GELU()]
        layers.append(torch.nn.Linear(spec.width, d_out))
        self.net = torch.nn.Sequential(*layers)
        self._queue: list[np.ndarray] = []
        self._start: torch.Tensor | None = None

    # -- training (normalized units)
    def loss(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.spec.head == "mse":
            return torch.nn.functional.mse_loss(self.net(x), y)
        noise = torch.randn(y.shape, generator=g)
        t = torch.distributions.Beta(1.5, 1.0).sample((len(y),)) * 0.999 + 0.001
        x_t = t[:, None] * noise + (1 - t[:, None]) * y
        v = self.net(torch.cat([x, x_t, _time_features(t)], dim=1))
        return torch.nn.functional.mse_loss(v, noise - y)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        """Normalized inputs -> chunks in dataset units, (B, chunk, 6)."""
        if self.spec.head == "mse":
            y = self.net(x)
        else:
            y = torch.randn((len(x), self.y_stats.shape[1]), generator=g)
            n = self.spec.denoise_steps
            for k in range(n):
                t = torch.full((len(x),), 1.0 - k / n)
                y = y - self.net(torch.cat([x, y, _time_features(t)], dim=1)) / n
        y = y * self.y_stats[1] + self.y_stats[0]
        return y.reshape(len(x), self.spec.chunk, -1)

    def normalize(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        return (torch.as_tensor(x, dtype=torch.float32) - self.x_stats[0]) / self.x_stats[1]

    # -- closed loop
    def reset(self) -> None:
        self._queue, self._start = [], None

    @torch.no_grad()
    def select_action(self, batch: dict[str, Any]) -> torch.Tensor:
        if self._start is None and self.spec.environment != "none":
            self._start = batch[ENV_KEY].reshape(1, -1).float().cpu()
        if not self._queue:
            state = batch["observation.state"].reshape(1, -1).float().cpu()
            if self.spec.environment == "none":
                x = state
            else:
                env = self._start if self.spec.environment == "start" else batch[ENV_KEY].reshape(1, -1).float().cpu()
                x = torch.cat([state, env], dim=1)
            chunk = self.predict(self.normalize(x))[0].numpy()  # the rollout seeds torch per episode
            self._queue = list(chunk[: self.spec.n_action_steps])
        return torch.from_numpy(self._queue.pop(0)).unsqueeze(0)


def train_reference(
    spec: ReferenceSpec, frames: Frames, progress: Callable[[int, int, float], None] | None = None
) -> tuple[ReferencePolicy, dict[str, Any]]:
    """Train on `frames`: AdamW with cosine decay, seeded batches drawn with replacement."""
    x = frames.inputs(spec.environment)
    y = frames.chunks.reshape(len(frames.chunks), -1)
    stats = [np.stack([a.mean(0), np.maximum(a.std(0), 1e-3)]) for a in (x, y)]
    torch.manual_seed(spec.seed)
    policy = ReferencePolicy(spec, *stats)
    tx, ty = policy.normalize(x), (torch.from_numpy(y) - policy.y_stats[0]) / policy.y_stats[1]
    optimizer = torch.optim.AdamW(policy.parameters(), spec.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, spec.steps)
    g = torch.Generator().manual_seed(spec.seed)
    t0, losses = time.perf_counter(), []
    every = max(1, spec.steps // 10)
    for step in range(1, spec.steps + 1):
        idx = torch.randint(len(tx), (spec.batch_size,), generator=g)
        loss = policy.loss(tx[idx], ty[idx], g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None and (step % every == 0 or step == spec.steps):
            progress(step, spec.steps, float(np.mean(losses[-every:])))
    policy.eval()
    return policy, {
        "steps": spec.steps,
        "final_loss": float(np.mean(losses[-every:])),
        "seconds": time.perf_counter() - t0,
    }


def chunk_error(policy: ReferencePolicy, frames: Frames, seed: int = 0) -> list[float]:
    """Mean absolute error per joint (degrees; gripper 0-100) of the predicted chunks' played part on
    held-out frames: the offline proxy of closed-loop success."""
    g = torch.Generator().manual_seed(seed)
    pred = policy.predict(policy.normalize(frames.inputs(policy.spec.environment)), g).numpy()
    n = policy.spec.n_action_steps
    return np.abs(pred[:, :n] - frames.chunks[:, :n]).mean(axis=(0, 1)).tolist()


# ----------------------------------------------------------------------------- the calibration table


def closed_loop(
    policy: Any,
    labs: list[str],
    episodes: int,
    seed: int = 0,
    max_frames: int | None = None,
    pooled: list[str] | None = None,
    **rollout_kwargs: Any,
) -> dict:
    """`episodes` rollouts per lab on the rollout's own seeds: per-lab summaries and the pooled success of
    the `pooled` labs (default: every lab but the unseen one), with its Wilson interval and stages.
    `rollout_kwargs` go to `rollout` (processors, image_size, cache_dir, device)."""
    from zk0lib.sim.env import STAGES
    from zk0lib.sim.labs import UNSEEN_LAB
    from zk0lib.sim.rollout import MAX_FRAMES, rollout, wilson_interval

    processors = rollout_kwargs.pop("processors", None)
    per_lab = {}
    for lab in labs:
        result = rollout(
            policy, processors, lab, episodes, seed=seed, max_frames=max_frames or MAX_FRAMES, **rollout_kwargs
        )
        per_lab[lab] = result["summary"]
    pooled = [lab for lab in labs if lab != UNSEEN_LAB] if pooled is None else pooled
    clients = [per_lab[lab] for lab in pooled]
    wins = sum(round(s["success_rate"] * s["episodes"]) for s in clients)
    n = sum(s["episodes"] for s in clients)
    stages = {st: sum(s["stage_counts"][st] for s in clients) for st in STAGES}
    return {
        "labs": per_lab,
        "pooled": {"successes": wins, "episodes": n, "success_rate": wins / n if n else float("nan")}
        | {"success_ci": list(wilson_interval(wins, n)), "stage_counts": stages},
    }


def reference_table(rows: list[dict]) -> str:
    """The rows as a markdown table (pooled client labs, lab-unseen, chunk error, samples, time)."""
    from zk0lib.sim.labs import UNSEEN_LAB

    head = "| policy | client labs pooled | stages (none/reached/grasped/lifted/placed) | lab-unseen |"
    head += " held-out chunk error, arm joints (deg) / gripper | samples | wall time |\n"
    out = head + "|" + "---|" * 7 + "\n"
    for r in rows:
        p = r["closed_loop"]["pooled"]
        lo, hi = p["success_ci"]
        stages = "/".join(str(v) for v in p["stage_counts"].values())
        unseen = r["closed_loop"]["labs"].get(UNSEEN_LAB)
        u = f"{round(unseen['success_rate'] * unseen['episodes'])}/{unseen['episodes']}" if unseen else "-"
        err = r.get("chunk_error")
        e = f"{', '.join(f'{v:.1f}' for v in err[:5])} / {err[5]:.1f}" if err else "-"
        samples = f"{r['spec']['samples']:,}" if r.get("spec") else "-"
        out += (
            f"| {r['name']} | {p['successes']}/{p['episodes']} [{lo:.0%}, {hi:.0%}] | {stages} | {u} | {e} |"
            f" {samples} | {r['seconds'] / 60:.1f} min |\n"
        )
    return out


def proxy_check(rows: list[dict]) -> dict[str, Any]:
    """Does the held-out chunk error (arm joints) rank the trained rows as closed-loop success does?"""
    trained = [r for r in rows if r.get("chunk_error")]
    if len(trained) < 3:
        return {"rows": len(trained), "spearman": None}
    import pandas as pd

    err = pd.Series([float(np.mean(r["chunk_error"][:5])) for r in trained])
    success = pd.Series([r["closed_loop"]["pooled"]["success_rate"] for r in trained])
    return {"rows": len(trained), "spearman": float(err.corr(success, method="spearman"))}


def spec_dict(spec: ReferenceSpec) -> dict[str, Any]:
    return asdict(spec) | {"steps": spec.steps}


def preset_labs(cfg: Any) -> list[str]:
    """The preset's client labs, then lab-unseen (no client trains on it)."""
    from zk0lib.config import ConfigError
    from zk0lib.sim.labs import UNSEEN_LAB

    labs = [c.lab for c in cfg.data.clients if c.source == "sim"]
    if len(labs) != len(cfg.data.clients):
        raise ConfigError(
            f"preset {cfg.preset!r}: the reference policy trains on simulated labs only (data.clients source=sim); "
            "use --preset demo or study"
        )
    return [*labs, UNSEEN_LAB]


def calibrate(
    cfg: Any,
    specs: list[ReferenceSpec],
    episodes: int,
    out: Any,
    baselines: bool = True,
    max_frames: int | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The calibration table of a preset: the expert and hold-still, then one trained reference policy per
    spec, each rolled out `episodes` times (of `max_frames`, default the preset's eval.rollout_max_frames) in
    every client lab and lab-unseen. Written to
    out/reference.json and out/reference.md after every row (a stopped run keeps its finished rows)."""
    import json
    from pathlib import Path

    from zk0lib.runs import atomic_write_text
    from zk0lib.sim.rollout import HoldStillPolicy, ScriptedExpertPolicy

    labs = preset_labs(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    max_frames = max_frames or cfg.eval.rollout_max_frames
    record: dict[str, Any] = {"preset": cfg.preset, "labs": labs, "episodes_per_lab": episodes, "command": command}
    record["rows"] = []

    def add(row: dict[str, Any]) -> None:
        record["rows"].append(row)
        record["proxy"] = proxy_check(record["rows"])
        atomic_write_text(out / "reference.json", json.dumps(record, indent=2))
        atomic_write_text(out / "reference.md", reference_table(record["rows"]))
        p = row["closed_loop"]["pooled"]
        lo, hi = p["success_ci"]
        log(
            f"{row['name']}: client labs {p['successes']}/{p['episodes']} [{lo:.0%}, {hi:.0%}] ({row['seconds'] / 60:.1f} min)"
        )

    if baselines:
        for name, policy in (("scripted expert", ScriptedExpertPolicy()), ("hold still", HoldStillPolicy())):
            t0 = time.perf_counter()
            loop = closed_loop(policy, labs, episodes, cfg.seed, max_frames)
            add({"name": name, "closed_loop": loop, "seconds": time.perf_counter() - t0})
    frames: dict[int, tuple[Frames, Frames]] = {}
    for spec in specs:
        t0 = time.perf_counter()
        if spec.chunk not in frames:
            frames[spec.chunk] = client_frames(cfg, spec.chunk)
        train, held = frames[spec.chunk]
        log(f"{spec.label}: training on {len(train.state):,} frames, {spec.steps:,} steps of {spec.batch_size}")
        policy, fit = train_reference(
            spec, train, lambda step, steps, loss: log(f"  step {step:,}/{steps:,}: loss {loss:.4f}")
        )
        error = chunk_error(policy, held, spec.seed)
        loop = closed_loop(policy, labs, episodes, cfg.seed, max_frames)
        row = {"name": f"reference {spec.label}", "spec": spec_dict(spec), "train": fit, "chunk_error": error}
        add(row | {"heldout_frames": len(held.state), "closed_loop": loop, "seconds": time.perf_counter() - t0})
    return record


def inference_variants(
    cfg: Any,
    folder: Any,
    variants: list[dict[str, int | None]],
    episodes: int,
    out: Any,
    device: str = "cpu",
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """A saved SmolVLA policy rolled out in every client lab and lab-unseen of the preset, once per
    inference variant (`n_action_steps`: frames of a chunk played before predicting again; `denoise_steps`:
    Euler steps from noise; None keeps the saved value). Same seeds, image size and episode length as the
    runs' own closed-loop evaluation, so the saved settings reproduce a run's final rollout. Written to
    out/variants.json and .md after every row."""
    import json
    from pathlib import Path

    from zk0lib.config import ConfigError
    from zk0lib.model import load_policy
    from zk0lib.runs import atomic_write_text

    bundle = load_policy(folder, device)
    policy = bundle.policy
    saved = {"n_action_steps": policy.config.n_action_steps, "denoise_steps": policy.config.num_steps}
    for v in variants:
        n, k = v.get("n_action_steps"), v.get("denoise_steps")
        if n is not None and not 1 <= n <= policy.config.chunk_size:
            raise ConfigError(
                f"n_action_steps={n}: the policy in {folder} predicts chunks of {policy.config.chunk_size} frames; "
                f"play between 1 and {policy.config.chunk_size} of them"
            )
        if k is not None and k < 1:
            raise ConfigError(f"denoise_steps={k}: at least one Euler step is needed")
    labs = preset_labs(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "preset": cfg.preset,
        "policy": str(folder),
        "saved": saved,
        "labs": labs,
        "episodes_per_lab": episodes,
        "command": command,
        "rows": [],
    }
    try:
        for v in variants:
            n = v.get("n_action_steps") or saved["n_action_steps"]
            k = v.get("denoise_steps") or saved["denoise_steps"]
            policy.config.n_action_steps, policy.config.num_steps = n, k  # both read at use; reset() resizes the queue
            name = f"play {n} of {policy.config.chunk_size}, {k} denoising steps"
            log(f"{name}: {episodes} episodes in each of {', '.join(labs)}")
            t0 = time.perf_counter()
            loop = closed_loop(
                policy,
                labs,
                episodes,
                cfg.eval.seed,
                cfg.eval.rollout_max_frames,
                processors=(bundle.preprocessor, bundle.postprocessor),
                image_size=cfg.data.sim_image_size,
                cache_dir=cfg.cache_dir,
                device=bundle.device,
            )
            seconds = time.perf_counter() - t0
            record["rows"].append(
                {"name": name, "n_action_steps": n, "denoise_steps": k, "closed_loop": loop, "seconds": seconds}
            )
            atomic_write_text(out / "variants.json", json.dumps(record, indent=2))
            atomic_write_text(out / "variants.md", reference_table(record["rows"]))
            p = loop["pooled"]
            lo, hi = p["success_ci"]
            log(f"  client labs {p['successes']}/{p['episodes']} [{lo:.0%}, {hi:.0%}] ({seconds / 60:.1f} min)")
    finally:
        policy.config.n_action_steps, policy.config.num_steps = saved["n_action_steps"], saved["denoise_steps"]
    return record
