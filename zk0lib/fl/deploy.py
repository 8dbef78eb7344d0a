"""The Deployment Engine on one machine, secured as on many: TLS and authenticated SuperNodes.

`deploy_local` generates a CA and a SuperLink certificate (for 127.0.0.1/localhost) and one key pair per
SuperNode under data_cache/deploy, starts a SuperLink with TLS and SuperNode authentication, registers
the SuperNodes' public keys, starts one SuperNode per client (`--node-config partition-id=i`), runs the
federation with `flwr run`, and stops every process it started. `check_refusals` shows that a SuperNode
with an unregistered key, and one that does not speak TLS, are turned away.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zk0lib.config import ExperimentConfig
from zk0lib.fl.simulation import (
    _bin,
    _free_port,
    _kill_tree,
    failing_run,
    finish_run,
    flower_env,
    stage_app,
    stream_flwr_run,
    write_flwr_config,
)
from zk0lib.fl.transport import encode_config
from zk0lib.launch import FederatedRunError, RunResult, start_run

CONNECTION = "zk0-local-tls"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ----------------------------------------------------------------------------- keys and certificates


def _write_private_key(key: Any, path: Path, openssh: bool = False) -> None:
    from cryptography.hazmat.primitives import serialization

    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    path.chmod(0o600)


def make_certificates(folder: Path, days: int = 30) -> dict[str, Path]:
    """A throw-away CA and a SuperLink certificate for 127.0.0.1 and localhost (reused while valid)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    if all(p.exists() for p in paths.values()):
        cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
        if cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1):
            return paths
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("zk0 local CA"))
        .issuer_name(name("zk0 local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("zk0 superlink"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private_key(key, paths["key"])
    return paths


def make_supernode_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair for one SuperNode: (private key PEM, public key in OpenSSH format)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    if not (private.exists() and public.exists()) or b"OPENSSH" not in private.read_bytes():
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private_key(key, private, openssh=True)  # the format flower-supernode reads
        public.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    return private, public


# ----------------------------------------------------------------------------- the processes


class SecureFederation:
    """A SuperLink with TLS and SuperNode authentication on loopback, and its SuperNodes."""

    def __init__(self, cfg: ExperimentConfig, log_path: Path):
        self.cfg, self.log_path = cfg, log_path
        self.folder = cfg.cache_dir / "deploy"
        self.certs = make_certificates(self.folder / "tls")
        self.port = _free_port()
        self.home = self.folder / f"flwr-{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.env = flower_env(cfg, self.home)

    def __enter__(self) -> SecureFederation:
        write_flwr_config(self.home, CONNECTION, self.port, f'root-certificates = "{self.certs["ca"]}"')
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self.superlink = self._start(
            "flower-superlink",
            "--ssl-ca-certfile", str(self.certs["ca"]),
            "--ssl-certfile", str(self.certs["cert"]),
            "--ssl-keyfile", str(self.certs["key"]),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--database", str(self.home / "state.db"),
        )  # fmt: skip
        self._wait_for_link()
        return self

    def _start(self, exe: str, *args: str, log: Any = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            [_bin(exe), *args],
            env=self.env,
            stdout=log or self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def _wait_for_link(self, timeout_s: float = 60) -> None:
        import ssl

        import httpx

        ssl_context = ssl.create_default_context(cafile=str(self.certs["ca"]))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise FederatedRunError(f"flower-superlink exited ({self.superlink.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"https://127.0.0.1:{self.port}/health", verify=ssl_context, timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise FederatedRunError(f"the TLS SuperLink did not answer within {timeout_s:.0f}s; see {self.log_path}")

    def register(self, public_key: Path) -> None:
        out = self.flwr("supernode", "register", str(public_key), CONNECTION)
        if out.returncode != 0 and "already" not in (out.stdout + out.stderr).lower():
            raise FederatedRunError(f"registering {public_key.name} failed: {(out.stdout + out.stderr).strip()[-500:]}")

    def supernodes(self) -> list[dict[str, Any]]:
        out = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            return json.loads(out.stdout).get("nodes", [])
        except ValueError:
            return []

    def start_supernode(
        self,
        partition_id: int,
        private_key: Path | None,
        tls: bool = True,
        log: Any = None,
        max_retries: int | None = None,
    ) -> subprocess.Popen:
        args = ["--superlink", f"127.0.0.1:{self.port}", "--port", str(_free_port())]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        args += ["--health-server-address", f"127.0.0.1:{_free_port()}"]
        args += ["--root-certificates", str(self.certs["ca"])] if tls else ["--insecure"]
        if private_key is not None:
            args += ["--auth-supernode-private-key", str(private_key)]
        args += ["--node-config", f"partition-id={partition_id} num-partitions={len(self.cfg.data.clients)}"]
        return self._start("flower-supernode", *args, log=log)

    def __exit__(self, *exc: Any) -> None:
        for proc in reversed(self.procs):
            _kill_tree(proc)  # also when it exited: a refused SuperNode leaves its SuperExec in its process group
        self._log.close()


def deploy_local(cfg: ExperimentConfig, progress: Callable[[str], None] | None = print) -> RunResult:
    """The federation on the Deployment Engine over TLS with authenticated SuperNodes, on this machine."""
    t0 = time.perf_counter()
    say = progress or (lambda _: None)
    run = start_run(cfg, "federated", progress)
    log_path = run.path / "flower.log"
    with failing_run(run), SecureFederation(cfg, log_path) as fed:
        say(f"SuperLink with TLS and SuperNode authentication on 127.0.0.1:{fed.port}")
        for i in range(len(cfg.data.clients)):
            private, public = make_supernode_key(fed.folder / "supernodes", f"client-{i}")
            fed.register(public)
            fed.start_supernode(i, private)
        say(f"{len(cfg.data.clients)} SuperNodes registered and started")
        app = str(stage_app(fed.home / "app"))
        run_conf = f'config-json="{encode_config(cfg)}" run-dir="{run.path}"'
        cmd = [_bin("flwr"), "run", app, CONNECTION, "--stream", "--run-config", run_conf]
        flower_run_id = stream_flwr_run(cmd, fed.env, log_path, progress)
    return finish_run(run, t0, log_path, "started" if flower_run_id else "not started")


def check_refusals(cfg: ExperimentConfig, wait_s: float = 30.0) -> dict[str, Any]:
    """Start a SuperNode whose key was never registered, and one without TLS, against a secured SuperLink:
    neither may join. Waits until both have given up (at most `wait_s`). Returns what each one's log said
    and the SuperLink's list of nodes."""
    folder = cfg.cache_dir / "deploy" / "refusals"
    folder.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, Any] = {}
    with SecureFederation(cfg, folder / "superlink.log") as fed:
        _, registered_pub = make_supernode_key(fed.folder / "supernodes", "client-0")
        fed.register(registered_pub)
        stranger_key, _ = make_supernode_key(folder, "stranger")  # never registered
        logs = {name: folder / f"{name}.log" for name in ("unregistered", "plaintext")}
        handles = {name: open(path, "w", encoding="utf-8") for name, path in logs.items()}  # noqa: SIM115
        try:
            nodes = {
                "unregistered": fed.start_supernode(0, stranger_key, log=handles["unregistered"], max_retries=3),
                "plaintext": fed.start_supernode(0, None, tls=False, log=handles["plaintext"], max_retries=3),
            }
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and any(p.poll() is None for p in nodes.values()):
                time.sleep(0.5)
            listed = fed.supernodes()
            for name, proc in nodes.items():
                handles[name].flush()
                lines = [_ANSI.sub("", x).strip() for x in logs[name].read_text(errors="replace").splitlines()]
                said = [x for x in lines if "Exit Code" in x or "Failed to" in x or "could not" in x]
                retries = sum("Connection attempt failed" in x for x in lines)
                outcome[name] = {
                    "exited": proc.poll() is not None,
                    "returncode": proc.poll(),
                    "said": said[-3:] + ([f"{retries} connection attempts failed"] if retries else []),
                }
            outcome["superlink_nodes"] = listed
        finally:
            for h in handles.values():
                h.close()
    return outcome
