"""Where a client's dataset lives: its source (the Hub cache, a local folder, or a synthetic or simulated
dataset recorded on first use), the v3.0 copy zk0 converted a v2.1 source into (convert.py), or the
repaired copy zk0 made of it; and what identifies its content."""

from __future__ import annotations

import hashlib
from pathlib import Path

from zk0lib.config import ClientConfig, ExperimentConfig
from zk0lib.synth import SyntheticSpec, ensure_synthetic_dataset


def dataset_location(cfg: ExperimentConfig, client: ClientConfig, progress=None) -> tuple[str, Path | None]:
    """(repo_id, root) of the dataset a client trains on: its source, or with data.repair the repaired
    copy zk0 made of it (`zk0 validate --repair`, or before training); with the client's own rename_map,
    a copy with its cameras renamed (convert.renamed_copy)."""
    repo_id, root = source_location(cfg, client, progress)
    if cfg.data.repair:
        fixed = repaired_root(cfg.cache_dir, client.name, root if root is not None else hub_root(repo_id))
        if (fixed / "meta" / "info.json").exists():
            root = fixed
    here = root if root is not None else hub_root(repo_id)
    if client.rename_map and (here / "meta" / "info.json").exists():  # else: opening it says what is missing
        from zk0lib.convert import renamed_copy

        root = renamed_copy(cfg.cache_dir, client.name, here, client.rename_map)
    return repo_id, root


def hub_root(repo_id: str) -> Path:
    from lerobot.utils.constants import HF_LEROBOT_HOME

    return Path(HF_LEROBOT_HOME) / repo_id


def source_location(cfg: ExperimentConfig, client: ClientConfig, progress=None) -> tuple[str, Path | None]:
    """(repo_id, root) of a client's source dataset; synthetic and simulated ones are recorded on first
    use (`progress(done, total)` hears about each recorded episode)."""
    if client.source == "synthetic":
        d = cfg.data
        spec = SyntheticSpec(client.variant, d.synthetic_episodes, d.synthetic_frames, d.synthetic_image_size, cfg.seed)
        return client.repo_id, ensure_synthetic_dataset(spec, client.repo_id, cfg.cache_dir / "datasets" / "synthetic")
    if client.source == "sim":
        from zk0lib.sim.record import record_lab

        d = cfg.data
        rec = record_lab(
            client.lab,
            d.sim_episodes,
            cfg.cache_dir,
            d.sim_image_size,
            cfg.seed,
            d.record_workers,
            progress,
            d.sim_noise_deg,
        )
        return f"zk0/{client.lab}", rec.root
    from zk0lib.convert import ensure_current

    if client.root is not None:
        root = Path(client.root).expanduser()
        root = root if root.is_absolute() else cfg.home / root
        repo_id = client.repo_id or root.name
        return repo_id, ensure_current(cfg.cache_dir, client.name, repo_id, root)
    cached = hub_root(client.repo_id)  # a v2.1 snapshot already downloaded there converts like a local folder
    if (cached / "meta" / "info.json").exists():
        converted = ensure_current(cfg.cache_dir, client.name, client.repo_id, cached)
        if converted != cached:
            return client.repo_id, converted
    return client.repo_id, None


def dataset_key(root: Path) -> str:
    """What identifies a dataset's content cheaply: its files' names, sizes and modification times."""
    parts = []
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            st = p.stat()
            parts.append(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def repaired_root(cache_dir: Path, name: str, source: Path) -> Path:
    return cache_dir / "repaired" / f"{name}-{hashlib.sha256(dataset_key(source).encode()).hexdigest()[:12]}"
