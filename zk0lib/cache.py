"""Training caches: what does not change between training steps is computed once.

- Frames: a dataset's video frames decoded once into uint8 arrays (one memory-mapped .npy per camera,
  channels first) under data_cache/frames/. The LeRobot dataset stays the source: items are built by
  lerobot's own reader (same keys, chunks, padding and timestamps); only its video query reads the store.
  Frames come out as the decoder gives them (uint8 / 255 as float32), so batches are identical.
- Task tokens: the preprocessor tokenizes each distinct task string once.
- Image features (cache.py, ImageFeatures): while SmolVLA's vision encoder and connector are frozen, the
  embedding of a frame never changes; it is computed once per frame and the policy reads it.

A store is keyed by the dataset's files (names, sizes, modification times) and the decoding backend, and
written to a temp folder then renamed: a stopped build leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

FRAMES_VERSION = 1
STORE_INFO = "store.json"


class FrameStore:
    """Decoded frames of every episode of one dataset, looked up by (episode, timestamp)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        info = json.loads((self.root / STORE_INFO).read_text())
        self.cameras: list[str] = info["cameras"]
        self.bad: dict[int, str] = {int(k): v for k, v in info["bad_episodes"].items()}
        self.tolerance_s: float = info["tolerance_s"]
        self.episode_rows: dict[int, tuple[int, int]] = {int(k): tuple(v) for k, v in info["episode_rows"].items()}
        self._timestamps = np.load(self.root / "timestamps.npy")
        self._arrays: dict[str, np.ndarray] | None = None
        self.info = info

    def array(self, key: str) -> np.ndarray:
        """One camera's uint8 frames, (rows, C, H, W), memory-mapped; `episode_rows` says which rows are whose."""
        if self._arrays is None:  # opened lazily: each data-loader worker maps the files itself
            self._arrays = {c: np.load(self.root / f"{_file_name(c)}.npy", mmap_mode="r") for c in self.cameras}
        return self._arrays[key]

    def rows(self, episode: int, timestamps: list[float]) -> np.ndarray:
        if episode in self.bad:
            raise RuntimeError(
                f"episode {episode} could not be decoded when the frame cache was built: {self.bad[episode]}"
            )
        start, stop = self.episode_rows[episode]
        ts = self._timestamps[start:stop]
        query = np.asarray(timestamps)
        at = np.clip(np.searchsorted(ts, query), 1, len(ts) - 1) if len(ts) > 1 else np.zeros(len(query), int)
        nearest = np.where(np.abs(ts[at - 1] - query) <= np.abs(ts[at] - query), at - 1, at) if len(ts) > 1 else at
        off = np.abs(ts[nearest] - query)
        if np.any(off >= self.tolerance_s):
            raise RuntimeError(
                f"episode {episode}: timestamps {query[off >= self.tolerance_s].tolist()} have no frame within "
                f"{self.tolerance_s} s in the frame cache {self.root}"
            )
        return start + nearest

    def frames(self, key: str, episode: int, timestamps: list[float]) -> torch.Tensor:
        """Float frames in [0, 1], (N, C, H, W), or (C, H, W) for one timestamp: what lerobot's decoder returns."""
        u8 = torch.from_numpy(np.array(self.array(key)[self.rows(episode, timestamps)]))
        return (u8 / 255.0).type(torch.float32).squeeze(0)

    @property
    def nbytes(self) -> int:
        return sum((self.root / f"{_file_name(c)}.npy").stat().st_size for c in self.cameras)


def _file_name(camera: str) -> str:
    return camera.replace("/", "_")


