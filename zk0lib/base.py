"""`zk0 base`: a tiny SmolVLA base made the way smolvla_base was, at a size a CPU can train.

smolvla_base is a VLM pretrained on images and text (SmolVLM2), then trained as a whole policy on
hundreds of community datasets; owners fine-tune its action expert with the VLM frozen. A tiny SmolVLA
with a random VLM has nothing to fine-tune from: its frozen image features do not say where the cube is.
The tiny base is made in the same two stages, in simulated community labs that no client owns:

1. grounding (the VLM's pretraining): the vision encoder and connector learn, from lab frames labelled
   with the cube's and target's positions, to put where things are into the image tokens;
2. action pretraining: the whole policy (vision encoder, VLM layers, expert, projections) learns the
   pick-and-place demonstrations of the community labs with SmolVLA's own flow-matching loss; with
   action_vision=frozen, everything but the vision encoder and connector, on their cached features.

The result is a lerobot policy folder (`SmolVLAPolicy.from_pretrained` loads it) with `zk0_base.json`:
the spec it was made from, the community labs, the losses, the step times and the aim diagnostic.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

BASE_RECORD = "zk0_base.json"
ACTION_VISION = ("trained", "frozen")
HELDOUT_LABS = 8  # community labs whose held-out episodes give the base's held-out loss


@dataclass
class BaseSpec:
    """Everything that decides the base: the same spec and seed make the same base."""

    seed: int = 0
    labs: int = 24  # community labs
    episodes_per_lab: int = 10  # recorded expert demonstrations per community lab
    heldout_episodes: int = 1  # per lab, for the held-out loss
    image_size: int = 128
    grounding_episodes: int = 10  # per lab, expert episodes whose frames are labelled (not recorded)
    grounding_frames: int = 10  # labelled frames per grounding episode
    grounding_steps: int = 1000
    grounding_batch: int = 32
    grounding_lr: float = 1e-3
    action_steps: int = 2400
    chunk_steps: int = 0  # action steps between checkpoints, each chunk with its own seeds (0: a tenth of them)
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 100  # asked of lerobot's scheduler, which rescales it by steps/30000 (8 used here)
    chunk_size: int = 10
    num_denoise_steps: int = 5
    num_workers: int = 1
    aim_episodes: int = 10  # held-out cube positions per lab for the aim diagnostic
    record_workers: int = 0  # 0: as many as pay (sim.record.pool_workers)
    # trained: action pretraining trains the vision encoder and connector too (decoding every frame);
    # frozen: they keep grounding's weights and the action stage reads their cached image features, as
    # SmolVLA's own pretraining reads a frozen vision path: many times the samples per CPU minute
    action_vision: str = "trained"

    @classmethod
    def from_overrides(cls, overrides: list[str] | None = None) -> BaseSpec:
        from zk0lib.config import spec_from_overrides

        may_be_zero = (
            "seed", "heldout_episodes", "grounding_steps", "action_steps", "chunk_steps", "warmup_steps", "num_workers",
            "record_workers",
        )  # fmt: skip

        def checks(spec: BaseSpec) -> list[str]:
            ok = spec.action_vision in ACTION_VISION
            return [] if ok else [f"action_vision must be {' or '.join(ACTION_VISION)} (got {spec.action_vision!r})"]

        return spec_from_overrides(cls, overrides, "zk0 base", may_be_zero, checks)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def chunk(self) -> int:
        return self.chunk_steps or max(1, self.action_steps // 10)


def experiment_config(spec: BaseSpec, cache_dir: Path) -> Any:
    """The ExperimentConfig of the pretraining: the tiny SmolVLA, everything trainable, spec's budget."""
    from zk0lib.config import EvalConfig, ExperimentConfig, ModelConfig, OutputConfig, TrainConfig

    return ExperimentConfig(
        preset="base",
        seed=spec.seed,
        model=ModelConfig(
            device="cpu",
            chunk_size=spec.chunk_size,
            n_action_steps=spec.chunk_size,
            num_denoise_steps=spec.num_denoise_steps,
            freeze_vision_encoder=False,
            train_expert_only=False,
        ),
        train=TrainConfig(
            local_steps=spec.action_steps,
            batch_size=spec.batch_size,
            lr=spec.lr,
            warmup_steps=spec.warmup_steps,
            num_workers=spec.num_workers,
        ),
        eval=EvalConfig(batch_size=16, max_frames=400, action_frames=40, bootstrap=1000),
        output=OutputConfig(data_cache=str(cache_dir)),
    )


