"""`zk0 rehearse`: the real path at full size, offline, as the first thing to run on a new machine.

Nothing else in zk0 runs `lerobot/smolvla_base`'s size without the Hub. This builds, on this machine, a
folder shaped like `HuggingFaceTB/SmolVLM2-500M-Video-Instruct` (its published dimensions, random bf16
weights, a tokenizer and processor made offline at its vocabulary size) and a policy folder shaped like
`lerobot/smolvla_base` that names it; then it runs the real loading path (`load_vlm_weights=True`,
`model.pretrained=<folder>`) through a short federation - in Flower's simulation and on the Deployment
Engine with TLS and authenticated SuperNodes - and reports, from the runs' own records, the bytes of every
message, each process's peak memory, the time of each phase and the checkpoint's size. With
`--pretrained lerobot/smolvla_base` (downloaded) and `--device cuda` it is the readiness check of a GPU
machine on the real model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zk0lib import model
from zk0lib.config import ExperimentConfig, load_config

SMOLVLM2_VOCAB = 49280  # HuggingFaceTB/SmolVLM2-500M-Video-Instruct's vocabulary
CAMERAS = {
    "observation.images.front": "observation.images.camera1",
    "observation.images.wrist": "observation.images.camera2",
}


def _say(progress: Callable[[str], None] | None) -> Callable[[str], None]:
    return progress or (lambda _: None)


def standin_vlm(folder: Path, progress: Callable[[str], None] | None = None) -> Path:
    """A SmolVLM2-500M-shaped VLM folder with random bf16 weights (built once; ~1 GB)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    dest = folder / "SmolVLM2-500M-Video-Instruct"
    if (dest / "model.safetensors").exists():
        return dest
    t = time.perf_counter()
    tmp = dest.with_name(f".{dest.name}.tmp")
    model.smolvlm2_500m_folder(tmp)
    processor = AutoProcessor.from_pretrained(tmp)
    missing = SMOLVLM2_VOCAB - len(processor.tokenizer)
    if missing > 0:  # the published vocabulary's size; the extra entries are never produced by our prompts
        processor.tokenizer.add_tokens([f"<zk0_vocab_{i}>" for i in range(missing)])
        processor.save_pretrained(tmp)
    config = AutoConfig.from_pretrained(tmp)
    torch.manual_seed(0)
    vlm = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    vlm.save_pretrained(tmp, max_shard_size="4GB")
    n = sum(p.numel() for p in vlm.parameters())
    del vlm
    tmp.rename(dest)
    _say(progress)(
        f"SmolVLM2-500M stand-in: {n / 1e6:.0f}M parameters, bf16, in {time.perf_counter() - t:.0f}s -> {dest}"
    )
    return dest


def standin_smolvla_base(folder: Path, vlm: Path, progress: Callable[[str], None] | None = None) -> Path:
    """A lerobot/smolvla_base-shaped policy folder (config, weights, processors) whose config names `vlm`
    and has `load_vlm_weights`, as the published one has (built once)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    dest = folder / "smolvla_base"
    if (dest / "model.safetensors").exists():
        return dest
    t = time.perf_counter()
    pc = SmolVLAConfig(vlm_model_name=str(vlm), load_vlm_weights=True, device="cpu")
    pc.input_features = {
        "observation.state": PolicyFeature(FeatureType.STATE, (6,)),
        **{f"observation.images.camera{i}": PolicyFeature(FeatureType.VISUAL, (3, 256, 256)) for i in (1, 2, 3)},
    }
    pc.output_features = {"action": PolicyFeature(FeatureType.ACTION, (6,))}
    torch.manual_seed(0)
    policy = SmolVLAPolicy(pc)  # lerobot loads the VLM folder's weights (bf16) here, as from the Hub
    tmp = dest.with_name(f".{dest.name}.tmp")
    policy.save_pretrained(tmp)
    pre, post = make_pre_post_processors(pc, dataset_stats=None)
    pre.save_pretrained(tmp)
    post.save_pretrained(tmp)
    n = sum(p.numel() for p in policy.parameters())
    del policy
    tmp.rename(dest)
    _say(progress)(f"smolvla_base stand-in: {n / 1e6:.0f}M parameters in {time.perf_counter() - t:.0f}s -> {dest}")
    return dest


def rehearsal_config(pretrained: str, device: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """The smoke federation's two synthetic clients on the full-size policy: 2 rounds x 2 local steps at
    batch 2, the cameras mapped onto smolvla_base's, a small held-out evaluation."""
    base = {
        "model.pretrained": pretrained,
        "model.device": device,
        "model.chunk_size": 50,  # smolvla_base's own chunk and denoising steps
        "model.n_action_steps": 50,
        "model.num_denoise_steps": 10,
        "train.local_steps": 2,
        "train.batch_size": 2,
        "train.lr": 1e-4,
        "fl.num_rounds": 2,
        "eval.max_frames": 4,
        "eval.batch_size": 2,
        "eval.action_frames": 2,
        "eval.bootstrap": 100,
        "fl.round_timeout_s": 3600,
        "data.synthetic_frames": 60,
    }
    cfg = load_config("smoke", [f"{k}={v}" for k, v in base.items()] + list(overrides or []))
    cfg.data.clients = cfg.data.clients[:2]
    cfg.data.rename_map = {**CAMERAS, **cfg.data.rename_map}
    return cfg


