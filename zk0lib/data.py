"""Client datasets: one LeRobotDataset per client (Hub, local folder or synthetic), episode splits,
the federation's pooled normalization stats (from the training episodes only), and a training stream that skips undecodable batches."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zk0lib.config import ClientConfig, ExperimentConfig
from zk0lib.sources import dataset_location


class DatasetNotAvailableError(RuntimeError):
    """A client's dataset cannot be found locally nor downloaded."""


@dataclass
class ClientData:
    """Where a client's dataset lives and which of its episodes train and which are held out."""

    index: int
    name: str
    repo_id: str
    root: Path | None
    meta: Any  # LeRobotDatasetMetadata
    train_episodes: list[int]
    heldout_episodes: list[int]  # the test episodes every reported number is measured on
    val_episodes: list[int] = field(default_factory=list)  # only for choosing the best round

    @property
    def train_frames(self) -> int:
        """Frames of the training episodes (from the metadata: nothing is decoded)."""
        eps = self.meta.episodes
        lengths = dict(zip(eps["episode_index"], eps["length"], strict=True))
        return int(sum(lengths[e] for e in self.train_episodes))


def converted_from(client: ClientData) -> str:
    """The v2.1 source a client's dataset was converted from ("" if it was read as it is): for run records."""
    from zk0lib.convert import conversion_of

    return str((conversion_of(client.root) or {}).get("source", ""))


def load_metadata(repo_id: str, root: Path | None, key: str = "data.clients.N") -> Any:
    """A dataset's LeRobot metadata; `key` names the config entry in the error if it cannot be opened."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
    from lerobot.datasets.utils import BackwardCompatibilityError

    try:
        return LeRobotDatasetMetadata(repo_id, root=root)
    except BackwardCompatibilityError as e:  # a v2.1 dataset on the Hub: its v3.0 revision does not exist
        from zk0lib.sources import hub_root

        raise DatasetNotAvailableError(
            f"{key}: dataset {repo_id!r} is in LeRobot's v2.1 format on the Hub, which lerobot 0.6 cannot read. "
            "Download that revision where zk0 looks for it, and zk0 converts a copy with lerobot's converter "
            f"on first use:\n    huggingface-cli download --repo-type dataset {repo_id} --revision v2.1 "
            f"--local-dir {hub_root(repo_id)}"
        ) from e
    except Exception as e:  # noqa: BLE001 - offline and missing datasets fail in many ways; explain once
        where = root if root is not None else f"$HF_LEROBOT_HOME/{repo_id}"
        raise DatasetNotAvailableError(
            f"{key}: dataset {repo_id!r} could not be opened at {where}: {type(e).__name__}: {e}\n"
            "Without network, pre-download it on a machine that has one, e.g.\n"
            f"    huggingface-cli download --repo-type dataset {repo_id} --local-dir <folder>\n"
            f"copy the folder here and point the client at it: --set {key}.root=<folder>"
        ) from e


def split_episodes(cfg: ExperimentConfig, client: ClientConfig, total: int) -> tuple[list[int], list[int], list[int]]:
    """Seeded (train, validation, held-out) episodes among the first `client.episodes`, stable per client
    name; the held-out ones do not depend on how many validation episodes are asked for."""
    available = total if client.episodes is None else min(client.episodes, total)
    heldout, val = cfg.heldout_for(client), cfg.data.val_episodes
    if heldout + val >= available:
        raise ValueError(
            f"client {client.name!r}: {heldout} held-out and {val} validation episodes leave none to train on "
            f"({available} episodes available); lower data.heldout_episodes or data.val_episodes"
        )
    rng = np.random.default_rng([cfg.data.split_seed, zlib.crc32(client.name.encode())])
    held = sorted(int(i) for i in rng.choice(available, size=heldout, replace=False))
    rest = [i for i in range(available) if i not in set(held)]
    chosen = sorted(int(i) for i in rng.choice(rest, size=val, replace=False)) if val else []
    train = [i for i in rest if i not in set(chosen)]
    return train, chosen, held


def open_client(cfg: ExperimentConfig, index: int) -> ClientData:
    client = cfg.data.clients[index]
    repo_id, root = dataset_location(cfg, client)
    meta = load_metadata(repo_id, root, f"data.clients.{index}")
    train, val, held = split_episodes(cfg, client, meta.total_episodes)
    return ClientData(index, client.name, repo_id, root, meta, train, held, val)


def open_eval_only(cfg: ExperimentConfig, index: int) -> ClientData:
    """An evaluation-only dataset: all its episodes (or the first `episodes`) are held out."""
    spec = cfg.data.eval_only[index]
    repo_id, root = dataset_location(cfg, spec)
    meta = load_metadata(repo_id, root, f"data.eval_only.{index}")
    n = meta.total_episodes if spec.episodes is None else min(spec.episodes, meta.total_episodes)
    return ClientData(index, spec.name, repo_id, root, meta, [], list(range(n)))


def pooled_stats(stats: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, np.ndarray]]:
    """One normalization for the federation: lerobot's count-weighted merge of each client's stats.

    Only aggregate statistics (mean/std/min/max/quantiles/count per feature) are combined, never frames.
    """
    from lerobot.datasets.compute_stats import aggregate_stats

    return aggregate_stats(list(stats))


class MissingEpisodeStatsError(ValueError):
    """A dataset's meta/episodes has no per-episode stats to normalize its training episodes with."""


