"""Fixtures: real components at tiny scale (the session's homes are set in the root conftest.py)."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from zk0lib import data, env, model
from zk0lib.config import load_config, zk0_home

env.quiet()
torch.set_num_threads(2)

# Tests that start Flower runs, CLI processes, sweeps or simulated recordings: `make test-fast` leaves them out.
E2E_FIXTURES = {"zk0_cli", "smoke_run", "three_kinds", "faulty_run", "sweep_dir", "recording"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())) or type(item).__name__ == "NotebookItem":
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def stays_time_shared():
    """No test may leave this process on a real-time scheduling policy (SVT-AV1 sets one when it encodes
    as root, see env.keep_scheduling): everything the process starts after would inherit it."""
    yield
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        pytest.fail(
            "this test left the process on a real-time scheduling policy (an encoder outside env.keep_scheduling?)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def torchcodec() -> None:
    """For tests of torchcodec's own behaviour: one clear line when it cannot load here."""
    problem = env.torchcodec_problem()
    if problem:
        pytest.fail(
            f"torchcodec cannot load ({problem}): install FFmpeg's libraries (apt-get install ffmpeg; "
            "`make install` and .ci/run do it as root)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def home() -> Path:
    return zk0_home()


@pytest.fixture(scope="session")
def smoke_cfg():
    return load_config("smoke")


@pytest.fixture(scope="session")
def clients(smoke_cfg):
    return [data.open_client(smoke_cfg, i) for i in range(len(smoke_cfg.data.clients))]


@pytest.fixture(scope="session")
def stats(clients):
    return data.pooled_train_stats(clients)


@pytest.fixture
def fresh_bundle(smoke_cfg, clients, stats):
    """A newly built tiny SmolVLA (same seed, so the same weights every time)."""
    return model.build_policy(smoke_cfg, clients[0].meta, stats)


@pytest.fixture(scope="session")
def session_bundle(smoke_cfg, clients, stats):
    return model.build_policy(smoke_cfg, clients[0].meta, stats)


@pytest.fixture(scope="session")
def train_set(clients, session_bundle):
    return data.open_dataset(clients[0], clients[0].train_episodes, session_bundle.config, None)


@pytest.fixture(scope="session")
def heldout_set(clients, session_bundle):
    return data.open_dataset(clients[0], clients[0].heldout_episodes, session_bundle.config, None)


def _run_cli(*args: str, timeout: int = 900):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "zk0lib.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def zk0_cli():
    """Run `zk0 ...` in a fresh process, as a user would."""
    return _run_cli


@pytest.fixture(scope="session")
def smoke_run(home, zk0_cli):
    """`zk0 train --preset smoke` once per session: (completed process, seconds, start time). Its clients
    report progress at every step (train.progress_every_s=0), which changes no number."""
    import time

    t0 = time.time()
    out = zk0_cli("train", "--preset", "smoke", "--run-id", "e2e-smoke", "--set", "train.progress_every_s=0")
    return out, time.time() - t0, t0


@pytest.fixture(scope="session")
def sweep_cli(home, zk0_cli):
    """`zk0 sweep` of two points, as a user would run it: (its folder, the finished process). Its FedProx
    point (the smoke preset, 1 round of 2 local steps) is also the simulation deploy-local is compared to."""
    out = zk0_cli(
        "sweep",
        "--preset",
        "smoke",
        "--sweep-id",
        "t2",
        "--grid",
        "fl.strategy=fedavg,fedprox",
        "--set",
        "fl.num_rounds=1",
        "--set",
        "train.local_steps=2",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return home / "reports" / "sweeps" / "t2", out


@pytest.fixture(scope="session")
def sweep_dir(sweep_cli):
    return sweep_cli[0]


@pytest.fixture
def corrupted_client(clients, tmp_path):
    """A copy of client 0 with 3 kB of garbage in the middle of its front-camera video."""
    root = tmp_path / "corrupt"
    shutil.copytree(clients[0].root, root)
    video = next((root / "videos" / "observation.images.front").rglob("*.mp4"))
    raw = bytearray(video.read_bytes())
    start = int(len(raw) * 0.3)
    raw[start : start + 3000] = os.urandom(3000)
    video.write_bytes(bytes(raw))
    return data.ClientData(
        0,
        "corrupt",
        clients[0].repo_id,
        root,
        data.load_metadata(clients[0].repo_id, root),
        clients[0].train_episodes,
        clients[0].heldout_episodes,
    )