def _mib(n: float) -> float:
    return round(float(n) / 2**20, 1)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _slowest(clients: dict[str, dict[str, Any]], key: str, per_step: bool = False) -> float:
    """The slowest client's value of a timing in a round's record (per optimizer step with `per_step`)."""
    return max((v.get(key, 0) / (max(v.get("steps", 1), 1) if per_step else 1) for v in clients.values()), default=0)


def run_report(result: Any, engine: str) -> dict[str, Any]:
    """What a user needs to know from one rehearsal run, read from its own record."""
    summary, rounds = result.summary, [r for r in result.rounds if r.get("round", 0) >= 1]
    started = summary.get("startup_seconds", {})
    per_round = []
    for r in rounds:
        clients = (r.get("train") or {}).get("clients", {})
        seconds = r.get("seconds", {})

        per_round.append(
            {
                "round": r["round"],
                "sent_mib": _mib(r.get("bytes_sent", 0)),
                "received_mib": _mib(r.get("bytes_received", 0)),
                "message_mib": {c: _mib(v.get("payload-bytes", 0)) for c, v in clients.items()},
                "client_peak_rss_mib": {c: round(v.get("peak_rss_mib", 0)) for c, v in clients.items()},
                "server_peak_rss_mib": round((r.get("memory") or {}).get("server_peak_rss_mib", 0)),
                "seconds": {
                    "round": round(seconds.get("round", 0), 1),
                    "client_setup": round(_slowest(clients, "setup_seconds"), 1),
                    "client_steps": round(_slowest(clients, "seconds"), 1),
                    "step": round(_slowest(clients, "seconds", per_step=True), 1),
                    "client_serialize": round(_slowest(clients, "serialize_seconds"), 2),
                    "server_serialize": round(seconds.get("server_serialize", 0), 2),
                    "client_handler": round(_slowest(clients, "handler_seconds"), 1),
                    "transfer_and_aggregate": round(seconds.get("train", 0) - _slowest(clients, "handler_seconds"), 1),
                    "evaluate": round(seconds.get("evaluate", 0), 1),
                    "checkpoint": round(seconds.get("checkpoint", 0), 1),
                },
            }
        )
    final = result.path / "checkpoints" / "final"
    return {
        "engine": engine,
        "status": result.status,
        "run": str(result.path),
        "wall_seconds": round(result.wall_seconds, 1),
        "startup_seconds": {k: round(v, 1) for k, v in started.items()},
        "parameters": summary.get("parameters"),
        "rounds": per_round,
        "final_checkpoint_mib": _mib(_folder_bytes(final)) if final.exists() else None,
        "final": {k: summary.get("final", {}).get(k) for k in ("loss", "action_mae")},
    }