def train_stats(client: ClientData) -> dict[str, dict[str, np.ndarray]]:
    """A client's normalization stats from its training episodes only.

    lerobot writes each episode's stats beside it (the `stats/<feature>/<stat>` columns of meta/episodes)
    and their merge over every episode as meta/stats.json. Normalizing with stats.json would let the
    held-out episodes, which every reported number is measured on, shape the normalization; here lerobot's
    own merge runs over the training episodes' stats instead. The dataset's bookkeeping columns (index,
    timestamp, ...) have no per-episode stats and no policy reads them.
    """
    return pooled_stats(episode_stats(client.meta, client.train_episodes, client.name))


def pooled_train_stats(clients: list[ClientData]) -> dict[str, dict[str, np.ndarray]]:
    """The federation's normalization as centralized training and the baselines see it: every client's
    training-episode stats, merged (what the federated server pools from the clients' replies)."""
    return pooled_stats([train_stats(c) for c in clients])


def episode_stats(meta: Any, episodes: list[int], name: str = "") -> list[dict[str, dict[str, np.ndarray]]]:
    """lerobot's per-episode stats of some episodes of a dataset, in the shapes its stats merge reads
    (images (C, 1, 1), vectors (D,), counts (1,))."""
    import pyarrow.dataset as pa_ds
    from lerobot.datasets.utils import EPISODES_DIR

    where = Path(meta.root) / EPISODES_DIR
    table = pa_ds.dataset(str(where), format="parquet").to_table(
        filter=pa_ds.field("episode_index").isin([int(e) for e in episodes])
    )
    columns = [c for c in table.column_names if c.startswith("stats/") and c.count("/") == 2]
    label = name or str(meta.repo_id)
    if not columns:
        raise MissingEpisodeStatsError(
            f"dataset {label!r} ({where}) has no per-episode stats (stats/<feature>/<stat> columns), so its "
            "training episodes' normalization cannot be told apart from its held-out ones'. Re-write it with "
            "lerobot 0.4 or later (LeRobotDataset.save_episode writes them; v2.1 datasets get them from "
            "lerobot's convert_dataset_v21_to_v30)"
        )
    found = set(table.column("episode_index").to_pylist())
    if missing := sorted(set(int(e) for e in episodes) - found):
        raise MissingEpisodeStatsError(f"dataset {label!r}: episodes {missing} have no row in {where}")
    rows = table.select(["episode_index", *columns]).to_pylist()
    out = []
    for row in sorted(rows, key=lambda r: r["episode_index"]):
        stats: dict[str, dict[str, np.ndarray]] = {}
        for column in columns:
            _, feature, stat = column.split("/")
            if row[column] is not None:
                dtype = np.int64 if stat == "count" else np.float64
                stats.setdefault(feature, {})[stat] = np.asarray(row[column], dtype=dtype)
        out.append(stats)
    return out


def open_dataset(
    data: ClientData,
    episodes: list[int],
    policy_config: Any,
    video_backend: str | None,
    frame_cache: Path | None = None,
) -> Any:
    """A LeRobotDataset over some episodes, returning the action chunk the policy trains on. With
    `frame_cache` (a cache folder), its video frames are decoded once into a frame store there and read
    from it (cache.py): the same items, without decoding at every step."""
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from zk0lib.env import warn_if_no_torchcodec

    if video_backend in (None, "torchcodec"):
        warn_if_no_torchcodec()
    ds = LeRobotDataset(
        data.repo_id,
        root=data.root,
        episodes=episodes,
        delta_timestamps=resolve_delta_timestamps(policy_config, data.meta),
        video_backend=video_backend,
    )
    if frame_cache is None or not ds.meta.video_keys:
        return ds
    from zk0lib.cache import CachedItems, frame_store

    return CachedItems(ds, frame_store(data.repo_id, Path(ds.root), frame_cache, video_backend))


def frame_cache_of(cfg: ExperimentConfig) -> Path | None:
    """Where datasets read decoded frames from (data.cache frames or features), or None to decode videos."""
    return cfg.cache_dir if cfg.data.cache in ("frames", "features") else None