class CachedItems(torch.utils.data.Dataset):
    """The items of a LeRobotDataset (its episodes and delta timestamps), assembled from its table held in
    memory and from a frame store: what lerobot's reader returns, key for key, without an Arrow query or a
    video decode per item. Built from the dataset; anything else is read from it (`meta`, `episodes` ...)."""

    def __init__(self, dataset: Any, store: FrameStore):
        missing = set(dataset.meta.video_keys) - set(store.cameras)
        if missing:
            raise ValueError(f"frame cache {store.root} has no {sorted(missing)}: delete the folder to rebuild it")
        if getattr(dataset, "image_transforms", None) is not None:
            raise ValueError("the frame cache serves frames as stored; it cannot apply image_transforms")
        self.dataset, self.store = dataset, store
        reader = dataset._ensure_reader()
        if reader.hf_dataset is None:
            reader.load_and_activate()
        table = reader.hf_dataset.with_format("numpy")
        self.video_keys = list(dataset.meta.video_keys)
        names = [k for k in table.column_names if k not in self.video_keys]
        self.columns = {k: torch.from_numpy(np.asarray(table[k])) for k in names}
        absolute = self.columns["index"].numpy()
        self._offset = int(absolute.min())
        self._relative = np.full(int(absolute.max()) - self._offset + 1, -1, dtype=np.int64)
        self._relative[absolute - self._offset] = np.arange(len(absolute))
        eps = dataset.meta.episodes
        self._bounds = {
            int(e): (int(a), int(b))
            for e, a, b in zip(eps["episode_index"], eps["dataset_from_index"], eps["dataset_to_index"], strict=True)
        }
        self.deltas = {k: torch.as_tensor(v) for k, v in (reader.delta_indices or {}).items()}
        self.tasks = list(dataset.meta.tasks.index)

    def __len__(self) -> int:
        return len(self.columns["index"])

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "columns"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.assemble(idx)

    def assemble(self, idx: int, frames: bool = True) -> dict[str, Any]:
        """The item; without `frames`, everything but the camera frames (and the row they are at)."""
        item = {k: v[idx] for k, v in self.columns.items()}
        episode, here = int(item["episode_index"]), int(item["index"])
        start, end = self._bounds[episode]
        rows: dict[str, torch.Tensor] = {}
        for key, delta in self.deltas.items():
            wanted = here + delta
            rows[key] = torch.from_numpy(self._relative[wanted.clamp(start, end - 1).numpy() - self._offset])
            item[f"{key}_is_pad"] = (wanted < start) | (wanted >= end)
            if key not in self.video_keys:
                item[key] = self.columns[key][rows[key]]
        for key in self.video_keys if frames else ():
            ts = self.columns["timestamp"][rows[key]].tolist() if key in rows else [item["timestamp"].item()]
            item[key] = self.store.frames(key, episode, ts)
        item["task"] = self.tasks[int(item["task_index"])]
        return item


