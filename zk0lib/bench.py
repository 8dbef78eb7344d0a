"""`zk0 bench`: what zk0 costs, measured. Each benchmark returns a dict that is also written to
reports/bench/<name>.json, and prints a short Markdown table.

- comms: bytes per client per round (smolvla_base on the meta device, the tiny model) and a run's record;
- overhead: a federated run next to a centralized run of the same model, data and optimizer steps;
- dataloader: decoded samples/s against the samples/s training consumes;
- gpu-step: a smolvla_base-sized training step (bf16 autocast) at several batch sizes, zk0's step and
  lerobot's own update path; skipped cleanly without CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zk0lib import data, model, train
from zk0lib.config import CACHES, ConfigError, ExperimentConfig, load_config, zk0_home
from zk0lib.runs import RunRecord, environment, list_runs, utc_now, write_json


def save(name: str, result: dict[str, Any], out_dir: Path | None = None) -> Path:
    path = Path(out_dir or zk0_home() / "reports" / "bench") / f"{name}.json"
    write_json(path, {"benchmark": name, "measured_at": utc_now(), "environment": environment(), **result})
    return path


# ----------------------------------------------------------------------------- comms


def _tiny_policy_of(run: RunRecord) -> Any:
    """The run's own tiny model, rebuilt from its config and the federation's feature metadata."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    from zk0lib.fl.server_app import NORMALIZATION_FILE
    from zk0lib.fl.transport import record_from_bytes, stats_from_record

    meta = LeRobotDatasetMetadata("zk0/federation", root=run.path / "federation_meta")
    saved = run.path / NORMALIZATION_FILE  # the stats it trained with (a run from before 2026-12-07 has none)
    if saved.exists():
        stats = stats_from_record(record_from_bytes(saved.read_bytes()))
    else:  # only the model's size is measured here: neutral stats for what it normalizes
        import numpy as np

        neutral = {"mean": 0.0, "std": 1.0, "min": -1.0, "max": 1.0, "q01": -1.0, "q99": 1.0, "q10": -1.0, "q90": 1.0}
        stats = {
            k: {stat: np.full(f["shape"], value) for stat, value in neutral.items()}
            for k, f in meta.features.items()
            if f["dtype"] not in ("video", "image", "string") and (k.startswith("observation.") or k == "action")
        }
    return model.build_policy(run.config(), meta, stats).policy


def latest_federated_run(runs_dir: Path) -> RunRecord | None:
    done = [
        r
        for r in list_runs(runs_dir)
        if r.summary().get("status") == "completed"
        and r.summary().get("kind", "federated") == "federated"
        and (r.path / "federation_meta").exists()
    ]
    return done[-1] if done else None


def measured_bytes(run: RunRecord) -> dict[str, Any]:
    """Per client per round, from the run's records: what clients uploaded and what the server sent."""
    rounds = [r for r in run.rounds() if r["round"] > 0]
    uploads = [r["bytes_received"] / r["num_train_clients"] for r in rounds if r.get("num_train_clients")]
    downloads = [r["bytes_sent"] / r["num_train_clients"] for r in rounds if r.get("num_train_clients")]
    return {
        "run_id": run.run_id,
        "transport_dtype": run.config().fl.transport_dtype,
        "rounds": len(rounds),
        "upload_bytes_per_client_round": sorted(set(uploads)),
        "download_bytes_per_client_round": sorted(set(downloads)),
    }


LORA_RANKS = (8, 16, 32)