def open_for(cfg: ExperimentConfig, client: ClientData, episodes: list[int], policy_config: Any) -> Any:
    """A client's dataset over `episodes` as this config reads it (videos, or the frame cache)."""
    return open_dataset(client, episodes, policy_config, cfg.data.video_backend, frame_cache_of(cfg))


def embedded_for(cfg: ExperimentConfig, dataset: Any, bundle: Any) -> Any:
    """With data.cache=features, the dataset with frames replaced by the bundle's frozen image embeddings
    (and the policy reading them); otherwise the dataset as it is."""
    if cfg.data.cache != "features":
        return dataset
    from zk0lib.cache import EmbeddedItems, with_image_features

    if isinstance(dataset, EmbeddedItems):
        return dataset
    return with_image_features(dataset, bundle, cfg.cache_dir, cfg.data.rename_map)


class SkipUndecodable(torch.utils.data.Dataset):
    """Returns an error marker instead of raising when a frame cannot be read (e.g. a corrupt video)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        try:
            return self.dataset[idx]
        except Exception as e:  # noqa: BLE001 - any decode failure skips the batch; it is counted
            return {"__error__": f"item {idx}: {type(e).__name__}: {e}"}


def collate_or_skip(items: list[dict]) -> dict:
    errors = [it["__error__"] for it in items if "__error__" in it]
    if errors:
        return {"__skipped__": errors}
    return torch.utils.data.default_collate(items)


def _one_thread_worker(_: int) -> None:
    """A data-loader worker: one torch thread, and a video decoder cache of its own. The cache a forked
    worker inherits holds the parent's open video files; parent and workers then share each file's read
    offset, and concurrent reads corrupt one another's packets (torchcodec: "Could not push packet to
    decoder: Invalid data found when processing input", at random batches)."""
    from lerobot.datasets import video_utils

    torch.set_num_threads(1)
    video_utils._default_decoder_cache = video_utils.VideoDecoderCache()


class _SeededPermutation(torch.utils.data.Sampler):
    """Each pass a permutation fixed by `seed` (the same order RandomSampler draws from that seed), or with
    `weights`, n draws with replacement in proportion to them."""

    def __init__(self, n: int, weights: torch.Tensor | None = None):
        self.n, self.seed, self.weights = n, 0, weights

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the draw a seeded DataLoader makes first
        if self.weights is not None:
            return iter(torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist())
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class BatchStream:
    """Endless shuffled batches of one dataset, reproducible from a seed, through one DataLoader whose
    worker processes live as long as the stream: a client keeps its stream across rounds, so a round
    starts without spawning workers or reopening videos."""

    def __init__(self, dataset: Any, batch_size: int, num_workers: int, weights: torch.Tensor | None = None):
        wrapped = SkipUndecodable(dataset)
        if weights is not None and len(weights) != len(wrapped):
            raise ValueError(f"{len(weights)} sampling weights for a dataset of {len(wrapped)} frames")
        self.sampler = _SeededPermutation(len(wrapped), weights)
        self.loader = torch.utils.data.DataLoader(
            wrapped,
            batch_size=min(batch_size, len(wrapped)),
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate_or_skip,
            drop_last=True,
            worker_init_fn=_one_thread_worker if num_workers else None,
            persistent_workers=num_workers > 0,
            generator=torch.Generator(),  # never draw from the global RNG (the policy's noise comes from it)
        )
        self._current = None
        self._pending: int | None = None  # seed of a started iterator nobody has read from yet

    def batches(self, seed: int):
        """An endless iterator for `seed`; the previous one stops (its prefetched batches are dropped).
        If `prefetch(seed)` was called, its iterator, whose first batches are already decoding, is it."""
        if self._pending == seed:
            self._pending = None
            return self._current
        if self._current is not None:
            self._current.close()
        self.sampler.seed = seed * 1_000_003
        self._current = self._passes(seed, iter(self.loader))  # the workers start on the first pass now
        self._pending = None
        return self._current

    def close(self) -> None:
        """Stop the current iterator and its worker processes (their prefetched batches go with them)."""
        if self._current is not None:
            self._current.close()
        self._current, self._pending = None, None

    def prefetch(self, seed: int) -> None:
        """Start decoding the first batches for `seed` (e.g. the next round's) while this process waits."""
        self.batches(seed)
        self._pending = seed

    def _passes(self, seed: int, first: Any):
        yield from first
        epoch = 1
        while True:
            self.sampler.seed = seed * 1_000_003 + epoch
            yield from self.loader
            epoch += 1


def batch_stream(dataset: Any, batch_size: int, num_workers: int, seed: int, weights: torch.Tensor | None = None):
    """Endless shuffled batches, reproducible from `seed`; each pass over the data reshuffles (or, with
    per-frame `weights`, draws frames in proportion to them)."""
    return BatchStream(dataset, batch_size, num_workers, weights).batches(seed)
