"""A state estimator pretrained on the community labs and shipped inside a base (`zk0 estimator`).

Rung 2 of the closed-loop ladder put a pixel state estimator inside the policy (auxiliary.py): it reads the
cameras and fills the state slots with the cube's and target's positions. Trained centrally on the four client
labs it places them to 0.3-1.4 cm; federated, each owner trains its own copy on one lab and the average of
the four is worse (1.4-5.5 cm), and trained on four labs it does not carry to a fifth (14.9 cm in
lab-unseen). Both are what a shared, pretrained perception module answers in federated learning: trained
once on the data of many labs that no owner holds (as smolvla_base was pretrained on community datasets), it
starts every owner from the same estimate, and `model.freeze_estimator` keeps it the same in every owner's
policy so that the averaged action experts read one estimator.

`pretrain_estimator` records the community labs (cached, the ones `zk0 base` records), trains a
`PixelStateEstimator` on every frame of their training episodes (both cameras, prepared as SmolVLA prepares
them, against the recording's `observation.environment_state`), and writes a copy of a base policy folder
with the estimator beside it (`zk0_state_estimator.*`, which `model.pretrained=<folder>` loads with
`model.estimate_environment_state=pixels`) and a record (`zk0_estimator.json`): spec, labs, losses, errors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ESTIMATOR_RECORD = "zk0_estimator.json"
ENV = "observation.environment_state"


@dataclass
class EstimatorSpec:
    """Everything that decides the estimator: the same spec and base make the same estimator."""

    seed: int = 0
    labs: int = 32  # community labs (the first 24 are the ones `zk0 base` pretrains on)
    episodes_per_lab: int = 10
    heldout_episodes: int = 1  # per lab: frames at cube positions the estimator never trained on
    heldout_labs: int = 0  # the last labs kept out of training: the error in labs it never saw
    image_size: int = 128
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    eval_every_frames: int = 5  # held-out errors on every n-th frame
    # the share of each batch drawn from the first `early_frames` of the training episodes. There the arm is at
    # or near its home pose, so only the front camera says where the cube is: the decision that aims the arm.
    # Drawn uniformly they are ~1 frame in 5 (and the first one in ~140), and an estimator trained so reads the
    # arm's pose and the wrist view of later frames instead (2.5 cm on all frames of the client labs, 6 cm on
    # their first frames, no better than guessing the mean)
    early_fraction: float = 0.5
    early_frames: int = 30
    record_workers: int = 0  # 0: as many as pay (sim.record.pool_workers)
    # read the instruction as well as the cameras (PixelStateEstimator's task_width): the community labs give the
    # client labs' colours to the cube in some labs and to the target in others, and at the first frame only the
    # instruction says which is the cube
    reads_task: bool = False

    @classmethod
    def from_overrides(cls, overrides: list[str] | None = None) -> EstimatorSpec:
        from zk0lib.config import spec_from_overrides

        may_be_zero = (
            "seed", "heldout_episodes", "heldout_labs", "warmup_steps", "weight_decay", "record_workers",
            "early_fraction",
        )  # fmt: skip

        def checks(spec: EstimatorSpec) -> list[str]:
            return [f"early_fraction must be in [0, 1] (got {spec.early_fraction})"] * (spec.early_fraction > 1) + [
                "heldout_labs must be fewer than labs"
            ] * (spec.heldout_labs >= spec.labs)

        return spec_from_overrides(cls, overrides, "zk0 estimator", may_be_zero, checks)


class _LabFrames:
    """One recorded lab: its frame store's camera arrays (uint8, memory-mapped) and environment states by row,
    with the rows of its training and held-out episodes."""

    def __init__(self, name: str, repo_id: str, root: Path, cache_dir: Path, heldout_episodes: int):
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        from zk0lib.cache import frame_store

        store = frame_store(repo_id, root, cache_dir)
        if store.bad:
            raise RuntimeError(
                f"{name}: episodes {sorted(store.bad)} could not be decoded: delete {root} to record again"
            )
        table = LeRobotDataset(repo_id, root=root).hf_dataset.with_format("numpy")
        if ENV not in table.column_names:
            raise ValueError(f"{name}: the recording has no {ENV}: delete {root} to record it again")
        self.name, self.cameras = name, store.cameras
        self.task_vector: torch.Tensor | None = None  # its task's mean token embedding, for an estimator that reads it
        self.env = np.asarray(table[ENV], np.float32)
        self.frame_index = np.asarray(table["frame_index"])
        self.store = store  # its camera arrays, memory-mapped
        episodes = sorted(store.episode_rows)
        held = set(episodes[len(episodes) - heldout_episodes :]) if heldout_episodes else set()
        ranges = {e: np.arange(*store.episode_rows[e]) for e in episodes}
        self.train_rows = np.concatenate([ranges[e] for e in episodes if e not in held])
        self.heldout_rows = np.concatenate([ranges[e] for e in sorted(held)]) if held else np.zeros(0, int)
        self.all_rows = np.concatenate([ranges[e] for e in episodes])

    def frames(self, rows: np.ndarray, cameras: list[str]) -> list[torch.Tensor]:
        """uint8 frames of these rows, one (N, 3, H, W) tensor per camera (read in row order)."""
        order = np.argsort(rows)
        back = np.argsort(order)
        return [torch.from_numpy(np.asarray(self.store.array(c)[rows[order]])[back]) for c in cameras]


def prepared(frames: list[torch.Tensor], resize: tuple[int, int]) -> list[torch.Tensor]:
    """uint8 (N, 3, H, W) camera frames -> what SmolVLA's `prepare_images` hands the estimator: resized with
    padding to the policy's `resize_imgs_with_padding` (width, height), in [-1, 1]."""
    from lerobot.policies.common.vla_utils import resize_with_pad

    width, height = resize
    return [resize_with_pad(f.float() / 255.0, height, width, pad_value=0) * 2.0 - 1.0 for f in frames]