def action_sets(spec: BaseSpec, bundle: Any, clients: list, cache_dir: Path) -> list:
    """The community labs' training episodes for action pretraining. With action_vision=frozen the vision
    encoder and connector stop training here, at grounding's weights, and the sets serve their image
    embeddings, computed once per frame (cache.py); otherwise every step decodes and embeds the frames."""
    from zk0lib import data

    if spec.action_vision != "frozen":
        return [data.open_dataset(c, c.train_episodes, bundle.config, None) for c in clients]
    from zk0lib.cache import with_image_features

    vlm = bundle.policy.model.vlm_with_expert.get_vlm_model()
    for module in (vlm.vision_model, vlm.connector):
        module.requires_grad_(False)
    return [
        with_image_features(data.open_dataset(c, c.train_episodes, bundle.config, None, cache_dir), bundle, cache_dir)
        for c in clients
    ]


# ----------------------------------------------------------------------------- stage 1: grounding


class GroundingHeads(torch.nn.Module):
    """Read positions off a camera's image tokens: only used to pretrain the vision side, then dropped."""

    def __init__(self, tokens: int, width: int, front: int, wrist: int):
        super().__init__()

        def head(out: int) -> torch.nn.Module:
            return torch.nn.Sequential(
                torch.nn.Flatten(), torch.nn.Linear(tokens * width, 256), torch.nn.GELU(), torch.nn.Linear(256, out)
            )

        self.front, self.wrist = head(front), head(wrist)


def _embed(policy: Any, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) frames -> the image tokens SmolVLA's prefix holds for them."""
    from lerobot.policies.common.vla_utils import resize_with_pad

    width, height = policy.config.resize_imgs_with_padding
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = resize_with_pad(x, height, width, pad_value=0) * 2.0 - 1.0  # as SmolVLA prepares images
    return policy.model.vlm_with_expert.embed_image(x)


