"""LeRobot v2.1 datasets converted with lerobot's own converter into a copy; v2.0 refused with what to do."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from zk0lib import convert, data, env
from zk0lib.config import ConfigError, load_config
from zk0lib.sources import dataset_key


def _write_v21(source, dest):
    """The content of a v3.0 dataset laid out as LeRobot v2.1 wrote it: a parquet and an mp4 per episode
    per camera, and jsonl metadata with per-episode stats."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.datasets.video_utils import encode_video_frames
    from PIL import Image

    info = json.loads((source / "meta" / "info.json").read_text())
    meta = LeRobotDatasetMetadata("zk0/v21", root=source)
    frames = pd.concat(pd.read_parquet(f) for f in sorted((source / "data").glob("*/*.parquet"))).sort_values("index")
    episodes = sorted(int(e) for e in frames.episode_index.unique())
    cameras = list(meta.video_keys)
    (dest / "meta").mkdir(parents=True)
    for ep in episodes:
        path = dest / "data" / "chunk-000" / f"episode_{ep:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frames[frames.episode_index == ep].to_parquet(path, index=False)
    decoded = LeRobotDataset("zk0/v21", root=source)
    for camera in cameras:
        for ep in episodes:
            pngs = dest / "png" / camera / str(ep)
            pngs.mkdir(parents=True)
            rows = np.flatnonzero(frames.episode_index.to_numpy() == ep)
            for i, row in enumerate(rows):
                img = (decoded[int(row)][camera].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(img).save(pngs / f"frame-{i:06d}.png")
            video = dest / "videos" / "chunk-000" / camera / f"episode_{ep:06d}.mp4"
            video.parent.mkdir(parents=True, exist_ok=True)
            with env.keep_scheduling():
                encode_video_frames(pngs, video, info["fps"])
    shutil.rmtree(dest / "png")
    for key in ("data_files_size_in_mb", "video_files_size_in_mb"):
        info.pop(key, None)
    info |= {
        "codebase_version": "v2.1",
        "total_chunks": 1,
        "total_videos": len(episodes) * len(cameras),
        "chunks_size": 1000,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
    }
    (dest / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    tasks = pd.read_parquet(source / "meta" / "tasks.parquet")
    lines = {
        "tasks.jsonl": [
            {"task_index": int(i), "task": str(t)} for t, i in zip(tasks.index, tasks.task_index, strict=True)
        ],
        "episodes.jsonl": [
            {"episode_index": ep, "tasks": [str(tasks.index[0])], "length": int((frames.episode_index == ep).sum())}
            for ep in episodes
        ],
        "episodes_stats.jsonl": [
            {"episode_index": ep, "stats": {f: {k: v.tolist() for k, v in s.items()} for f, s in stats.items()}}
            for ep, stats in zip(episodes, data.episode_stats(meta, episodes), strict=True)
        ],
    }
    for name, rows in lines.items():
        (dest / "meta" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_v21_dataset_is_converted_into_a_copy_and_trains_like_the_original(clients, tmp_path):
    source = clients[0]
    v21 = tmp_path / "community" / "so100_v21"
    _write_v21(source.root, v21)
    before = dataset_key(v21)
    cfg = load_config(
        "smoke",
        {
            "data.clients.0.source": "local",
            "data.clients.0.root": str(v21),
            "data.clients.0.repo_id": "someone/so100_v21",
            "output.data_cache": str(tmp_path / "cache"),
        },
    )
    converted = data.open_client(cfg, 0)
    assert converted.root.parent == tmp_path / "cache" / "converted"
    record = convert.conversion_of(converted.root)
    assert record["source"] == str(v21) and record["from"] == "v2.1" and record["to"] == "v3.0"
    assert "convert_dataset_v21_to_v30" in record["converter"]
    assert dataset_key(v21) == before  # the source is left as it was
    assert not list((tmp_path / "cache" / "converted").glob(".*"))  # no half-written work left
    assert converted.meta.total_episodes == source.meta.total_episodes
    assert converted.meta.total_frames == source.meta.total_frames
    # the same split, the same training-episode stats, the same frames (video re-encoded once)
    assert converted.train_episodes == source.train_episodes
    ours, theirs = data.train_stats(converted), data.train_stats(source)
    for key in ("action", "observation.state"):
        np.testing.assert_allclose(ours[key]["mean"], theirs[key]["mean"], rtol=1e-6)
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    a = LeRobotDataset(converted.repo_id, root=converted.root)
    b = LeRobotDataset(source.repo_id, root=source.root)
    last = len(b) - 1
    for i in (0, last):
        assert torch.equal(a[i]["action"], b[i]["action"]) and a[i]["task"] == b[i]["task"]
        for camera in b.meta.video_keys:
            assert (a[i][camera] - b[i][camera]).abs().mean() < 0.03

    # a second use reads the copy it made
    stamp = (converted.root / convert.RECORD).stat().st_mtime_ns
    assert data.open_client(cfg, 0).root == converted.root
    assert (converted.root / convert.RECORD).stat().st_mtime_ns == stamp

    # v2.0: refused by name, with what to do, nothing written
    v20 = tmp_path / "community" / "so100_v20"
    shutil.copytree(v21, v20)
    info = json.loads((v20 / "meta" / "info.json").read_text())
    (v20 / "meta" / "info.json").write_text(json.dumps(info | {"codebase_version": "v2.0"}))
    cfg20 = load_config(
        "smoke",
        {"data.clients.0.source": "local", "data.clients.0.root": str(v20), "output.data_cache": str(tmp_path / "c2")},
    )
    with pytest.raises(convert.DatasetFormatError, match=r"codebase v2\.0.*convert_dataset_v20_to_v21"):
        data.open_client(cfg20, 0)
    assert not (tmp_path / "c2" / "converted").exists()


def test_an_owner_whose_cameras_are_named_otherwise_joins_through_its_own_rename_map(clients, tmp_path):
    """data.clients.N.rename_map: owner 1 recorded with cameras it calls top and hand, owner 0 with front and
    wrist. Without a map the federation is refused; with owner 1's own map it reads a renamed copy (source
    untouched) whose frames and stats are owner 1's, and it trains."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from zk0lib import baselines
    from zk0lib.validate import validate_clients

    as_filmed = {
        "observation.images.front": "observation.images.top",
        "observation.images.wrist": "observation.images.hand",
    }
    other = convert.renamed_copy(tmp_path / "made", "made", clients[1].root, as_filmed)
    assert set(LeRobotDataset("someone/top-hand", root=other).meta.video_keys) == set(as_filmed.values())
    before = dataset_key(other)
    overrides = {
        "data.clients.1.source": "local",
        "data.clients.1.root": str(other),
        "data.clients.1.repo_id": "someone/top-hand",
        "output.data_cache": str(tmp_path / "cache"),
        "output.run_id": "renamed-owner",
    }
    plain = load_config("smoke", overrides)
    assert [f.check for f in validate_clients(plain, decode="none").errors] == ["clients.cameras"]
    back = json.dumps({v: k for k, v in as_filmed.items()})
    mapped = load_config("smoke", {**overrides, "data.clients.1.rename_map": back})
    assert validate_clients(mapped, decode="none").errors == []
    owner = data.open_client(mapped, 1)
    assert owner.root.parent == tmp_path / "cache" / "renamed" and dataset_key(other) == before
    assert json.loads((owner.root / convert.RENAMED).read_text())["source"] == str(other)
    a, b = LeRobotDataset(owner.repo_id, root=owner.root), LeRobotDataset(clients[1].repo_id, root=clients[1].root)
    for i in (0, len(b) - 1):
        for camera in b.meta.video_keys:
            assert torch.equal(a[i][camera], b[i][camera])
    ours, theirs = data.train_stats(owner), data.train_stats(clients[1])
    for camera in b.meta.video_keys:
        np.testing.assert_array_equal(ours[camera]["mean"], theirs[camera]["mean"])
    stamp = (owner.root / convert.RENAMED).stat().st_mtime_ns
    assert data.open_client(mapped, 1).root == owner.root  # made once: a second use reads the same copy
    assert (owner.root / convert.RENAMED).stat().st_mtime_ns == stamp

    record = baselines.run_baseline("centralized", mapped, progress=None).record
    assert record.summary()["status"] == "completed" and set(record.summary()["clients"]) == {"synth-0", "synth-1"}

    with pytest.raises(ValueError, match=r"names \['observation.images.side'\].*its cameras are"):
        convert.renamed_copy(tmp_path / "bad", "x", other, {"observation.images.side": "observation.images.front"})
    with pytest.raises(ValueError, match="already has"):
        convert.renamed_copy(tmp_path / "bad", "x", other, {"observation.images.top": "observation.images.hand"})
    with pytest.raises(ConfigError, match=r"data.clients.1.rename_map: two cameras renamed to one key"):
        load_config(
            "smoke", {"data.clients.1.rename_map": json.dumps(dict.fromkeys(as_filmed, "observation.images.x"))}
        )