def bench_comms(run_dir: str | Path | None = None, runs_dir: Path | None = None) -> dict[str, Any]:
    """smolvla_base and tiny payloads; with a run (given, or the latest completed federated one), its
    recorded bytes next to what its model's trainable parameters should weigh in its transport dtype."""
    result: dict[str, Any] = {"smolvla_base": model.smolvla_base_sizes()}
    for r in LORA_RANKS:  # adapters instead of the expert: model.peft.method=lora
        result[f"smolvla_base_lora_r{r}"] = model.smolvla_base_sizes(lora_r=r)
    run = RunRecord(run_dir) if run_dir else latest_federated_run(runs_dir or load_config("smoke").runs_dir)
    if run is None:
        result["run"] = None
        result["note"] = "no completed federated run found: run `zk0 train --preset smoke` and measure again"
        return result
    if not (run.path / "federation_meta").exists():
        raise ConfigError(f"--run {run.path}: not a federated zk0 run folder (no federation_meta/ inside)")
    tiny = model.payload_sizes(_tiny_policy_of(run))
    seen = measured_bytes(run)
    expected = tiny["bytes_per_round"][f"trainable_{'bf16' if seen['transport_dtype'] == 'bfloat16' else 'fp32'}"]
    seen["expected_upload_bytes"] = expected
    seen["matches"] = seen["upload_bytes_per_client_round"] == [expected]
    result |= {"run_model": tiny, "run": seen}
    return result