def pretrain_grounding(
    policy: Any, frames: dict[str, np.ndarray], spec: BaseSpec, log: Callable[[str], None]
) -> dict[str, Any]:
    """Train the vision encoder and connector (and the throw-away heads) to locate the cube and target."""
    from zk0lib.sim.grounding import FRONT_LABELS, WRIST_LABELS

    vlm = policy.model.vlm_with_expert.get_vlm_model()
    vision = [*vlm.vision_model.parameters(), *vlm.connector.parameters()]
    g = torch.Generator().manual_seed(spec.seed)
    n = len(frames["front"])
    labs = frames["lab"]
    heldout = labs == labs.max()  # the last community lab is kept out: error on a lab never trained on
    train_idx, test_idx = np.flatnonzero(~heldout), np.flatnonzero(heldout)
    with torch.no_grad():
        probe = _embed(policy, torch.from_numpy(frames["front"][:1]))
    torch.manual_seed(spec.seed)
    heads = GroundingHeads(probe.shape[1], probe.shape[2], len(FRONT_LABELS), len(WRIST_LABELS))
    optimizer = torch.optim.AdamW([*vision, *heads.parameters()], lr=spec.grounding_lr, weight_decay=1e-4)
    warmup = max(1, spec.grounding_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / max(1, spec.grounding_steps)))),
    )
    front_y, wrist_y = torch.from_numpy(frames["front_labels"]), torch.from_numpy(frames["wrist_labels"])
    scale = 10.0  # metres -> decimetres: targets of order 1

    def loss_of(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        front = heads.front(_embed(policy, torch.from_numpy(frames["front"][idx])))
        wrist = heads.wrist(_embed(policy, torch.from_numpy(frames["wrist"][idx])))
        ef = (front - scale * front_y[idx]).pow(2)
        ew = (wrist - scale * wrist_y[idx]).pow(2)
        return ef.mean() + ew.mean(), ef, ew

    policy.train()
    t0, losses = time.perf_counter(), []
    for step in range(spec.grounding_steps):
        idx = train_idx[torch.randint(len(train_idx), (spec.grounding_batch,), generator=g).numpy()]
        loss, _, _ = loss_of(idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*vision, *heads.parameters()], 10.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, spec.grounding_steps // 10) == 0:
            log(f"grounding step {step + 1}/{spec.grounding_steps}: loss {np.mean(losses[-50:]):.4f}")
    seconds = time.perf_counter() - t0
    policy.eval()
    with torch.no_grad():
        errors = {}
        for name, idx in (("train_labs", train_idx[:512]), ("heldout_lab", test_idx)):
            _, ef, ew = loss_of(idx)
            cube = (ef[:, :2].sum(1).sqrt() / scale * 100).mean().item()  # cm, Euclidean on the table
            target = (ef[:, 2:].sum(1).sqrt() / scale * 100).mean().item()
            wrist = (ew.sum(1).sqrt() / scale * 100).mean().item()
            errors[name] = {"cube_cm": cube, "target_cm": target, "wrist_cube_cm": wrist, "frames": len(idx)}
        spread = front_y[test_idx, :2] - front_y[train_idx, :2].mean(0)
        errors["heldout_lab"]["cube_cm_if_mean"] = float(spread.pow(2).sum(1).sqrt().mean() * 100)
    return {
        "steps": spec.grounding_steps,
        "frames": n,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / max(1, spec.grounding_steps),
        "errors": errors,
    }


# ----------------------------------------------------------------------------- parts that resume


class BaseParts:
    """The saved progress of one pretraining (spec and output folder): after grounding and after every chunk
    of action steps, the whole policy's weights, the optimizer and schedule, the history so far. Written to
    a new folder and swapped in, so a stop at any moment leaves the previous chunk's state. Chunks draw
    batches and flow-matching noise from their own seeds, so a base made in parts is the base made in one."""

    def __init__(self, cache_dir: Path, spec: BaseSpec, out: Path):
        key = hashlib.sha256(f"{spec.digest()}:{Path(out).resolve()}".encode()).hexdigest()[:12]
        self.path = Path(cache_dir) / "base-parts" / key
        self._tmp, self._old = self.path.with_name(key + ".tmp"), self.path.with_name(key + ".old")

    def _latest(self) -> Path | None:
        for path in (self.path, self._old):  # .old: a stop between the two renames of `save`
            if (path / "state.json").exists() and (path / "weights.pt").exists():
                return path
        return None

    def load(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(state, weights) of the last saved chunk, or None to start from the beginning."""
        path = self._latest()
        if path is None:
            return None
        return json.loads((path / "state.json").read_text()), torch.load(path / "weights.pt", weights_only=False)

    def save(self, state: dict[str, Any], policy: Any, optimizer: Any = None, scheduler: Any = None) -> None:
        from zk0lib.runs import write_json

        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        weights = {
            "policy": policy.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        torch.save(weights, self._tmp / "weights.pt")
        write_json(self._tmp / "state.json", state)
        shutil.rmtree(self._old, ignore_errors=True)
        if self.path.exists():
            self.path.rename(self._old)
        self._tmp.rename(self.path)
        shutil.rmtree(self._old, ignore_errors=True)

    def discard(self) -> None:
        for path in (self.path, self._tmp, self._old):
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- stage 2 and the record


def make_base(
    spec: BaseSpec,
    out: Path,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
    part_minutes: float | None = None,
    part_steps: int | None = None,
    fresh: bool = False,
) -> dict[str, Any] | None:
    """Record the community labs, pretrain in two stages, save the policy folder and its record at `out`.

    In parts: progress is saved after grounding and after every chunk of action steps (`BaseParts`); the
    same call again continues from there (`fresh` starts over). With `part_minutes` or `part_steps`, this
    part ends after the chunk that reaches either, and None is returned while the base is unfinished."""
    from zk0lib import data, evaluation, model, train
    from zk0lib.config import zk0_home
    from zk0lib.env import quiet, set_hub_offline
    from zk0lib.runs import environment, utc_now, write_json
    from zk0lib.sim.grounding import grounding_set
    from zk0lib.sim.labs import community_labs
    from zk0lib.sim.record import record_lab

    quiet()
    set_hub_offline()
    cache_dir = Path(cache_dir or zk0_home() / "data_cache").resolve()
    t_start = time.perf_counter()
    labs = community_labs(spec.labs, spec.seed)
    log(f"zk0 base: {spec.labs} community labs x {spec.episodes_per_lab} demonstrations (recorded once, cached)")
    t = time.perf_counter()
    clients = []
    for i, lab in enumerate(labs):
        rec = record_lab(lab, spec.episodes_per_lab, cache_dir, spec.image_size, spec.seed, spec.record_workers)
        meta = data.load_metadata(f"zk0/{lab.name}", rec.root)
        episodes = list(range(meta.total_episodes))
        held = episodes[len(episodes) - spec.heldout_episodes :] if spec.heldout_episodes else []
        clients.append(
            data.ClientData(i, lab.name, f"zk0/{lab.name}", rec.root, meta, episodes[: len(episodes) - len(held)], held)
        )
        log(f"  {lab.name} ({lab.task}): {rec.episodes} episodes, {rec.frames} frames")
    record_seconds = time.perf_counter() - t
    parts = BaseParts(cache_dir, spec, Path(out))
    if fresh:
        parts.discard()
    saved = parts.load()
    cfg = experiment_config(spec, cache_dir)
    stats = data.pooled_train_stats(clients)
    bundle = model.build_policy(cfg, clients[0].meta, stats)
    if saved is None:
        t = time.perf_counter()
        frames = grounding_set(
            labs, spec.grounding_episodes, spec.grounding_frames, cache_dir, spec.image_size, spec.seed,
            spec.record_workers,
        )  # fmt: skip
        frames_seconds = time.perf_counter() - t
        log(f"grounding set: {len(frames['front'])} labelled frames ({frames_seconds:.0f} s)")
        grounding = pretrain_grounding(bundle.policy, frames, spec, log)
        state = {
            "spec": asdict(spec),
            "grounding": grounding,
            "done": 0,
            "history": [],
            "parts": 1,
            "seconds": {"record": record_seconds, "grounding_frames": frames_seconds, "action": 0.0},
        }
        parts.save(
            state | {"seconds": state["seconds"] | {"earlier_parts": time.perf_counter() - t_start}}, bundle.policy
        )
    else:
        state, weights = saved
        state["parts"] += 1
        state["seconds"]["record"] += record_seconds
        grounding = state["grounding"]
        bundle.policy.load_state_dict(weights["policy"])
        log(
            f"resuming part {state['parts']}: grounding done, action pretraining after step "
            f"{state['done']}/{spec.action_steps} ({parts.path})"
        )
    log(
        f"grounding: cube {grounding['errors']['heldout_lab']['cube_cm']:.1f} cm off on a held-out lab "
        f"(guessing the mean: {grounding['errors']['heldout_lab']['cube_cm_if_mean']:.1f} cm)"
    )

    pc = bundle.config
    train_sets = action_sets(spec, bundle, clients, cache_dir)  # before the optimizer: it takes what trains
    judged = [c for c in clients if c.heldout_episodes][:HELDOUT_LABS]
    held_sets = {c.name: data.open_dataset(c, c.heldout_episodes, pc, None) for c in judged}
    optimizer, scheduler = train.make_optimizer(bundle.policy, spec.action_steps, 0)
    if saved is not None and saved[1]["optimizer"] is not None:
        optimizer.load_state_dict(saved[1]["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved[1]["scheduler"])
    stream = data.BatchStream(torch.utils.data.ConcatDataset(train_sets), spec.batch_size, spec.num_workers)
    chunk, history, done = spec.chunk(), state["history"], state["done"]
    start_done, earlier = done, state["seconds"].get("earlier_parts", 0.0)
    t_part = t = time.perf_counter()
    try:
        while done < spec.action_steps:
            k = done // chunk
            steps = min(chunk, spec.action_steps - done)
            torch.manual_seed(train.derive_seed(spec.seed, 2, k))  # the policy's noise and time: per chunk
            m = train.train_steps(
                bundle, stream.batches(train.derive_seed(spec.seed, 3, k)), optimizer, scheduler, steps, cfg,
                label="base pretraining",
            )  # fmt: skip
            done += steps
            history.append({"step": done, "train_loss": m["train_loss"], "lr": m["lr"], "seconds": m["seconds"]})
            log(
                f"action pretraining step {done}/{spec.action_steps}: loss {m['train_loss']:.4f}, "
                f"{1000 * m['seconds'] / steps:.0f} ms/step"
            )
            state.update(done=done, history=history)
            state["seconds"]["action"] += time.perf_counter() - t
            t = time.perf_counter()
            parts.save(
                state | {"seconds": state["seconds"] | {"earlier_parts": earlier + t - t_start}},
                bundle.policy, optimizer, scheduler,
            )  # fmt: skip
            part_done = (part_steps and done - start_done >= part_steps) or (
                part_minutes and time.perf_counter() - t_part >= 60 * part_minutes
            )
            if part_done and done < spec.action_steps:
                log(
                    f"part {state['parts']} ends at step {done}/{spec.action_steps}: run the same command again to "
                    f"continue ({parts.path})"
                )
                return None
    finally:
        stream.close()
    action_seconds = state["seconds"]["action"]
    heldout = {name: evaluation.evaluate(bundle, ds, cfg) for name, ds in held_sets.items()}
    held_loss = evaluation.combine_clients(heldout, cfg) if heldout else {}

    from zk0lib.sim.labs import CLIENT_LABS, UNSEEN_LAB, get_lab
    from zk0lib.sim.rollout import aim_error

    aim = {
        "community (held-out positions)": aim_error(
            bundle, labs[:4], spec.aim_episodes, spec.seed, spec.image_size, cache_dir
        ),
        "client labs (never seen)": aim_error(
            bundle,
            [get_lab(n) for n in (*CLIENT_LABS, UNSEEN_LAB)],
            spec.aim_episodes,
            spec.seed,
            spec.image_size,
            cache_dir,
        ),
    }
    for where, a in aim.items():
        log(
            f"aim, {where}: shoulder_pan error {a['pan_error_deg']:.1f} deg (the mean trajectory: {a['pan_error_if_mean_deg']:.1f})"
        )
    record = {
        "spec": asdict(spec),
        "parts": state["parts"],
        "labs": [{"name": lab.name, "task": lab.task, "digest": lab.digest()} for lab in labs],
        "data": {
            "episodes": sum(c.meta.total_episodes for c in clients),
            "frames": sum(c.meta.total_frames for c in clients),
            "train_episodes": sum(len(c.train_episodes) for c in clients),
        },
        "grounding": grounding,
        "action": {
            "steps": spec.action_steps,
            "samples": spec.action_steps * spec.batch_size,
            "seconds": action_seconds,
            "ms_per_step": 1000 * action_seconds / max(1, spec.action_steps),
            "history": history,
            "heldout_loss": held_loss,
        },
        "aim": aim,
        "parameters": model.parameter_counts(bundle.policy),
        "seconds": {
            "record": state["seconds"]["record"],
            "grounding_frames": state["seconds"]["grounding_frames"],
            "grounding": grounding["seconds"],
            "action": action_seconds,
            "total": earlier + time.perf_counter() - t_start,
        },
        "created_at": utc_now(),
        "environment": environment(),
    }
    model.save_policy(bundle, Path(out))
    write_json(Path(out) / BASE_RECORD, record)
    parts.discard()
    log(f"base written to {out} in {record['seconds']['total'] / 60:.1f} min")
    return record
