"""Datasets in an older LeRobot format, as many community SO-100 datasets still are.

lerobot 0.6 reads codebase v3.0 only. A v2.1 dataset is converted with lerobot's own converter
(`lerobot.scripts.convert_dataset_v21_to_v30`) into a copy under `data_cache/converted/` - the source is
left as it is and nothing is pushed - once, before validation and training; the copy records where it
came from. v2.0 and older are refused with what to do: lerobot 0.6 has no converter for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

CURRENT = "v3.0"
CONVERTIBLE = "v2.1"
RECORD = "zk0_converted.json"  # in a converted copy: its source, the versions, the converter


class DatasetFormatError(ValueError):
    """A dataset in a LeRobot format zk0 can neither read nor convert."""


def codebase_version(root: Path) -> str | None:
    """The `codebase_version` of a dataset folder's meta/info.json (None: no readable info.json there)."""
    try:
        return str(json.loads((Path(root) / "meta" / "info.json").read_text())["codebase_version"])
    except (OSError, ValueError, KeyError):
        return None


def converted_root(cache_dir: Path, name: str, source: Path) -> Path:
    """Where a source's converted copy lives: keyed by the source's files, so a changed source converts again."""
    from zk0lib.sources import dataset_key

    return Path(cache_dir) / "converted" / f"{name}-{hashlib.sha256(dataset_key(source).encode()).hexdigest()[:12]}"


def ensure_current(
    cache_dir: Path, name: str, repo_id: str, root: Path, progress: Callable[[str], None] | None = None
) -> Path:
    """`root` itself when lerobot reads it as it is; its converted copy (made on first use) when it is v2.1."""
    version = codebase_version(root)
    if version is None or not version.startswith("v2"):
        return Path(root)  # v3.x, or not a dataset folder yet: lerobot's own checks speak for it
    if version != CONVERTIBLE:
        raise DatasetFormatError(
            f"dataset {name!r} ({root}) is LeRobot codebase {version}; lerobot 0.6 reads {CURRENT} and converts "
            f"only {CONVERTIBLE}. Convert it to {CONVERTIBLE} first with lerobot 0.3's converter "
            "(pip install 'lerobot==0.3.3' in another environment, then python -m "
            f"lerobot.datasets.v21.convert_dataset_v20_to_v21 --repo-id {repo_id} --root <a copy of it>); "
            "zk0 converts the v2.1 copy to v3.0 on first use"
        )
    dest = converted_root(cache_dir, name, root)
    if codebase_version(dest) == CURRENT:
        return dest
    (progress or _stderr)(f"converting {name} ({root}, LeRobot {version}) with lerobot's converter -> {dest}")
    work = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    copy = work / "dataset"
    _link_copy(Path(root), copy)
    from lerobot.scripts.convert_dataset_v21_to_v30 import convert_dataset

    from zk0lib.env import keep_scheduling

    # in place on the copy: lerobot writes <copy>_v30, then renames <copy> to <copy>_old and the new one to <copy>
    with keep_scheduling():  # it remuxes the videos through PyAV
        convert_dataset(repo_id, root=copy, push_to_hub=False, force_conversion=True)
    shutil.rmtree(work / "dataset_old", ignore_errors=True)
    if codebase_version(copy) != CURRENT:
        raise DatasetFormatError(f"dataset {name!r}: lerobot's converter left {copy} at {codebase_version(copy)}")
    (copy / RECORD).write_text(
        json.dumps({"source": str(root), "from": version, "to": CURRENT, "converter": _converter()}, indent=2)
    )
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(copy, dest)
    shutil.rmtree(work, ignore_errors=True)
    return dest


def conversion_of(root: Path | None) -> dict | None:
    """What a converted copy records of its source (None for a dataset zk0 did not convert)."""
    try:
        return json.loads((Path(root) / RECORD).read_text()) if root is not None else None
    except (OSError, ValueError):
        return None


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


RENAMED = "zk0_renamed.json"  # in a renamed copy: its source and the camera map