def estimate_rows(
    head: Any, lab: _LabFrames, rows: np.ndarray, cameras: list[str], resize: tuple[int, int], batch: int = 256
) -> np.ndarray:
    """The estimator's positions (in metres) at these rows of a lab."""
    out = []
    head.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            n = len(rows[i : i + batch])
            task = None if head.film is None else lab.task_vector.expand(n, -1)
            pred = head(prepared(lab.frames(rows[i : i + batch], cameras), resize), task)
            out.append((pred * head.std + head.mean).numpy())
    return np.concatenate(out) if out else np.zeros((0, head.mean.numel()), np.float32)


def task_vectors(folder: Path, tasks: list[str]) -> torch.Tensor:
    """Each task's mean token embedding, as a policy's estimator that reads the task computes it: the task with
    SmolVLA's trailing newline, tokenized by the policy's tokenizer, embedded by its VLM's token embeddings (read
    from the folder's weights)."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from zk0lib.model import TINY_VLM_REPO, ensure_tiny_vlm

    config = json.loads((Path(folder) / "config.json").read_text())
    name = config["vlm_model_name"]
    if name == TINY_VLM_REPO:
        ensure_tiny_vlm()
    tokenizer = AutoTokenizer.from_pretrained(name)
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        key = next((k for k in f.keys() if k.endswith("text_model.embed_tokens.weight")), None)
        if key is None:
            raise ValueError(f"{folder}: no VLM token embeddings (text_model.embed_tokens.weight) in model.safetensors")
        table = f.get_tensor(key).float()
    vectors = []
    for task in tasks:
        text = task if task.endswith("\n") else f"{task}\n"
        ids = tokenizer(text, truncation=True, max_length=config["tokenizer_max_length"])["input_ids"]
        vectors.append(table[torch.as_tensor(ids)].mean(0))
    return torch.stack(vectors)


def lab_errors(head: Any, lab: _LabFrames, rows: np.ndarray, cameras: list[str], resize: tuple[int, int]) -> dict:
    from zk0lib.sim.rollout import _estimate_errors

    return _estimate_errors(estimate_rows(head, lab, rows, cameras, resize), lab.env[rows], head.mean) | {
        "frames": len(rows)
    }


def pretrain_estimator(
    spec: EstimatorSpec,
    base: Path,
    out: Path,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Record the community labs, train the pixel estimator on their frames, write `base` + the estimator at
    `out` (written to a temp folder, then renamed) and return its record."""
    from zk0lib import data
    from zk0lib.auxiliary import PixelStateEstimator, write_estimator
    from zk0lib.config import zk0_home
    from zk0lib.env import quiet, set_hub_offline
    from zk0lib.runs import environment, utc_now, write_json
    from zk0lib.sim.labs import community_labs
    from zk0lib.sim.record import record_lab

    quiet()
    set_hub_offline()
    base, out = Path(base), Path(out)
    config = json.loads((base / "config.json").read_text())
    cameras = [k for k, f in config["input_features"].items() if f["type"] == "VISUAL"]
    state_size = config["input_features"]["observation.state"]["shape"][0]
    resize = tuple(config["resize_imgs_with_padding"])
    cache_dir = Path(cache_dir or zk0_home() / "data_cache").resolve()
    t_start = time.perf_counter()
    log(f"zk0 estimator: {spec.labs} community labs x {spec.episodes_per_lab} demonstrations (recorded once, cached)")
    labs = []
    specs = community_labs(spec.labs, spec.seed)
    vectors = task_vectors(base, [lab.task for lab in specs]) if spec.reads_task else None
    for lab in specs:
        rec = record_lab(lab, spec.episodes_per_lab, cache_dir, spec.image_size, spec.seed, spec.record_workers)
        meta = data.load_metadata(f"zk0/{lab.name}", rec.root)
        missing = set(cameras) - set(meta.video_keys)
        if missing:
            raise ValueError(f"{lab.name}: no camera {sorted(missing)}, which the base {base} reads")
        labs.append(_LabFrames(lab.name, f"zk0/{lab.name}", rec.root, cache_dir, spec.heldout_episodes))
        labs[-1].task_vector = None if vectors is None else vectors[len(labs) - 1]
        log(f"  {lab.name}: {len(labs[-1].all_rows)} frames")
    record_seconds = time.perf_counter() - t_start
    trained = labs[: len(labs) - spec.heldout_labs]
    roles = colour_roles([(lab.cube_colour, lab.target_colour) for lab in specs[: len(trained)]])
    log(f"  {roles_line(roles)}")
    env = np.concatenate([lab.env[lab.train_rows] for lab in trained])
    mean, std = env.mean(0), env.std(0)
    torch.manual_seed(spec.seed)
    head = PixelStateEstimator(len(cameras), mean, std, task_width=0 if vectors is None else vectors.shape[1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)

    # (lab, row) pairs from one seeded stream: early_fraction of a batch from the episodes' first frames, the
    # rest from all training frames of every trained lab, each equally likely
    def pool(pick: Callable[[_LabFrames], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        chosen = [pick(lab) for lab in trained]
        return np.concatenate([np.full(len(r), i) for i, r in enumerate(chosen)]), np.concatenate(chosen)

    owners, rows = pool(lambda lab: lab.train_rows)
    early_owners, early_rows = pool(lambda lab: lab.train_rows[lab.frame_index[lab.train_rows] < spec.early_frames])
    n_early = round(spec.batch_size * spec.early_fraction)
    rng = np.random.default_rng([spec.seed, 9001])
    log(
        f"training on {len(rows)} frames of {len(trained)} labs ({n_early} of each batch from the first "
        f"{spec.early_frames} of an episode): {spec.steps} steps at batch {spec.batch_size}"
    )
    t_train = time.perf_counter()
    next_line = t_train + 60
    losses: list[float] = []
    head.train()
    for step in range(spec.steps):
        late, early = (
            rng.integers(len(rows), size=spec.batch_size - n_early),
            rng.integers(len(early_rows), size=n_early),
        )
        lab_of = np.concatenate([owners[late], early_owners[early]])
        row_of = np.concatenate([rows[late], early_rows[early]])
        frames: list[list[torch.Tensor]] = [[] for _ in cameras]
        targets, tasks = [], []
        for i in np.unique(lab_of):
            sel = row_of[lab_of == i]
            for c, f in enumerate(trained[i].frames(sel, cameras)):
                frames[c].append(f)
            targets.append(trained[i].env[sel])
            if vectors is not None:
                tasks.append(trained[i].task_vector.expand(len(sel), -1))
        pred = head(prepared([torch.cat(f) for f in frames], resize), torch.cat(tasks) if tasks else None)
        loss = torch.nn.functional.mse_loss(pred, head.normalized(torch.from_numpy(np.concatenate(targets))))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if time.perf_counter() >= next_line or step + 1 == spec.steps:
            elapsed = time.perf_counter() - t_train
            rate = (step + 1) * spec.batch_size / elapsed
            left = (spec.steps - step - 1) * spec.batch_size / rate
            log(
                f"  step {step + 1}/{spec.steps}: loss {np.mean(losses[-100:]):.4f} (last 100), "
                f"{rate:.0f} samples/s, ~{left / 60:.1f} min left"
            )
            next_line = time.perf_counter() + 60
    train_seconds = time.perf_counter() - t_train

    def first(lab: _LabFrames, rows: np.ndarray) -> np.ndarray:
        return rows[lab.frame_index[rows] == 0]

    where = {
        "heldout_episodes": [(lab, lab.heldout_rows) for lab in trained if len(lab.heldout_rows)],
        "heldout_labs": [(lab, lab.all_rows) for lab in labs[len(trained) :]],
    }
    errors = {
        f"{name}{part}": {lab.name: lab_errors(head, lab, pick(lab, rows), cameras, resize) for lab, rows in pairs}
        for name, pairs in where.items()
        for part, pick in (("", lambda _, r: r[:: spec.eval_every_frames]), ("_first_frames", first))
    }
    summary = {where: _mean_errors(v) for where, v in errors.items() if v}
    for where, v in summary.items():
        log(
            f"  {where}: cube {v['cube_error_cm']:.1f} cm (guessing the mean {v['cube_error_if_mean_cm']:.1f}), "
            f"target {v['target_error_cm']:.1f} cm ({v['target_error_if_mean_cm']:.1f})"
        )
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("zk0_state_estimator.*", ESTIMATOR_RECORD))
    head.state_size = state_size
    write_estimator(head, tmp)
    record = {
        "spec": asdict(spec),
        "base": str(base),
        "kind": head.kind,
        "shape": head.shape,
        "cameras": cameras,
        "labs": [lab.name for lab in trained],
        "heldout_labs": [lab.name for lab in labs[len(trained) :]],
        "colour_roles": roles,
        "frames": int(len(rows)),
        "losses": {"first_100": float(np.mean(losses[:100])), "last_100": float(np.mean(losses[-100:]))},
        "errors": errors,
        "summary": summary,
        "seconds": {
            "record_and_cache": record_seconds,
            "train": train_seconds,
            "total": time.perf_counter() - t_start,
        },
        "samples_per_s": spec.steps * spec.batch_size / train_seconds,
        "created": utc_now(),
        "environment": environment(),
    }
    write_json(tmp / ESTIMATOR_RECORD, record)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return record


def colour_roles(pairs: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """How many labs, given as (cube colour, target colour), give each colour the cube's role and the target's:
    a colour in both roles is one an estimator blind to the instruction cannot tell apart by colour alone."""
    roles: dict[str, dict[str, int]] = {}
    for cube, target in pairs:
        roles.setdefault(cube, {"cube": 0, "target": 0})["cube"] += 1
        roles.setdefault(target, {"cube": 0, "target": 0})["target"] += 1
    return dict(sorted(roles.items()))


def roles_line(roles: dict[str, dict[str, int]]) -> str:
    both = [f"{c} {r['cube']}/{r['target']}" for c, r in roles.items() if r["cube"] and r["target"]]
    return "colours in both roles (labs with it as the cube / as the target): " + (", ".join(both) or "none")


def _mean_errors(per_lab: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = ("cube_error_cm", "cube_error_if_mean_cm", "target_error_cm", "target_error_if_mean_cm")
    return {k: float(np.mean([v[k] for v in per_lab.values()])) for k in keys}


def evaluate_estimator(folder: Path, cfg: Any, every: int = 5) -> dict[str, dict[str, Any]]:
    """A saved pixel estimator (a `zk0 estimator` folder or a run's checkpoint) on the recordings of a config's
    simulated labs: its errors on every `every`-th frame and on the episodes' first frames, where the arm is at
    home and only the front camera says where the cube is (the frames that aim the arm)."""
    from zk0lib.auxiliary import read_estimator
    from zk0lib.evaluation import sim_labs
    from zk0lib.sources import source_location

    head = read_estimator(folder)
    if head is None or head.kind != "pixels":
        raise ValueError(f"{folder} holds no pixel state estimator (zk0 estimator makes one; runs save theirs)")
    config = json.loads((Path(folder) / "config.json").read_text())
    cameras = [k for k, f in config["input_features"].items() if f["type"] == "VISUAL"]
    resize = tuple(config["resize_imgs_with_padding"])
    from zk0lib.sim.labs import get_lab

    labs = sim_labs(cfg)
    tasks = [get_lab(client.lab).task for client, _ in labs.values()]
    vectors = task_vectors(Path(folder), tasks) if head.film is not None else None  # tokenizer and weights read once
    out = {}
    for i, (name, (client, role)) in enumerate(labs.items()):
        repo_id, root = source_location(cfg, client)
        lab = _LabFrames(name, repo_id, root, cfg.cache_dir, 0)
        lab.task_vector = None if vectors is None else vectors[i]
        spec = get_lab(client.lab)
        out[name] = {
            "role": role,
            "cube_colour": spec.cube_colour,
            "target_colour": spec.target_colour,
            "all_frames": lab_errors(head, lab, lab.all_rows[::every], cameras, resize),
            "first_frames": lab_errors(head, lab, lab.all_rows[lab.frame_index[lab.all_rows] == 0], cameras, resize),
        }
    return out
