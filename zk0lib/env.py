"""Process environment: quiet third-party logs, Hub offline mode when nothing needs the Hub."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zk0lib.config import TINY, ExperimentConfig, resolve_pretrained

QUIET = {
    "SVT_LOG": "1",  # SVT-AV1 encoder: errors only
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore:Cannot enable progress bars",
}


def quiet() -> None:
    """For zk0's entry points: the defaults above (never overriding the user's) and no FFmpeg chatter."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="Cannot enable progress bars")
    logging.getLogger("lerobot").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # lerobot warns through the root logger
    try:
        import av

        av.logging.set_level(av.logging.ERROR)
    except ImportError:  # PyAV is a lerobot dependency; without it nothing encodes anyway
        pass


_TORCHCODEC: dict[str, str | None] = {}


def torchcodec_problem() -> str | None:
    """Why torchcodec cannot decode videos in this process (None when it can); looked up once. It loads
    the system's FFmpeg libraries; without them lerobot falls back to PyAV (slower) with no word from us."""
    if "problem" not in _TORCHCODEC:
        try:
            import torchcodec.decoders  # noqa: F401 - loads libtorchcodec_core*, which links FFmpeg

            _TORCHCODEC["problem"] = None
        except Exception as e:  # noqa: BLE001 - OSError, RuntimeError or ImportError depending on what is missing
            _TORCHCODEC["problem"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    return _TORCHCODEC["problem"]


def warn_if_no_torchcodec() -> None:
    """One line on stderr, once per process, when videos will be decoded by PyAV instead of torchcodec."""
    problem = torchcodec_problem()
    if problem and not _TORCHCODEC.get("warned"):
        _TORCHCODEC["warned"] = "yes"
        print(
            f"zk0: warning: torchcodec cannot load ({problem}); lerobot decodes videos with PyAV instead (slower). "
            "Install FFmpeg's shared libraries (Debian/Ubuntu: apt-get install ffmpeg; `make install` does it as root).",
            file=sys.stderr,
        )


def needs_hub(cfg: ExperimentConfig) -> bool:
    """Whether anything in the config must come from the Hugging Face Hub."""
    pretrained = resolve_pretrained(cfg.model.pretrained)
    model_remote = pretrained != TINY and not Path(pretrained).expanduser().exists()
    data_remote = any(c.source == "hub" and c.root is None for c in cfg.data.clients)
    return model_remote or data_remote


def use_offline_hub_if_possible(cfg: ExperimentConfig) -> bool:
    """Turn on HF_HUB_OFFLINE when the config needs no Hub, so nothing waits on a network timeout."""
    if needs_hub(cfg):
        return False
    return set_hub_offline()


def set_hub_offline() -> bool:
    """HF_HUB_OFFLINE for this process (and its children), unless the user set HF_HUB_OFFLINE=0.

    Without it, looking up a local-only repo such as the tiny VLM waits on network timeouts where the
    Hub is unreachable (minutes here)."""
    if os.environ.get("HF_HUB_OFFLINE") == "0":
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:  # already imported: flip the constant it reads
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    return True


@contextmanager
def native_stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 to `path` for a while: FFmpeg's muxer and SVT-AV1 write there from C,
    out of reach of Python's logging, once per encoded video."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextmanager
def keep_scheduling() -> Iterator[None]:
    """Around video encoding: SVT-AV1, lerobot's default codec, switches the thread that opens an encoder to
    real-time SCHED_FIFO when the process runs as root (containers, CI machines). A real-time thread then
    starves the rest of the machine, and every process it starts inherits the policy: Flower's ServerApp
    misses its heartbeats, Chromium and the kernel spin. This puts the calling thread's policy back."""
    if not hasattr(os, "sched_getscheduler"):  # not Linux
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if os.sched_getscheduler(0) != policy or os.sched_getparam(0) != param:
            os.sched_setscheduler(0, policy, param)


def save_episode(dataset) -> None:
    """`LeRobotDataset.save_episode`, encoded in this process (where FFmpeg's chatter is redirected) with the
    scheduling policy kept (see `keep_scheduling`)."""
    with keep_scheduling():
        dataset.save_episode(parallel_encoding=False)


def finalize(dataset) -> None:
    """`LeRobotDataset.finalize` (it may flush encoders) with the scheduling policy kept."""
    with keep_scheduling():
        dataset.finalize()


class Stopped(BaseException):
    """zk0 was told to stop (SIGTERM from `timeout`, a job scheduler or `kill`; SIGHUP from a closed
    terminal). Raised in the main thread, so every `with` block on the way out runs: the SuperLink, the
    simulation and Ray are stopped, and the run record says why it ended."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def stop_cleanly_on_signals() -> None:
    """For zk0's command line: SIGTERM and SIGHUP raise `Stopped` (Python's default for them ends the process
    at once, leaving the SuperLink and Ray, which run in their own session, alive and busy). A second signal
    during the clean-up is ignored; SIGKILL still ends everything at once."""

    def handler(signum: int, _frame: object) -> None:
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)
