"""Validation finds each injected defect where it is; repairs give copies that pass."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zk0lib import env, synth
from zk0lib.config import load_config
from zk0lib.validate import (
    DatasetInvalidError,
    Report,
    check_before_training,
    compare_features,
    repair_dataset,
    validate_dataset,
)

FPS = 30


def write_dataset(root, lengths=(30, 30, 30, 30), dead_joint=None, duplicate=None, size=32, frozen=None):
    """A LeRobot dataset through lerobot's writer; `duplicate=(episode, frame)` adds that frame twice;
    `frozen=(episode, camera, first, last)` repeats that camera's image of frame `first` up to frame `last`."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset.create(
        repo_id="test/defects",
        fps=FPS,
        features=synth.features(size),
        root=root,
        robot_type="so101_follower",
        use_videos=True,
    )
    for ep, n in enumerate(lengths):
        spec = synth.SyntheticSpec(variant=ep, episodes=1, frames=n, image_size=size, seed=ep)
        states, actions, goal = synth.episode(spec, 0)
        held = None  # the frozen camera's image
        for k, (state, action) in enumerate(zip(states, actions, strict=True)):
            if dead_joint is not None:
                state[dead_joint] = action[dead_joint] = 12.0
            images = synth.render(spec, state, goal)
            if frozen is not None and frozen[0] == ep and k == frozen[2]:
                held = images[frozen[1]]
            if frozen is not None and frozen[0] == ep and frozen[2] < k <= frozen[3]:
                images[frozen[1]] = held
            frame = {
                "observation.state": state,
                "action": action,
                "task": synth.task_text(ep),
                **{f"observation.images.{c}": img for c, img in images.items()},
            }
            ds.add_frame(dict(frame))
            if duplicate == (ep, k):
                ds.add_frame(dict(frame))
        env.save_episode(ds)
    env.finalize(ds)
    return root


def patch_table(root, fn):
    path = next((root / "data").rglob("*.parquet"))
    table = pq.read_table(path)
    df = fn(table.to_pandas())
    pq.write_table(pa.Table.from_pandas(df, schema=table.schema, preserve_index=False), path)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("clean") / "ds")


@pytest.fixture
def copy_of(clean, tmp_path):
    def make(name="copy"):
        dest = tmp_path / name
        shutil.copytree(clean, dest)
        return dest

    return make


def findings(report, check):
    return [f for f in report.findings if f.check == check]


def assert_passes(root):
    again = validate_dataset(root, decode="full", chunk_size=10)
    assert again.errors == [], again.table()


def test_clean_dataset_has_no_findings(clean):
    report = validate_dataset(clean, decode="full", chunk_size=10)
    assert report.findings == [], report.table()
    checked = report.checked[0]
    assert checked["decoded_frames"] == 4 * 30 * 2 and checked["episodes"] == 4


def test_doubled_frame(tmp_path):
    root = write_dataset(tmp_path / "doubled", duplicate=(2, 9))

    def shift(df):
        rows = np.flatnonzero(df["episode_index"].to_numpy() == 2)
        ts = df["timestamp"].to_numpy().copy()
        ts[rows[10] : rows[-1] + 1] -= np.float32(1 / FPS)  # the copy repeats frame 9's timestamp
        df["timestamp"] = ts
        return df

    patch_table(root, shift)
    report = validate_dataset(root, decode="full", chunk_size=10)
    [f] = findings(report, "timestamps.doubled")
    assert (f.episode, f.frame, f.severity) == (2, 10, "error") and "repeats the previous one" in f.message
    assert "re-times" in f.fix
    assert [e.check for e in report.errors] == ["timestamps.doubled"]
    fixed = repair_dataset(root, tmp_path / "fixed", report)
    assert fixed.dropped_frames == {2: [10]} and fixed.dropped_episodes == []
    assert_passes(fixed.root)
    info = json.loads((fixed.root / "meta" / "info.json").read_text())
    assert info["total_frames"] == 4 * 30 and info["total_episodes"] == 4


def test_time_jump(copy_of, tmp_path):
    root = copy_of()

    def jump(df):
        rows = np.flatnonzero(df["episode_index"].to_numpy() == 1)
        ts = df["timestamp"].to_numpy().copy()
        ts[rows[15] : rows[-1] + 1] += np.float32(0.5)
        df["timestamp"] = ts
        return df

    patch_table(root, jump)
    report = validate_dataset(root, decode="none")
    [f] = findings(report, "timestamps.jump")
    assert (f.episode, f.frame, f.severity) == (1, 15, "error") and "~15 frames missing" in f.message
    fixed = repair_dataset(root, tmp_path / "fixed", validate_dataset(root, decode="full"))
    assert fixed.dropped_episodes == [1]
    assert_passes(fixed.root)