def store_root(cache_dir: Path, repo_id: str, root: Path, backend: str | None) -> Path:
    from zk0lib.sources import dataset_key

    key = json.dumps([dataset_key(root), backend, FRAMES_VERSION])
    name = repo_id.replace("/", "__")
    return Path(cache_dir) / "frames" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def frame_store(
    repo_id: str,
    root: Path,
    cache_dir: Path,
    backend: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FrameStore:
    """The dataset's frame store (built now by decoding every episode once, or read from the cache)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.datasets.video_utils import decode_video_frames

    path = store_root(cache_dir, repo_id, root, backend)
    if (path / STORE_INFO).exists():
        return FrameStore(path)
    t0 = time.perf_counter()
    ds = LeRobotDataset(repo_id, root=root, video_backend=backend)
    meta = ds.meta
    table = ds.hf_dataset.with_format("numpy")
    timestamps = np.asarray(table["timestamp"], np.float64)
    episode_of = np.asarray(table["episode_index"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = {}
    for key in meta.video_keys:
        h, w, c = meta.features[key]["shape"]
        arrays[key] = np.lib.format.open_memmap(
            tmp / f"{_file_name(key)}.npy", mode="w+", dtype=np.uint8, shape=(len(timestamps), c, h, w)
        )
    rows, bad = {}, {}
    episodes = sorted(int(e) for e in np.unique(episode_of))
    for n, ep in enumerate(episodes, 1):
        idx = np.flatnonzero(episode_of == ep)
        start, stop = int(idx[0]), int(idx[-1]) + 1
        if not np.array_equal(idx, np.arange(start, stop)):
            raise ValueError(f"{repo_id}: episode {ep}'s frames are not contiguous in the dataset's table")
        rows[ep] = (start, stop)
        for key in meta.video_keys:
            offset = meta.episodes[ep][f"videos/{key}/from_timestamp"]
            try:
                frames = decode_video_frames(
                    root / meta.get_video_file_path(ep, key),
                    [offset + t for t in timestamps[start:stop].tolist()],
                    ds.tolerance_s,
                    backend,
                    return_uint8=True,
                )
                arrays[key][start:stop] = frames.numpy()
            except Exception as e:  # noqa: BLE001 - a broken episode is skipped by training, as when decoding live
                bad[ep] = f"{key}: {type(e).__name__}: {e}"[:500]
        if progress is not None:
            progress(n, len(episodes))
    for a in arrays.values():
        a.flush()
    np.save(tmp / "timestamps.npy", timestamps)
    info = {
        "repo_id": repo_id,
        "source": str(root),
        "cameras": list(meta.video_keys),
        "frames": len(timestamps),
        "episode_rows": {str(k): v for k, v in rows.items()},
        "bad_episodes": {str(k): v for k, v in bad.items()},
        "tolerance_s": ds.tolerance_s,
        "backend": backend,
        "seconds": time.perf_counter() - t0,
        "version": FRAMES_VERSION,
    }
    (tmp / STORE_INFO).write_text(json.dumps(info, indent=2))
    if path.exists():  # another process finished first: keep its store
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return FrameStore(path)


# ----------------------------------------------------------------------------- task tokens


def tokenize_tasks_once(preprocessor: Any) -> None:
    """Make the preprocessor's tokenizer step remember each distinct task's tokens (tasks repeat in every
    batch; their tokens never change)."""
    from lerobot.processor.tokenizer_processor import TokenizerProcessorStep

    for step in preprocessor.steps:
        if isinstance(step, TokenizerProcessorStep) and not isinstance(step._tokenize_text, _RememberedTokens):
            step._tokenize_text = _RememberedTokens(step._tokenize_text)


class _RememberedTokens:
    """Tokens per set of distinct tasks in a batch: tokenizing the distinct tasks together pads them to the
    longest among them, as tokenizing the whole batch does, so rows picked from it are the batch's."""

    def __init__(self, tokenize: Callable[[list[str]], Any]):
        self.tokenize = tokenize
        self.known: dict[frozenset[str], tuple[list[str], dict[str, torch.Tensor]]] = {}

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        key = frozenset(texts)
        if key not in self.known:
            order = sorted(key)
            self.known[key] = (order, dict(self.tokenize(order)))
        order, tokens = self.known[key]
        pick = torch.tensor([order.index(t) for t in texts])
        return {k: v[pick] for k, v in tokens.items()}


# ----------------------------------------------------------------------------- image features

FEATURES_VERSION = 1


def embedding_key(camera: str) -> str:
    """Where an item carries a camera's image embedding (outside observation.images.*, which lerobot's
    processors treat as pixels)."""
    return "observation.embedding." + camera.removeprefix("observation.images.")


def frozen_image_path(policy: Any) -> list[torch.nn.Module]:
    """The modules that turn a camera frame into its embedding (SmolVLA's vision encoder and connector), if
    none of them trains; else a ValueError that says why the embeddings cannot be cached."""
    vlm = policy.model.vlm_with_expert.get_vlm_model()
    modules = [vlm.vision_model, vlm.connector]
    trainable = [n for m in modules for n, p in m.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"image features cannot be cached while the vision path trains ({len(trainable)} trainable tensors, e.g. "
            f"{trainable[0]}): keep model.freeze_vision_encoder on and model.train_expert_only (or "
            "model.freeze_connector) on, or use the frame cache"
        )
    return modules


@torch.no_grad()
def _embed(policy: Any, frames: torch.Tensor) -> torch.Tensor:
    """What SmolVLA's forward makes of float frames in [0, 1]: its resize and [-1, 1] range, then the
    frozen vision encoder and connector (in eval mode, as training keeps them)."""
    from lerobot.policies.smolvla.modeling_smolvla import resize_with_pad

    size = policy.config.resize_imgs_with_padding
    if size is not None:
        frames = resize_with_pad(frames, size[1], size[0], pad_value=0)
    return policy.model.vlm_with_expert.embed_image(frames * 2.0 - 1.0).float()


class ImageFeatures:
    """Embeddings of every frame of a frame store for one frozen vision path, one .npy per camera."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.info = json.loads((self.root / STORE_INFO).read_text())
        self._arrays: dict[str, np.ndarray] | None = None

    def rows(self, camera: str, rows: np.ndarray | int) -> torch.Tensor:
        if self._arrays is None:
            self._arrays = {c: np.load(self.root / f"{_file_name(c)}.npy", mmap_mode="r") for c in self.info["cameras"]}
        return torch.from_numpy(np.array(self._arrays[camera][rows]))


def image_features(store: FrameStore, bundle: Any, cache_dir: Path, batch_size: int = 64) -> ImageFeatures:
    """The store's frames embedded by the bundle's frozen vision path (computed now, or read from the cache)."""
    from zk0lib.model import frozen_fingerprint

    policy = bundle.policy
    modules = frozen_image_path(policy)
    weights = hashlib.sha256("".join(frozen_fingerprint(m) for m in modules).encode()).hexdigest()
    key = json.dumps([store.root.name, weights, list(policy.config.resize_imgs_with_padding or []), FEATURES_VERSION])
    path = Path(cache_dir) / "features" / f"{store.root.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (path / STORE_INFO).exists():
        return ImageFeatures(path)
    t0 = time.perf_counter()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    was_training = policy.training
    policy.eval()
    try:
        for camera in store.cameras:
            frames = store.array(camera)
            out = None
            for a in range(0, len(frames), batch_size):
                chunk = torch.from_numpy(np.array(frames[a : a + batch_size]))
                emb = _embed(policy, (chunk / 255.0).type(torch.float32).to(bundle.device)).cpu().numpy()
                if out is None:
                    out = np.lib.format.open_memmap(
                        tmp / f"{_file_name(camera)}.npy",
                        mode="w+",
                        dtype=np.float32,
                        shape=(len(frames), *emb.shape[1:]),
                    )
                out[a : a + len(emb)] = emb
            out.flush()
    finally:
        policy.train(was_training)
    info = {"cameras": store.cameras, "frames": store.info["frames"], "store": str(store.root), "weights": weights}
    (tmp / STORE_INFO).write_text(json.dumps(info | {"seconds": time.perf_counter() - t0}, indent=2))
    if path.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return ImageFeatures(path)


class EmbeddedItems(torch.utils.data.Dataset):
    """CachedItems whose camera frames are replaced by their embeddings (`embedding_key(camera)`); the
    policy reads them through `read_image_features`. Rows of camera frames with time deltas are not
    supported (SmolVLA looks at the current frame only)."""

    def __init__(
        self,
        items: CachedItems,
        features: ImageFeatures,
        rename: dict[str, str] | None = None,
        keep_frames: bool = False,
    ):
        if any(items.deltas[k].tolist() != [0] for k in items.video_keys if k in items.deltas):
            raise ValueError("image features are cached for the current frame only; the policy asks for frame deltas")
        self.items, self.features, self.rename = items, features, dict(rename or {})
        self.keep_frames = keep_frames  # the frames too, beside their embeddings (a pixel state estimator)

    def __len__(self) -> int:
        return len(self.items)

    def __getattr__(self, name: str) -> Any:
        if name in ("items", "features"):
            raise AttributeError(name)
        return getattr(self.items, name)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        items = self.items
        item = items.assemble(idx, frames=self.keep_frames)
        row = int(items.store.rows(int(item["episode_index"]), [item["timestamp"].item()])[0])
        for camera in items.video_keys:
            item[embedding_key(self.rename.get(camera, camera))] = self.features.rows(camera, row)
        return item


def with_image_features(
    dataset: CachedItems, bundle: Any, cache_dir: Path, rename: dict[str, str] | None = None
) -> Any:
    """`dataset` (served from a frame store) with each frame's embedding in place of its pixels, and the
    bundle's policy reading them (see read_image_features)."""
    if not isinstance(dataset, CachedItems):
        raise ValueError("image features are built from the frame cache: open the dataset with a frame_cache folder")
    from zk0lib.auxiliary import needs_frames

    features = image_features(dataset.store, bundle, cache_dir)
    read_image_features(bundle.policy)
    return EmbeddedItems(dataset, features, rename, keep_frames=needs_frames(bundle.policy))


def read_image_features(policy: Any) -> Any:
    """Let a SmolVLA policy take precomputed image embeddings: where a batch has `embedding_key(camera)`
    for every camera, they stand in for the vision encoder and connector's output (the pixels' path is
    unchanged for batches with frames, e.g. closed-loop evaluation)."""
    if getattr(policy, "_zk0_reads_image_features", False):
        return policy
    frozen_image_path(policy)
    inner = policy.model.vlm_with_expert
    embed_pixels, prepare_pixels = inner.embed_image, policy.prepare_images

    def embed_image(image: torch.Tensor) -> torch.Tensor:
        return image if image.ndim == 3 else embed_pixels(image)  # (B, tokens, width): already embedded

    def prepare_images(batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys = [embedding_key(k) for k in policy.config.image_features]
        if not any(k in batch for k in keys):
            return prepare_pixels(batch)
        if not all(k in batch for k in keys):
            missing = [k for k in keys if k not in batch]
            raise ValueError(f"a batch has some cameras' embeddings but not {missing}")
        images = [batch[k] for k in keys]
        return images, [torch.ones(len(e), dtype=torch.bool, device=e.device) for e in images]

    inner.embed_image, policy.prepare_images = embed_image, prepare_images
    policy._zk0_reads_image_features = True
    return policy