def rehearse(
    folder: Path,
    pretrained: str | None = None,
    device: str = "cpu",
    engines: tuple[str, ...] = ("simulation", "deploy-local"),
    overrides: list[str] | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Build the stand-ins (unless `pretrained` names a real policy), then run the federation on each engine."""
    from zk0lib.fl.deploy import deploy_local
    from zk0lib.fl.simulation import run_federated
    from zk0lib.launch import FederatedRunError

    say = _say(progress)
    t = time.perf_counter()
    built: dict[str, Any] = {}
    if pretrained is None:
        vlm = standin_vlm(folder, say)
        pretrained = str(standin_smolvla_base(folder, vlm, say))
        built = {
            "vlm": str(vlm),
            "vlm_mib": _mib(_folder_bytes(vlm)),
            "policy_mib": _mib(_folder_bytes(Path(pretrained))),
        }
    built["seconds"] = round(time.perf_counter() - t, 1)
    report: dict[str, Any] = {"pretrained": pretrained, "device": device, "build": built, "runs": []}
    payload = model.smolvla_base_sizes()["mib_per_round"]
    report["expected_mib"] = {"trainable_fp32": payload["trainable_fp32"], "trainable_bf16": payload["trainable_bf16"]}
    for engine in engines:
        # the simulation sends fp32 weights, the Deployment Engine bf16 deltas: both encodings at full size
        dtype = "float32" if engine == "simulation" else "bfloat16"
        run_id = f"rehearsal-{engine}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = rehearsal_config(
            pretrained, device, [f"fl.transport_dtype={dtype}", *(overrides or []), f"output.run_id={run_id}"]
        )
        say(
            f"{engine}: {len(cfg.data.clients)} clients x {cfg.fl.num_rounds} rounds x {cfg.train.local_steps} local steps at batch {cfg.train.batch_size} on {device}"
        )
        runner = run_federated if engine == "simulation" else deploy_local
        try:
            report["runs"].append(run_report(runner(cfg, progress=say), engine))
        except FederatedRunError as e:  # the run's record says why; the report says it first
            say(f"{engine}: NOT READY: {e}")
            report["runs"].append({"engine": engine, "status": "failed", "error": str(e)})
    report["ready"] = bool(report["runs"]) and all(r["status"] == "completed" for r in report["runs"])
    return report


def markdown(report: dict[str, Any]) -> str:
    """The readiness report as a table per engine."""
    lines = [
        f"# Rehearsal of the real path: {report['pretrained']} on {report['device']}",
        "",
        f"ready: **{'yes' if report['ready'] else 'NO'}**; stand-ins built in {report['build']['seconds']}s"
        + (
            f" (VLM {report['build']['vlm_mib']} MiB, policy {report['build']['policy_mib']} MiB)"
            if "vlm_mib" in report["build"]
            else ""
        ),
        f"expected message: {report['expected_mib']['trainable_fp32']} MiB fp32, {report['expected_mib']['trainable_bf16']} MiB bf16 (smolvla_base's trainable weights)",
        "",
    ]
    for run in report["runs"]:
        if "rounds" not in run:
            lines += [f"## {run['engine']}: {run['status']}", "", "```", run.get("error", ""), "```", ""]
            continue
        lines += [
            f"## {run['engine']}: {run['status']} in {run['wall_seconds']}s",
            "",
            f"start-up: {run['startup_seconds']}; final checkpoint {run['final_checkpoint_mib']} MiB; "
            f"final eval loss {run['final']['loss']}",
            "",
            "| round | message per client (MiB) | server sent / received (MiB) | peak RSS clients / server (MiB) | step (s) | client set-up (s) | serialize client / server (s) | transfer + aggregate (s) | evaluate (s) | checkpoint (s) | round (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in run["rounds"]:
            s = r["seconds"]
            lines.append(
                f"| {r['round']} | {', '.join(str(v) for v in r['message_mib'].values())} | {r['sent_mib']} / {r['received_mib']} "
                f"| {', '.join(str(v) for v in r['client_peak_rss_mib'].values())} / {r['server_peak_rss_mib']} "
                f"| {s['step']} | {s['client_setup']} | {s['client_serialize']} / {s['server_serialize']} "
                f"| {s['transfer_and_aggregate']} | {s['evaluate']} | {s['checkpoint']} | {s['round']} |"
            )
        lines.append("")
    return "\n".join(lines)