def test_corrupted_video_packet(copy_of, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = copy_of()
    video = next((root / "videos" / "observation.images.front").rglob("*.mp4"))
    raw = bytearray(video.read_bytes())
    start = int(len(raw) * 0.4)
    raw[start : start + 2000] = os.urandom(2000)
    video.write_bytes(bytes(raw))
    report = validate_dataset(root, decode="full")
    bad = findings(report, "video.decode")
    assert bad and all(f.severity == "error" and "observation.images.front" in f.message for f in bad)
    reported = {(f.episode, frame) for f in bad for frame in f.frames}
    ds = LeRobotDataset("test/defects", root=root)  # what training would hit, item by item
    failing = set()
    for i in range(len(ds)):
        try:
            ds[i]
        except Exception:  # noqa: BLE001
            row = ds.hf_dataset[i]
            failing.add((int(row["episode_index"]), int(row["frame_index"])))
    assert reported == failing
    fixed = repair_dataset(root, tmp_path / "fixed", report)
    assert set(fixed.dropped_episodes) == {ep for ep, _ in failing}
    assert_passes(fixed.root)


def test_sampled_decoding_reads_a_fraction(copy_of):
    report = validate_dataset(copy_of(), decode="sample", sample_fraction=0.1)
    assert 4 * 2 * 2 <= report.checked[0]["decoded_frames"] < 4 * 30 * 2 / 2


def test_nan_action(copy_of, tmp_path):
    root = copy_of()

    def nan(df):
        rows = np.flatnonzero(df["episode_index"].to_numpy() == 3)
        action = df["action"].to_numpy().copy()
        bad = np.array(action[rows[7]], dtype=np.float32)
        bad[1] = np.nan
        action[rows[7]] = bad
        df["action"] = action
        return df

    patch_table(root, nan)
    report = validate_dataset(root, decode="none")
    [f] = findings(report, "values.nonfinite")
    assert (f.episode, f.frame, f.severity) == (3, 7, "error") and "shoulder_lift.pos" in f.message
    fixed = repair_dataset(root, tmp_path / "fixed", validate_dataset(root, decode="full"))
    assert fixed.dropped_episodes == [3]
    assert_passes(fixed.root)


def test_a_frozen_camera_is_found_with_its_episode_and_frames(tmp_path):
    """A camera whose stream stalls (the same image for 20 frames while the arm moves ~8 deg) is a warning naming
    the camera, the episode and the frames; the other camera, and every clean episode, are not flagged."""
    root = write_dataset(tmp_path / "frozen", lengths=(30, 30), frozen=(1, "wrist", 5, 24))
    report = validate_dataset(root, decode="full", chunk_size=10)
    [f] = findings(report, "video.frozen")
    # frames 6-24 repeat frame 5's image; the codec may still refine the first repeat, so the run starts at 5 or 6
    assert (f.severity, f.episode) == ("warning", 1) and f.frame in (5, 6) and f.frames == list(range(f.frame, 25))
    assert f.message.startswith(f"observation.images.wrist: {len(f.frames)} identical frames in a row ({f.frame}-24)")
    assert report.errors == []
    # The same frames in a simulated lab's recording: its cameras are rendered (no sensor noise), so a view
    # that holds still repeats frames exactly without any stall; they are not judged.
    from zk0lib.sim.record import RECORD_INFO

    (root / RECORD_INFO).write_text(json.dumps({"lab": "lab-red"}))
    assert findings(validate_dataset(root, decode="full", chunk_size=10), "video.frozen") == []


def test_dead_joint(tmp_path):
    report = validate_dataset(write_dataset(tmp_path / "dead", dead_joint=2), decode="none")
    dead = findings(report, "values.dead_joint")
    assert {f.severity for f in dead} == {"warning"}
    assert any("observation.state joint elbow_flex.pos never moves" in f.message for f in dead)
    assert any("action joint elbow_flex.pos" in f.message for f in dead)


def test_episode_shorter_than_the_chunk(tmp_path):
    report = validate_dataset(write_dataset(tmp_path / "short", lengths=(30, 6, 30)), decode="none", chunk_size=10)
    [f] = findings(report, "structure.short_episode")
    assert (f.episode, f.severity) == (
        1,
        "warning",
    ) and "6 frames is shorter than the policy's action chunk (10)" in f.message


def test_stale_stats_are_recomputed(copy_of, tmp_path):
    root = copy_of()
    stats = json.loads((root / "meta" / "stats.json").read_text())
    stats["action"]["mean"] = [m + 5.0 for m in stats["action"]["mean"]]
    (root / "meta" / "stats.json").write_text(json.dumps(stats))
    report = validate_dataset(root, decode="none")
    [f] = findings(report, "structure.stats_stale")
    assert f.severity == "warning" and "action" in f.message
    fixed = repair_dataset(root, tmp_path / "fixed", report)
    assert fixed.dropped_episodes == [] and validate_dataset(fixed.root, decode="none").findings == []


def test_clients_that_do_not_line_up(clean, tmp_path):
    info = json.loads((clean / "meta" / "info.json").read_text())
    other = json.loads(json.dumps(info))
    other["features"]["observation.images.top"] = other["features"].pop("observation.images.front")
    other["features"]["action"]["shape"] = [7]
    report = compare_features({"owner-a": info, "owner-b": other}, rename_map={})
    checks = {f.check for f in report.errors}
    assert checks == {"clients.cameras", "clients.features"} and all(f.client == "owner-b" for f in report.errors)
    renamed = compare_features({"a": info, "b": other}, {"observation.images.top": "observation.images.front"})
    assert [f.check for f in renamed.findings] == ["clients.features"]  # the cameras now line up


def test_report_table_and_files(copy_of, tmp_path):
    report = Report()
    assert report.table() == "no findings"
    root = copy_of()
    patch_table(root, lambda df: df.assign(timestamp=df["timestamp"].where(df.index != 40, df["timestamp"].shift(1))))
    report = validate_dataset(root, decode="none")
    csv_path, json_path = report.save(tmp_path / "reports", "x")
    assert "timestamps.doubled" in csv_path.read_text()
    assert Report.from_dict(json.loads(json_path.read_text())).findings == report.findings


def test_training_refuses_invalid_data_unless_repaired(copy_of, home):
    root = copy_of("client-data")
    patch_table(root, lambda df: df.assign(timestamp=df["timestamp"].where(df.index != 40, df["timestamp"].shift(1))))
    overrides = {
        "data.clients.0.source": "local",
        "data.clients.0.root": str(root),
        "data.clients.0.repo_id": "test/defects",
        "data.clients.0.name": "owner-x",
    }
    cfg = load_config("smoke", overrides)
    with pytest.raises(DatasetInvalidError, match="timestamps.doubled"):
        check_before_training(cfg)
    allowed = load_config("smoke", {**overrides, "data.allow_invalid": True})
    assert check_before_training(allowed).errors
    repaired = load_config("smoke", {**overrides, "data.repair": True})
    assert check_before_training(repaired).errors == []
    from zk0lib.sources import dataset_location

    _, used = dataset_location(repaired, repaired.data.clients[0])
    assert used != root and "repaired" in str(used)
    assert (root / "meta" / "info.json").exists()  # the source is untouched


def test_cli_validate_writes_the_table(home, zk0_cli):
    out = zk0_cli("validate", "--preset", "smoke", "--name", "smoke-check")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no findings" in out.stdout and "s per 1000 frames per camera" in out.stdout
    assert (home / "reports" / "validation" / "smoke-check.csv").exists()


def test_the_hub_presets_cameras_line_up_across_so100_and_so101_datasets(clean):
    """zk0-hub federates svla_so100_* (top, wrist cameras) with svla_so101_pickplace (up, side): its rename map
    puts both pairs on smolvla_base's camera1/camera2, so the start-up check lets the federation through."""
    from zk0lib.config import load_config

    info = json.loads((clean / "meta" / "info.json").read_text())
    cams = [k for k, v in info["features"].items() if v.get("dtype") in ("video", "image")]
    assert len(cams) == 2

    def filmed_by(a: str, b: str) -> dict:
        other = json.loads(json.dumps(info))
        for old, new in zip(cams, (a, b), strict=True):
            other["features"][f"observation.images.{new}"] = other["features"].pop(old)
        return other

    hub = load_config("zk0-hub").data.rename_map
    datasets = {"so100": filmed_by("top", "wrist"), "so101": filmed_by("up", "side")}
    assert compare_features(datasets, hub).findings == []
    assert [f.check for f in compare_features(datasets, {}).errors] == ["clients.cameras"]  # without the map


def test_validate_by_path_without_a_preset(clean, copy_of, home, tmp_path, capsys):
    """`zk0 validate PATH ...`: a robot owner's folders checked as they are, one client each, and across them;
    a path that is not a dataset, and a Hub id not in the cache, are refused with what to do."""
    from zk0lib.cli import build_parser

    def zk0_validate(*args):
        parsed = build_parser().parse_args(["validate", *args])
        return parsed.func(parsed), capsys.readouterr()

    other = copy_of("other")
    code, out = zk0_validate(str(clean), str(other), "--decode", "sample", "--name", "by-path")
    assert code == 0, out.out[-2000:] + out.err[-2000:]
    saved = json.loads((home / "reports" / "validation" / "by-path.json").read_text())
    assert [(c["client"], c["root"]) for c in saved["checked"]] == [("ds", str(clean)), ("other", str(other))]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = zk0_validate(str(empty))
    assert code == 2 and "not a LeRobot dataset folder (it has no meta/info.json)" in out.err
    code, out = zk0_validate("nobody/not-downloaded")
    assert code == 2 and "huggingface-cli download --repo-type dataset nobody/not-downloaded" in out.err