def renamed_copy(cache_dir: Path, name: str, root: Path, mapping: dict[str, str]) -> Path:
    """A client's dataset with its camera keys renamed (`data.clients.N.rename_map`), so that owners who named
    the same camera differently line up before the federation-wide map meets the policy. The copy (under
    data_cache/renamed/, made once, keyed by the source's files and the map) hard-links the frames and the
    videos and rewrites only what names the cameras: meta/info.json's features, meta/stats.json, the
    columns of meta/episodes, the folders under videos/. The source is left as it is."""
    from zk0lib.sources import dataset_key

    root = Path(root)
    mapping = {k: v for k, v in mapping.items() if k != v}
    if not mapping:
        return root
    info = json.loads((root / "meta" / "info.json").read_text())
    features = info["features"]
    cameras = [k for k, f in features.items() if f.get("dtype") in ("video", "image")]
    unknown = [k for k in mapping if k not in features]
    if unknown:
        raise ValueError(
            f"client {name!r}: rename_map names {unknown}, which dataset {root} does not have; its cameras are "
            f"{cameras}"
        )
    images = [k for k in mapping if features[k].get("dtype") != "video"]
    if images:
        raise ValueError(
            f"client {name!r}: rename_map can rename video cameras only; {images} are stored as "
            f"{features[images[0]].get('dtype')!r} (map them with data.rename_map instead)"
        )
    kept = set(features) - set(mapping)
    clash = sorted(set(mapping.values()) & kept)
    if clash:
        raise ValueError(f"client {name!r}: rename_map renames a camera to {clash}, which the dataset already has")
    digest = hashlib.sha256((dataset_key(root) + json.dumps(mapping, sort_keys=True)).encode()).hexdigest()[:12]
    dest = Path(cache_dir) / "renamed" / f"{name}-{digest}"
    if (dest / RENAMED).exists():
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _link_copy(root, tmp)
    for old, new in mapping.items():
        if (tmp / "videos" / old).exists():
            (tmp / "videos" / old).rename(tmp / "videos" / new)
    info["features"] = {mapping.get(k, k): v for k, v in features.items()}
    _rewrite_text(tmp / "meta" / "info.json", json.dumps(info, indent=4))
    stats = tmp / "meta" / "stats.json"
    if stats.exists():
        _rewrite_text(stats, json.dumps({mapping.get(k, k): v for k, v in json.loads(stats.read_text()).items()}))
    _rename_episode_columns(tmp / "meta" / "episodes", mapping)
    (tmp / RENAMED).unlink(missing_ok=True)  # a renamed source's own record, hard-linked
    (tmp / RENAMED).write_text(json.dumps({"source": str(root), "rename_map": mapping}, indent=2))
    try:
        os.replace(tmp, dest)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / RENAMED).exists():
            raise
    return dest


def _rewrite_text(path: Path, text: str) -> None:
    """A new file in place of a hard link: the source's own file stays as it is (never write through one)."""
    path.unlink()
    path.write_text(text)


def _rename_episode_columns(folder: Path, mapping: dict[str, str]) -> None:
    """meta/episodes' per-camera columns (videos/<key>/..., stats/<key>/...) under the new keys."""
    import pyarrow.parquet as pq

    def renamed(column: str) -> str:
        kind, _, rest = column.partition("/")
        for old, new in mapping.items():
            if kind in ("videos", "stats") and rest.startswith(old + "/"):
                return f"{kind}/{new}/{rest[len(old) + 1 :]}"
        return column

    for path in sorted(folder.rglob("*.parquet")):
        table = pq.read_table(path)
        table = table.rename_columns([renamed(c) for c in table.column_names])
        path.unlink()
        pq.write_table(table, path)


def _link_copy(source: Path, dest: Path) -> None:
    """A copy of a dataset folder that costs no space where it can: hard links (the converter only reads the
    files and renames the folder), real copies across file systems."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=link)


def _converter() -> str:
    from importlib.metadata import version

    return f"lerobot {version('lerobot')} convert_dataset_v21_to_v30"