def comms_markdown(result: dict[str, Any]) -> str:
    rows = ["| model | parameters (trainable) | full fp32 state dict | trainable fp32 | trainable bf16 | bf16 / full |"]
    rows.append("|---|---|---|---|---|---|")
    named = [("smolvla_base", "smolvla_base")]
    named += [(f"smolvla_base + LoRA r={r}", f"smolvla_base_lora_r{r}") for r in LORA_RANKS]
    for name, key in (*named, ("run's model", "run_model")):
        if key not in result:
            continue
        r = result[key]
        p, m = r["parameters"], r["mib_per_round"]
        rows.append(
            f"| {name} | {p['total'] / 1e6:.1f}M ({p['trainable'] / 1e6:.2f}M) | {m['full_state_dict_fp32']:.2f} MiB "
            f"| {m['trainable_fp32']:.2f} MiB | {m['trainable_bf16']:.2f} MiB | {r['trainable_bf16_share_of_full']:.2%} |"
        )
    run = result.get("run")
    if run:
        rows.append("")
        rows.append(
            f"run {run['run_id']} ({run['transport_dtype']}, {run['rounds']} rounds): recorded upload per client per "
            f"round {run['upload_bytes_per_client_round']} bytes, expected {run['expected_upload_bytes']} "
            f"-> {'match' if run['matches'] else 'MISMATCH'}"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------- overhead


def _sum(rounds: list[dict], *keys: str) -> float:
    total = 0.0
    for r in rounds:
        value: Any = r
        for k in keys:
            value = value.get(k, {}) if isinstance(value, dict) else {}
        total += value if isinstance(value, (int, float)) else 0.0
    return total


def time_split(result: Any) -> dict[str, float]:
    """Where a federated run's wall time went, in seconds, from its records."""
    summary, rounds = result.summary, [r for r in result.rounds if r["round"] > 0]
    clients = [m for r in rounds for m in r["train"]["clients"].values()]
    startup = summary.get("startup_seconds", {})
    train_phase = _sum(rounds, "seconds", "train")
    client_handler = sum(m.get("handler_seconds", 0.0) for m in clients)
    client_train = sum(m.get("seconds", 0.0) for m in clients)
    client_setup = sum(m.get("setup_seconds", 0.0) for m in clients)
    serialize = sum(m.get("serialize_seconds", 0.0) for m in clients) + _sum(rounds, "seconds", "server_serialize")
    server_wall = summary.get("wall_seconds", 0.0)
    return {
        "total": result.wall_seconds,
        "before_serverapp": result.wall_seconds - server_wall,  # SuperLink, SuperExec, simulation start
        "serverapp_startup": sum(v for k, v in startup.items() if k != "serverapp_process_age"),
        "model_build_server": startup.get("build_policy", 0.0),
        "client_setup": client_setup,  # datasets and policy on first use, config every round
        "training": client_train,
        "waiting_for_batches": sum(m.get("data_seconds", 0.0) for m in clients),
        "serialization": serialize,
        "transfer_and_orchestration": max(
            0.0, train_phase - client_handler - _sum(rounds, "seconds", "server_serialize")
        ),
        "evaluation": _sum(result.rounds, "seconds", "evaluate"),
        "train_phase": train_phase,
    }


def _step_ms(rounds: list[dict]) -> float:
    """Milliseconds per optimizer step spent computing (the clients' training time less waiting for batches)."""
    clients = [m for r in rounds for m in r["train"]["clients"].values()]
    busy = sum(m["seconds"] - m.get("data_seconds", 0.0) for m in clients)
    return 1000 * busy / max(1, sum(m["steps"] for m in clients))


def overhead_pair(fed: Any, cen: Any) -> dict[str, Any]:
    """Training-phase throughput of a federated run and a centralized run of the same budget, their ratio
    and where the federated run's time went.

    Throughput = training samples / seconds of the training phase: for the federated run every round
    from sending the weights to receiving all updates (transfer, (de)serialization, client set-up and
    training included; start-up and evaluation excluded), for the centralized run its optimizer steps.
    """
    fed_rounds = [r for r in fed.rounds if r["round"] > 0]
    cen_rounds = [r for r in cen.rounds if r["round"] > 0]
    fed_samples = fed.summary["totals"]["train_samples"]
    cen_samples = cen.summary["totals"]["train_samples"]
    fed_rate = fed_samples / _sum(fed_rounds, "seconds", "train")
    cen_rate = cen_samples / _sum(cen_rounds, "seconds", "train")
    return {
        "step_ms_without_waiting": {"federated": _step_ms(fed_rounds), "centralized": _step_ms(cen_rounds)},
        "runs": {"federated": fed.run_id, "centralized": cen.run_id},
        "samples": {"federated": fed_samples, "centralized": cen_samples},
        "samples_per_second": {"federated": fed_rate, "centralized": cen_rate},
        "ratio_excluding_startup": fed_rate / cen_rate,
        "ratio_including_startup": (fed_samples / fed.wall_seconds) / (cen_samples / cen.wall_seconds),
        "wall_seconds": {"federated": fed.wall_seconds, "centralized": cen.wall_seconds},
        "federated_time_split": time_split(fed),
    }


def bench_overhead(
    preset: str = "demo",
    overrides: list[str] | None = None,
    repeats: int = 1,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """`repeats` pairs of a federated and a centralized run (same config and total steps), alternating which
    runs first. The result is the pair with the median ratio (the lower one of two middles), every pair's
    numbers under `pairs`: one pair's ratio moves by several percent with the machine's state."""
    from zk0lib.baselines import run_centralized
    from zk0lib.fl.simulation import run_federated

    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1 (got {repeats})")
    sets = [*(overrides or []), "eval.rollout_episodes=0", "output.save_checkpoints=false"]
    runners = {"federated": run_federated, "centralized": run_centralized}
    pairs = []
    for i in range(repeats):
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-bench"
        order = ("federated", "centralized") if i % 2 == 0 else ("centralized", "federated")
        done = {
            kind: runners[kind](load_config(preset, [*sets, f"output.run_id={stamp}-{kind}"]), progress=progress)
            for kind in order
        }
        pairs.append(overhead_pair(done["federated"], done["centralized"]) | {"first": order[0]})
    ranked = sorted(pairs, key=lambda p: p["ratio_excluding_startup"])
    return (
        {"preset": preset, "overrides": overrides or [], "repeats": repeats}
        | ranked[(repeats - 1) // 2]
        | {
            "pairs": [
                {
                    k: p[k]
                    for k in (
                        "first",
                        "runs",
                        "samples_per_second",
                        "step_ms_without_waiting",
                        "ratio_excluding_startup",
                    )
                }
                for p in pairs
            ]
        }
    )


def overhead_markdown(result: dict[str, Any]) -> str:
    r = result["samples_per_second"]
    lines = [
        "| | federated | centralized |",
        "|---|---|---|",
        f"| training samples | {result['samples']['federated']} | {result['samples']['centralized']} |",
        f"| samples/s (training phase) | {r['federated']:.2f} | {r['centralized']:.2f} |",
        f"| ms per step, computing | {result['step_ms_without_waiting']['federated']:.1f} | "
        f"{result['step_ms_without_waiting']['centralized']:.1f} |",
        f"| wall time (s) | {result['wall_seconds']['federated']:.0f} | {result['wall_seconds']['centralized']:.0f} |",
        "",
        f"federated/centralized samples/s: {result['ratio_excluding_startup']:.3f} without start-up, "
        f"{result['ratio_including_startup']:.3f} with it",
        "",
    ]
    if len(result.get("pairs", [])) > 1:
        ratios = ", ".join(
            f"{p['ratio_excluding_startup']:.3f} ({p['samples_per_second']['federated']:.1f} / "
            f"{p['samples_per_second']['centralized']:.1f}, {p['first']} first)"
            for p in result["pairs"]
        )
        lines += [
            f"{len(result['pairs'])} pairs, ratio without start-up (fed / cen samples/s): {ratios}; "
            "the median pair is shown",
            "",
        ]
    lines += [
        "| federated time split | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k.replace('_', ' ')} | {v:.1f} |" for k, v in result["federated_time_split"].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- dataloader


def bench_dataloader(
    preset: str = "demo", overrides: list[str] | None = None, batches: int = 30, steps: int = 10
) -> dict[str, Any]:
    """Samples/s the loader decodes (client 0's training episodes, the config's workers) against the
    samples/s one optimizer step consumes on each available device (batches already in memory)."""
    cfg = load_config(preset, overrides)
    from zk0lib.launch import prepare

    prepare(cfg)
    clients = [data.open_client(cfg, i) for i in range(len(cfg.data.clients))]
    client, stats = clients[0], data.pooled_train_stats(clients)
    bundle = model.build_policy(cfg, client.meta, stats)
    dataset = data.open_dataset(client, client.train_episodes, bundle.config, cfg.data.video_backend)
    t0 = time.perf_counter()
    stream = data.batch_stream(dataset, cfg.train.batch_size, cfg.train.num_workers, seed=0)
    first = next(stream)
    startup = time.perf_counter() - t0
    kept = [first]
    t0 = time.perf_counter()
    for _ in range(batches):
        kept.append(next(stream))
    decode_rate = batches * cfg.train.batch_size / (time.perf_counter() - t0)
    result: dict[str, Any] = {
        "preset": preset,
        "client": client.name,
        "batch_size": cfg.train.batch_size,
        "num_workers": cfg.train.num_workers,
        "loader_startup_seconds": startup,
        "decoded_samples_per_second": decode_rate,
        "consumed_samples_per_second": {},
    }
    bundles = {bundle.device.type: bundle}  # the one built for the loader counts for its device
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        if device not in bundles:
            cfg.model.device = device
            bundles[device] = model.build_policy(cfg, client.meta, stats)
    for device, b in bundles.items():
        result["consumed_samples_per_second"][device] = _consume_rate(b, kept, steps, cfg)
    result["decode_over_consume"] = {d: decode_rate / r for d, r in result["consumed_samples_per_second"].items()}
    return result


def _consume_rate(bundle: model.PolicyBundle, batches: list[dict], steps: int, cfg: ExperimentConfig) -> float:
    optimizer, scheduler = train.make_optimizer(bundle.policy, steps + 2, 0)

    def cycled():
        while True:
            yield from ({k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches)

    stream = cycled()
    train.train_steps(bundle, stream, optimizer, scheduler, 2, cfg)  # warm-up
    _sync(bundle.device)
    metrics = train.train_steps(bundle, stream, optimizer, scheduler, steps, cfg)
    _sync(bundle.device)
    return metrics["samples"] / (metrics["seconds"] - metrics["data_seconds"])


def dataloader_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"client {result['client']}, batch {result['batch_size']}, {result['num_workers']} loader workers: "
        f"decodes {result['decoded_samples_per_second']:.1f} samples/s "
        f"(first batch after {result['loader_startup_seconds']:.1f} s)",
        "",
        "| device | training consumes (samples/s) | decode / consume |",
        "|---|---|---|",
    ]
    for device, rate in result["consumed_samples_per_second"].items():
        lines.append(f"| {device} | {rate:.1f} | {result['decode_over_consume'][device]:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- gpu-step


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def synthetic_batch(policy: Any, batch_size: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A normalized training batch of the policy's input shapes (random images, state, tokens and actions)."""
    from lerobot.configs.types import FeatureType

    c = policy.config
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for key, feat in c.input_features.items():
        shape = (batch_size, *feat.shape)
        batch[key] = (
            torch.rand(shape, generator=g) if feat.type is FeatureType.VISUAL else torch.randn(shape, generator=g)
        )
    action_dim = c.output_features["action"].shape[0]
    batch["action"] = torch.randn(batch_size, c.chunk_size, action_dim, generator=g)
    batch["action_is_pad"] = torch.zeros(batch_size, c.chunk_size, dtype=torch.bool)
    vocab = policy.model.vlm_with_expert.get_vlm_model().text_model.get_input_embeddings().num_embeddings
    batch["observation.language.tokens"] = torch.randint(0, vocab, (batch_size, c.tokenizer_max_length), generator=g)
    batch["observation.language.attention_mask"] = torch.ones(batch_size, c.tokenizer_max_length, dtype=torch.bool)
    return {k: v.to(device) for k, v in batch.items()}


def _zk0_step(policy: Any, batch: dict, optimizer: Any, global_params: list, mu: float, bf16: bool) -> None:
    params = [p for _, p in model.trainable_parameters(policy)]
    train.fedprox_backward(
        policy, batch, global_params, mu, torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else None
    )
    torch.nn.utils.clip_grad_norm_(params, policy.config.optimizer_grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _lerobot_step(policy: Any, batch: dict, optimizer: Any, accelerator: Any, tracker: Any) -> None:
    from lerobot.scripts.lerobot_train import update_policy

    update_policy(tracker, policy, batch, optimizer, policy.config.optimizer_grad_clip_norm, accelerator)


def _timed(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_seconds": seconds, "peak_memory_gib": peak}


def bench_gpu_step(
    batch_sizes: tuple[int, ...] = (8, 32, 64),
    steps: int = 10,
    warmup: int = 3,
    policy: Any = None,
    device: str | None = None,
    mu: float = 0.01,
) -> dict[str, Any]:
    """Step time and peak memory of zk0's FedProx step and of lerobot's update_policy, bf16 autocast on CUDA.

    Without CUDA (and no explicit device) it returns {"skipped": reason}. `policy`/`device` let the same
    code run on the tiny model on CPU (how the tests exercise it).
    """
    if device is None:
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device visible to torch"}
        device = "cuda"
    dev = torch.device(device)
    from accelerate import Accelerator

    policy = policy if policy is not None else model.smolvla_base_policy(device)
    policy.to(dev)
    bf16 = dev.type == "cuda"
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=dev.type == "cpu")
    rows = []
    for bs in batch_sizes:
        try:
            rows.append({"batch_size": bs, **_step_row(policy, bs, dev, accelerator, mu, warmup, steps)})
        except torch.OutOfMemoryError as e:
            rows.append({"batch_size": bs, "error": f"out of memory: {str(e).splitlines()[0]}"})
        if bf16:
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev) if bf16 else "cpu"
    return {"device": name, "parameters": model.parameter_counts(policy), "fedprox_mu": mu, "rows": rows}


def _step_row(policy: Any, bs: int, dev: torch.device, accelerator: Any, mu: float, warmup: int, steps: int) -> dict:
    from lerobot.utils.logging_utils import AverageMeter, MetricsTracker

    bf16 = dev.type == "cuda"
    batch = synthetic_batch(policy, bs, dev)
    params = [p for _, p in model.trainable_parameters(policy)]
    global_params = [p.detach().clone() for p in params]
    optimizer = policy.config.get_optimizer_preset().build(params)
    zk0 = _timed(lambda: _zk0_step(policy, dict(batch), optimizer, global_params, mu, bf16), dev, warmup, steps)
    optimizer = global_params = None  # free them before the second optimizer is built
    tracker = MetricsTracker(
        bs, 1000, 10, {k: AverageMeter(k) for k in ("loss", "grad_norm", "lr", "update_s", "gpu_mem_gb")}
    )
    lerobot_optimizer = policy.config.get_optimizer_preset().build(params)
    ler = _timed(
        lambda: _lerobot_step(policy, dict(batch), lerobot_optimizer, accelerator, tracker), dev, warmup, steps
    )
    return {
        "zk0_step_seconds": zk0["step_seconds"],
        "zk0_peak_memory_gib": zk0["peak_memory_gib"],
        "zk0_samples_per_second": bs / zk0["step_seconds"],
        "lerobot_step_seconds": ler["step_seconds"],
        "lerobot_peak_memory_gib": ler["peak_memory_gib"],
        "lerobot_samples_per_second": bs / ler["step_seconds"],
    }


def gpu_step_markdown(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"gpu-step skipped: {result['skipped']}"
    lines = [
        f"{result['device']}, {result['parameters']['trainable'] / 1e6:.1f}M trainable of "
        f"{result['parameters']['total'] / 1e6:.1f}M parameters",
        "",
        "| batch | zk0 FedProx step (s) | peak GiB | samples/s | lerobot update_policy (s) | peak GiB | samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['batch_size']} | {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['batch_size']} | {r['zk0_step_seconds']:.3f} | {r['zk0_peak_memory_gib']:.1f} | "
            f"{r['zk0_samples_per_second']:.0f} | {r['lerobot_step_seconds']:.3f} | {r['lerobot_peak_memory_gib']:.1f} | "
            f"{r['lerobot_samples_per_second']:.0f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- train


def _ms(seconds: list[float], per: int = 1) -> float:
    import numpy as np

    return 1000 * float(np.median(seconds)) / per


def bench_train(
    preset: str = "demo",
    overrides: list[str] | None = None,
    batch_sizes: tuple[int, ...] = (8, 32, 64),
    caches: tuple[str, ...] = ("none", "frames"),
    steps: int = 10,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Training samples/s on client 0's training episodes, per cache and batch size, and where a step's
    time goes: reading an item (decode), collate, the preprocessor, forward, backward, optimizer (clip, step,
    zero). The parts are timed in this process one after another (items read without loader workers);
    `samples_per_second` is the real thing: train_steps through the loader with train.num_workers workers."""
    import numpy as np

    from zk0lib.launch import prepare

    log = progress or (lambda line: None)
    unknown = set(caches) - set(CACHES)
    if unknown:
        raise ConfigError(f"unknown caches {sorted(unknown)}: choose from {', '.join(CACHES)}")
    cfg = load_config(preset, overrides)
    prepare(cfg)
    clients = [data.open_client(cfg, i) for i in range(len(cfg.data.clients))]
    client, stats = clients[0], data.pooled_train_stats(clients)
    result: dict[str, Any] = {
        "preset": preset,
        "client": client.name,
        "num_workers": cfg.train.num_workers,
        "threads": torch.get_num_threads(),
        "rows": [],
    }
    for mode in caches:
        bundle = model.build_policy(cfg, client.meta, stats)
        t0 = time.perf_counter()
        cfg.data.cache = mode
        dataset = data.embedded_for(cfg, data.open_for(cfg, client, client.train_episodes, bundle.config), bundle)
        build_seconds = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        picks = rng.choice(len(dataset), size=min(64, len(dataset)), replace=False).tolist()
        item_s = []
        for i in picks:
            t = time.perf_counter()
            dataset[i]
            item_s.append(time.perf_counter() - t)
        log(f"{mode}: cache ready in {build_seconds:.1f} s, {_ms(item_s):.2f} ms per item")
        for bs in batch_sizes:
            row = {"cache": mode, "batch_size": bs, "cache_build_seconds": build_seconds, "item_ms": _ms(item_s)}
            items = [dataset[i] for i in rng.choice(len(dataset), size=bs, replace=False).tolist()]
            parts: dict[str, list[float]] = {
                k: [] for k in ("collate", "processor", "forward", "backward", "optimizer")
            }
            optimizer, _ = train.make_optimizer(bundle.policy, steps + 2, 0)
            params = [p for _, p in model.trainable_parameters(bundle.policy)]
            bundle.policy.train()
            for k in range(steps + 1):
                marks = [time.perf_counter()]
                batch = data.collate_or_skip(items)
                marks.append(time.perf_counter())
                batch = bundle.preprocessor(batch)
                marks.append(time.perf_counter())
                loss, _ = bundle.policy.forward(batch)
                marks.append(time.perf_counter())
                loss.backward()
                _sync(bundle.device)
                marks.append(time.perf_counter())
                torch.nn.utils.clip_grad_norm_(params, bundle.policy.config.optimizer_grad_clip_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                _sync(bundle.device)
                marks.append(time.perf_counter())
                if k:  # the first step warms up
                    for name, a, b in zip(parts, marks, marks[1:], strict=False):
                        parts[name].append(b - a)
            row |= {f"{name}_ms": _ms(v, bs) for name, v in parts.items()}  # per sample
            row["compute_ms"] = sum(row[f"{n}_ms"] for n in ("processor", "forward", "backward", "optimizer"))
            stream_set = data.BatchStream(dataset, bs, cfg.train.num_workers)
            stream = stream_set.batches(0)
            optimizer, scheduler = train.make_optimizer(bundle.policy, 2 * steps + 4, 0)
            train.train_steps(bundle, stream, optimizer, scheduler, 2, cfg)  # loader start-up and warm-up
            metrics = train.train_steps(bundle, stream, optimizer, scheduler, steps, cfg)
            stream_set.close()
            row["samples_per_second"] = metrics["samples"] / metrics["seconds"]
            row["waiting_for_data_fraction"] = metrics["data_seconds"] / metrics["seconds"]
            result["rows"].append(row)
            log(
                f"{mode} batch {bs}: {row['samples_per_second']:.0f} samples/s (item {row['item_ms']:.2f} ms, "
                f"compute {row['compute_ms']:.2f} ms per sample, {row['waiting_for_data_fraction']:.0%} waiting for data)"
            )
    best = max(result["rows"], key=lambda r: r["samples_per_second"])
    first = result["rows"][0]
    result["best"] = {k: best[k] for k in ("cache", "batch_size", "samples_per_second")}
    result["speedup_over_first_row"] = best["samples_per_second"] / first["samples_per_second"]
    return result


def train_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"preset {result['preset']}, client {result['client']}, {result['num_workers']} loader workers, "
        f"{result['threads']} torch threads; per-sample parts in ms",
        "",
        "| cache | batch | samples/s | waiting for data | item (decode) | collate | processor | forward | backward |"
        " optimizer | cache build (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['cache']} | {r['batch_size']} | {r['samples_per_second']:.0f} | {r['waiting_for_data_fraction']:.0%} |"
            f" {r['item_ms']:.2f} | {r['collate_ms']:.3f} | {r['processor_ms']:.3f} | {r['forward_ms']:.2f} |"
            f" {r['backward_ms']:.2f} | {r['optimizer_ms']:.3f} | {r['cache_build_seconds']:.1f} |"
        )
    b = result["best"]
    lines.append(
        f"\nbest: cache {b['cache']}, batch {b['batch_size']}: {b['samples_per_second']:.0f} samples/s, "
        f"{result['speedup_over_first_row']:.1f}x the first row"
    )
    return "\n".join(lines)
