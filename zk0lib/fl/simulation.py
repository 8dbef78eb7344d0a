"""`run_federated`: a Flower simulation through Flower's supported path, started and stopped by zk0.

zk0 starts a private simulation SuperLink on a free loopback port (its own FLWR_HOME, runtime dependency
installation off, telemetry off), submits the app with `flwr run --stream`, relays the ServerApp's
progress lines, and on return or failure stops the SuperLink with every process it started (SuperExec,
flwr-simulation, Ray), so nothing is left running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zk0lib import env
from zk0lib.config import BASE, BASE_DIR_ENV, ExperimentConfig, resolve_pretrained
from zk0lib.fl.transport import encode_config
from zk0lib.launch import FederatedRunError, RunResult, start_run
from zk0lib.runs import RunRecord, resume_round, truncate_rounds, utc_now

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_START_FAILURE = re.compile(
    r"Failed to connect to GCS|Could not start Ray|RaySystemError|The current node timed out during startup"
)


def stage_app(dest: Path) -> Path:
    """Copy the Flower app (pyproject.toml + zk0lib sources) into `dest` and return it.

    `flwr run .` in the checkout works too, but Flower walks every file under the app folder (the
    .venv included) to build the FAB: ~20 s here. The staged copy holds only what the FAB carries.
    """
    src = Path(__file__).resolve().parents[2]
    pyproject = src / "pyproject.toml"
    if not pyproject.exists() or "[tool.flwr.app]" not in pyproject.read_text():
        raise FederatedRunError(f"no Flower app found at {src}: run zk0 from its source checkout")
    shutil.copy2(pyproject, dest / "pyproject.toml")
    for path in (src / "zk0lib").rglob("*.py"):
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else (shutil.which(name) or name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a process and all its descendants (SuperExec, simulation, Ray workers)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything that escaped the tree but kept the session
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=5)


def flower_env(cfg: ExperimentConfig, flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process zk0 starts: its own FLWR_HOME, this ZK0_HOME, quiet logs, no
    runtime dependency installation, and this venv first on PATH (Flower starts its helpers by name)."""
    return (
        dict(os.environ)
        | env.QUIET
        | {
            "FLWR_HOME": str(flwr_home),
            "ZK0_HOME": str(cfg.home),
            BASE_DIR_ENV: resolve_pretrained(BASE),  # the FAB Flower runs the apps from has no weights
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
            # Ray's GCS client gives up after 5 s by default: too short on a loaded 2-core machine
            "RAY_gcs_rpc_server_connect_timeout_s": os.environ.get("RAY_gcs_rpc_server_connect_timeout_s", "60"),
            # no idle Ray workers started ahead of the client actors (they compete with them for the CPUs)
            "RAY_enable_worker_prestart": os.environ.get("RAY_enable_worker_prestart", "0"),
            "RAY_prestart_worker_first_driver": os.environ.get("RAY_prestart_worker_first_driver", "0"),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
    )


def stream_flwr_run(
    cmd: list[str], flower_env_: dict[str, str], log_path: Path, progress: Callable[[str], None] | None
) -> str:
    """Run `flwr run ... --stream`, copy its output to the log, relay the ServerApp's [zk0] lines; returns
    Flower's run id ('' when the run did not start)."""
    flower_run_id = ""
    with open(log_path, "a", encoding="utf-8", buffering=1) as log:
        proc = subprocess.Popen(
            cmd, env=flower_env_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        try:
            for line in proc.stdout:
                log.write(line)
                clean = _ANSI.sub("", line).rstrip()
                if m := re.search(r"Successfully started run (\d+)", clean):
                    flower_run_id = m.group(1)
                if "[zk0] " in clean and progress is not None:
                    progress(clean.split("[zk0] ", 1)[1])
        finally:  # zk0 stopped while streaming (Ctrl-C, SIGTERM): the `flwr run` client goes too
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return flower_run_id


@contextmanager
def failing_run(run: RunRecord):
    """Whatever escapes the block marks the run failed with its reason (unless the ServerApp already did)."""
    try:
        yield
    except BaseException as e:
        if run.summary().get("status") == "running":
            run.fail(f"{type(e).__name__}: {e}")
        raise


def finish_run(run: RunRecord, t0: float, log_path: Path, status: str) -> RunResult:
    """The run's result; a run the ServerApp never finished is marked failed with the first error Flower
    logged, and any run that did not complete raises FederatedRunError."""
    summary = run.summary()
    if summary.get("status") == "running":
        summary = run.update_summary(
            status="failed",
            error=f"Flower run ended with status {status!r} before the ServerApp finished: {_last_error(log_path)}",
        )
    result = RunResult.of(run, time.perf_counter() - t0)
    if result.status != "completed":
        raise FederatedRunError(
            f"run {run.run_id} {result.status}: {summary.get('error', status)}\nrecord: {run.path}\nlog: {log_path}"
        )
    return result


def write_flwr_config(home: Path, connection: str, port: int, transport: str) -> None:
    """The FLWR_HOME a run's `flwr` commands use: one loopback connection (`transport`: its TLS line)."""
    (home / "app").mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n'
        f'address = "127.0.0.1:{port}"\n{transport}\n'
    )


class LocalSuperLink:
    """A private simulation SuperLink on loopback; a context manager that always cleans up."""

    def __init__(self, cfg: ExperimentConfig, log_path: Path):
        self.cfg, self.log_path = cfg, log_path
        self.port = _free_port()
        self.home = cfg.cache_dir / "flwr" / f"link-{self.port}"
        self.connection = "zk0-local"
        self.proc: subprocess.Popen | None = None
        self.env = flower_env(cfg, self.home)

    def __enter__(self) -> LocalSuperLink:
        write_flwr_config(self.home, self.connection, self.port, "insecure = true")
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [
                _bin("flower-superlink"),
                "--insecure",
                "--simulation",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FederatedRunError(
                    f"flower-superlink exited with code {self.proc.returncode}; see {self.log_path}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise FederatedRunError(f"flower-superlink did not become ready in {timeout_s:.0f}s; see {self.log_path}")

    def flwr(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True, text=True, **kwargs)

    def run_status(self, flower_run_id: str) -> str:
        out = self.flwr("ls", self.connection, "--run-id", flower_run_id, "--format", "json", timeout=60)
        try:
            runs = json.loads(out.stdout)["runs"]
            return runs[0]["status"]
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            _kill_tree(self.proc)
        self._log.close()
        shutil.rmtree(self.home, ignore_errors=True)


def _last_error(log_path: Path) -> str:
    """The first exception line Flower logged (the simulation's own failures never reach the ServerApp)."""
    lines = [_ANSI.sub("", x).strip() for x in log_path.read_text(errors="replace").splitlines()]
    errors = [x for x in lines if re.match(r"^[\w.]+(Error|Exception): ", x)]
    errors += [x.split(":", 1)[1].strip() for x in lines if re.match(r"^ERROR\s*:", x)]
    return errors[0] if errors else f"see {log_path}"


def resume_federated(run_dir: str | Path, progress: Callable[[str], None] | None = print) -> RunResult:
    """Continue a federated run that stopped (crash, kill, lost machine) after its last complete round."""
    run = RunRecord(run_dir)
    if not (run.path / "config.json").exists():
        raise FederatedRunError(f"{run.path} is not a zk0 run folder (no config.json)")
    summary = run.summary()
    if summary.get("kind", "federated") != "federated":
        raise FederatedRunError(f"run {run.run_id} is a {summary['kind']} run; only federated runs resume")
    if summary.get("status") == "completed":
        raise FederatedRunError(f"run {run.run_id} already completed all its rounds; nothing to resume")
    last = resume_round(run)
    if last is None:
        raise FederatedRunError(
            f"run {run.run_id} stopped before completing a round (no {run.checkpoint('resume')}); "
            "start it again with zk0 train"
        )
    truncate_rounds(run, last)
    resumed = [*summary.get("resumed", []), {"at": utc_now(), "after_round": last}]
    run.update_summary(status="running", error=None, resumed=resumed)
    if progress is not None:
        progress(f"resuming run {run.run_id} after round {last}")
    return run_federated(run.config(), progress, run=run, resume=True)


def run_federated(
    cfg: ExperimentConfig,
    progress: Callable[[str], None] | None = print,
    run: RunRecord | None = None,
    resume: bool = False,
) -> RunResult:
    """Run the federation in simulation (one virtual client per dataset) and return its record."""
    t0 = time.perf_counter()
    run = start_run(cfg, "federated", progress, run)
    log_path = run.path / "flower.log"
    status = _simulate(cfg, run, log_path, progress, resume)
    if status != "finished:completed" and ray_did_not_start(run, log_path):
        failed_log = log_path.with_name("flower-ray-failed.log")
        log_path.replace(failed_log)
        if progress is not None:
            progress(f"Ray did not start ({_last_error(failed_log)}); trying once more (log: {failed_log.name})")
        status = _simulate(cfg, run, log_path, progress, resume)
    return finish_run(run, t0, log_path, status)


def ray_did_not_start(run: RunRecord, log_path: Path) -> bool:
    """True when the simulation failed in Ray's start-up (before the ServerApp recorded anything): a
    machine-load problem worth one more try, not a problem of the run."""
    if run.summary().get("status") != "running" or not log_path.exists():
        return False
    text = log_path.read_text(errors="replace")
    return "[zk0] " not in text and bool(_RAY_START_FAILURE.search(text))


def _simulate(
    cfg: ExperimentConfig,
    run: RunRecord,
    log_path: Path,
    progress: Callable[[str], None] | None,
    resume: bool,
) -> str:
    """One `flwr run` of the app on a fresh private SuperLink; Flower's final status of the run."""
    status = "unknown"
    with failing_run(run), LocalSuperLink(cfg, log_path) as link:
        fed = (
            f"num-supernodes={len(cfg.data.clients)} client-resources-num-cpus={cfg.fl.client_num_cpus} "
            f"client-resources-num-gpus={cfg.fl.client_num_gpus}"
        )
        run_conf = f'config-json="{encode_config(cfg)}" run-dir="{run.path}" resume="{str(resume).lower()}"'
        app = str(stage_app(link.home / "app"))
        cmd = [
            _bin("flwr"),
            "run",
            app,
            link.connection,
            "--stream",
            "--federation-config",
            fed,
            "--run-config",
            run_conf,
        ]
        flower_run_id = stream_flwr_run(cmd, link.env, log_path, progress)
        if flower_run_id:  # Flower's own word (`flwr ls`, ~1 s) only where the ServerApp did not record its end
            completed = run.summary().get("status") == "completed"
            status = "finished:completed" if completed else link.run_status(flower_run_id)
    return status
