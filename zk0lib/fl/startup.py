"""The federation's start: clients connect, describe their datasets (never frames), are checked to line
up, and get one pooled normalization."""

from __future__ import annotations

import json
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from zk0lib import data
from zk0lib.config import ExperimentConfig
from zk0lib.fl.transport import stats_from_record, stats_to_record
from zk0lib.runs import RunRecord


def wait_for_nodes(grid: Grid, cfg: ExperimentConfig) -> list[int]:
    """The connected node ids, once fl.min_available_clients (default: every client) are there."""
    need = cfg.fl.min_available_clients or len(cfg.data.clients)
    deadline = time.monotonic() + cfg.fl.round_timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= need:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {need} clients connected within fl.round_timeout_s")
        time.sleep(1.0)


def describe_clients(grid: Grid, cfg: ExperimentConfig, nodes: list[int], first_round: int = 0) -> list[dict[str, Any]]:
    """Every client's features and stats (with the node that serves it), in partition order; with
    `first_round`, clients also open their datasets and start decoding that round's first batches, so
    round 1 starts as warm as the others."""
    config = ConfigRecord({"zk0": "describe", "first-round": first_round})
    messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    infos = []
    for reply in grid.send_and_receive(messages, timeout=cfg.fl.round_timeout_s):
        if reply.has_error():
            raise RuntimeError(
                f"client on node {reply.metadata.src_node_id} could not describe its dataset: {reply.error.reason}"
            )
        info = dict(reply.content["info"])
        info["stats"] = stats_from_record(reply.content["stats"])  # empty under privacy.stats=pretrained
        info["features"] = json.loads(info["features"])
        info["node"] = reply.metadata.src_node_id
        infos.append(info)
    infos.sort(key=lambda i: i["partition-id"])
    pids = [i["partition-id"] for i in infos]
    if len(set(pids)) != len(pids):
        raise RuntimeError(f"two SuperNodes serve the same partition-id: {pids}")
    check_compatible(infos, cfg)
    return infos


def federation_meta(run: RunRecord, infos: list[dict[str, Any]], stats: dict) -> Any:
    """A LeRobot metadata folder with the clients' shared features and pooled stats (for the server's policy)."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    root = run.path / "federation_meta"
    if not (root / "meta" / "info.json").exists():
        feats = {
            k: v
            for k, v in infos[0]["features"].items()
            if k not in ("timestamp", "frame_index", "episode_index", "index", "task_index")
        }
        for v in feats.values():
            v["shape"] = tuple(v["shape"])
        meta = LeRobotDatasetMetadata.create(
            repo_id="zk0/federation",
            fps=int(infos[0]["fps"]),
            features=feats,
            robot_type=infos[0]["robot-type"] or None,
            root=root,
            use_videos=True,
        )
    else:
        meta = LeRobotDatasetMetadata("zk0/federation", root=root)
    meta.stats = stats
    return meta


def federation_stats(cfg: ExperimentConfig, infos: list[dict[str, Any]]) -> tuple[ArrayRecord, str]:
    """The normalization stats every client is sent, and where they come from: the clients' pooled stats, or
    under privacy.stats=pretrained the pretrained policy's own (no client's data, so no release)."""
    if not (cfg.privacy.on and cfg.privacy.stats == "pretrained"):
        source = "clients (exact pooled stats of their training episodes" + (
            ", a release outside epsilon)" if cfg.privacy.on else ")"
        )
        return pooled_stats_record(infos), source
    from zk0lib import model

    stats = model.pretrained_stats(cfg.model.pretrained)
    features = infos[0]["features"]
    for key in ("observation.state", "action"):
        have = stats.get(key, {}).get("mean")
        want = tuple(features.get(key, {}).get("shape", ()))
        if have is None or tuple(have.shape) != want:
            raise RuntimeError(
                f"privacy.stats=pretrained: {cfg.model.pretrained!r} has no {key} stats of shape {want} "
                f"(it has {None if have is None else tuple(have.shape)}): its robot differs from the clients'; "
                "use privacy.stats=clients"
            )
    return stats_to_record(stats), f"pretrained ({cfg.model.pretrained}: its pretraining data's stats)"


def pooled_stats_record(infos: list[dict[str, Any]]) -> ArrayRecord:
    """lerobot's count-weighted merge of the clients' stats, as the record every client is sent."""
    return stats_to_record(data.pooled_stats([i["stats"] for i in infos]))


def check_compatible(infos: list[dict[str, Any]], cfg: ExperimentConfig) -> None:
    """Refuse clients whose datasets do not line up, or (unless data.allow_invalid) that report errors."""
    from zk0lib.validate import compare_features

    problems = [
        f"{f.client}: {f.message} ({f.fix})"
        for f in compare_features({i["name"]: i for i in infos}, cfg.data.rename_map).errors
    ]
    if problems:
        raise RuntimeError("clients' datasets do not line up:\n  - " + "\n  - ".join(problems))
    invalid = [
        f"{i['name']}: {i['validation-errors']} errors ({i['validation-summary']})"
        for i in infos
        if i.get("validation-errors", 0)
    ]
    if invalid and not cfg.data.allow_invalid:
        raise RuntimeError(
            "clients' datasets failed validation:\n  - "
            + "\n  - ".join(invalid)
            + "\nRun `zk0 validate` on those machines; data.repair=true trains on repaired copies, "
            "data.allow_invalid=true trains anyway."
        )
