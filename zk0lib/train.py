"""Local training with the FedProx term, and seeded evaluation on held-out episodes."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from zk0lib.config import ExperimentConfig
from zk0lib.data import BatchStream
from zk0lib.model import PolicyBundle, trainable_parameters


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (run seed, round, client, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def round_seed(cfg: ExperimentConfig, server_round: int, client_index: int) -> int:
    """What a client's round draws its batches and noise from."""
    return derive_seed(cfg.seed, server_round, client_index)


def sampling_seed(cfg: ExperimentConfig, server_round: int) -> int:
    """What the server seeds Python's `random` with before its strategy samples the round's clients."""
    return derive_seed(cfg.seed, server_round, 0x5A3)


def sampled_clients(cfg: ExperimentConfig, server_round: int) -> list[int]:
    """The partition ids that train in `server_round`: the sample Flower's strategies draw from the seeded
    `random` over the clients in partition order (every client when fl.fraction_train = 1)."""
    n = len(cfg.data.clients)
    return sorted(random.Random(sampling_seed(cfg, server_round)).sample(range(n), cfg.fl.sample_size(n)))


def autocast(bundle: PolicyBundle, enabled: bool):
    if enabled and bundle.device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def fedprox_backward(
    policy: Any,
    batch: dict,
    global_params: list[torch.Tensor],
    mu: float,
    amp: Any = None,
    noise: torch.Tensor | None = None,
    time_: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate into `.grad` the gradient of the FedProx objective, the policy's loss plus
    mu/2 * sum ||w - w_global||^2 over the trainable weights; returns (policy loss, sum ||w - w_global||^2).

    The policy's forward runs under `amp` (an autocast context, or none). The proximal gradient
    mu * (w - w_global) is added after the backward pass in two fused ops over all weights instead of
    being traced through autograd (the same gradient, a few times cheaper). With mu == 0 nothing is added
    or computed: exactly lerobot's plain training step.
    """
    with amp or nullcontext():
        loss, _ = policy.forward(batch, noise=noise, time=time_)
    loss.backward()
    if mu == 0:
        return loss.detach(), torch.zeros((), device=loss.device)
    params = [p for _, p in trainable_parameters(policy)]
    with torch.no_grad():
        drift = torch._foreach_sub([p.detach() for p in params], global_params)
        prox = torch.stack(torch._foreach_norm(drift)).square().sum()
        for p in params:
            if p.grad is None:  # a trainable weight the loss does not reach still feels the proximal pull
                p.grad = torch.zeros_like(p)
        torch._foreach_add_([p.grad for p in params], drift, alpha=mu)
    return loss.detach(), prox


def make_optimizer(
    policy: Any, total_steps: int, start_step: int, warmup_steps: int | None = None
) -> tuple[torch.optim.Optimizer, Any]:
    """lerobot's optimizer and LR-schedule presets; the schedule runs over the whole federated run,
    so a client's round r continues it at step (r - 1) * local_steps.

    lerobot shrinks the preset's warm-up and decay to a run shorter than its decay steps (by
    total / decay). An explicit `warmup_steps` (train.warmup_steps) is kept as given: only the decay is
    fitted to the run."""
    params = [p for _, p in trainable_parameters(policy)]
    optimizer = policy.config.get_optimizer_preset().build(params)
    preset = policy.config.get_scheduler_preset()
    if preset is None:
        return optimizer, None
    if warmup_steps is not None and hasattr(preset, "num_decay_steps"):
        preset = dataclasses.replace(
            preset, num_warmup_steps=warmup_steps, num_decay_steps=min(preset.num_decay_steps, max(total_steps, 1))
        )
    schedule = preset.build(optimizer, total_steps).lr_lambdas[0]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step + start_step))


def train_round(
    bundle: PolicyBundle,
    batches: BatchStream,
    cfg: ExperimentConfig,
    server_round: int,
    client_index: int,
    mu: float,
    client_name: str = "",
) -> dict[str, float]:
    """`train.local_steps` optimizer steps from the current (global) weights; returns the round's metrics.

    `batches` is the client's stream, kept across rounds; the round draws from it with its own seed."""
    steps = cfg.train.local_steps
    optimizer, scheduler = make_optimizer(
        bundle.policy, cfg.fl.num_rounds * steps, (server_round - 1) * steps, cfg.train.warmup_steps
    )
    seed = round_seed(cfg, server_round, client_index)
    torch.manual_seed(seed)  # the policy samples flow-matching noise and time from the global RNG
    return train_steps(
        bundle,
        batches.batches(seed),
        optimizer,
        scheduler,
        steps,
        cfg,
        mu=mu,
        label=f"client {client_name or client_index} in round {server_round}",
    )


def train_steps(
    bundle: PolicyBundle,
    stream: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    steps: int,
    cfg: ExperimentConfig,
    mu: float = 0.0,
    label: str = "",
) -> dict[str, float]:
    """`steps` optimizer steps on batches from `stream`, with the FedProx term around the weights the
    policy holds when called (none when mu == 0); returns the metrics of these steps."""
    t0 = time.perf_counter()
    policy = bundle.policy
    params = [p for _, p in trainable_parameters(policy)]
    start_params = [p.detach().clone() for p in params]
    clip = policy.config.optimizer_grad_clip_norm
    allowed_skips = math.floor(cfg.train.max_skipped_fraction * steps)
    losses, proxes, grad_norms, errors = [], [], [], []
    samples = skipped = 0
    lr = optimizer.param_groups[0]["lr"]
    policy.train()
    data_seconds = 0.0
    while len(losses) < steps:
        t_data = time.perf_counter()
        batch = next(stream)
        data_seconds += time.perf_counter() - t_data
        if "__skipped__" in batch:  # one batch with unreadable items: the batch is skipped, its items named
            skipped += 1
            errors.extend(batch["__skipped__"])
            if skipped > allowed_skips:
                raise RuntimeError(
                    f"{label}: {skipped} of {skipped + len(losses)} batches could not be read ({len(errors)} "
                    f"unreadable items), more than train.max_skipped_fraction={cfg.train.max_skipped_fraction} of "
                    f"{steps} steps allows; first: {errors[0]}. Run `zk0 validate` to find the broken episodes."
                )
            continue
        samples += len(batch["index"])
        batch = bundle.preprocessor(batch)
        loss, prox = fedprox_backward(policy, batch, start_params, mu, autocast(bundle, cfg.train.amp))
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        proxes.append(prox.item())
    with torch.no_grad():
        update_norm = math.sqrt(sum(float(((p - g) ** 2).sum()) for p, g in zip(params, start_params, strict=True)))
    return {
        "train_loss": float(np.mean(losses)),
        "train_loss_std": float(np.std(losses)),
        "train_loss_last": losses[-1],
        "prox_term": float(np.mean(proxes)),
        "grad_norm": float(np.mean(grad_norms)),
        "update_norm": update_norm,
        "lr": float(lr),
        "steps": len(losses),
        "samples": samples,
        "skipped_batches": skipped,
        "skipped_items": len(errors),
        "seconds": time.perf_counter() - t0,
        "data_seconds": data_seconds,  # waiting for batches (decoding, worker start-up)
    }


# ----------------------------------------------------------------------------- evaluation


def frame_subset(n: int, k: int | None) -> list[int]:
    """k evenly spaced frame positions out of n (all when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def _fixed_noise_time(
    policy: Any, keys: list[int], seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and flow-matching time that depend only on (seed, frame): the same weights give the same loss.

    Time follows the training distribution, Beta(1.5, 1) scaled to [0.001, 1], by its inverse CDF.
    """
    c = policy.config
    noise, times = [], []
    for key in keys:
        g = torch.Generator().manual_seed(derive_seed(seed, key))
        noise.append(torch.randn(c.chunk_size, c.max_action_dim, generator=g))
        u = torch.rand((), generator=g)
        times.append(u ** (1 / 1.5) * 0.999 + 0.001)
    return torch.stack(noise).to(device), torch.stack(times).to(device)


def _loader(dataset: Any, positions: list[int], batch_size: int, num_workers: int):
    from zk0lib.data import _one_thread_worker

    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, positions),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=_one_thread_worker if num_workers else None,
    )


@torch.no_grad()
def evaluate(bundle: PolicyBundle, dataset: Any, cfg: ExperimentConfig) -> dict[str, Any]:
    """Seeded flow-matching loss and sampled-action error on a client's held-out episodes.

    Loss: every held-out frame (or `eval.max_frames` evenly spaced ones) with noise and time fixed by
    (eval.seed, frame index). Action error: the mean absolute error, in dataset units, between the
    action chunk sampled from fixed noise and the recorded one (padding excluded), on
    `eval.action_frames` evenly spaced frames. Both are averaged per episode, then over episodes,
    with a 95% interval over episodes (eval.interval).
    """
    e = cfg.eval
    policy = bundle.policy
    policy.eval()
    policy.reset()
    loss_by_ep: dict[int, list[float]] = {}
    mae_by_ep: dict[int, list[np.ndarray]] = {}
    n = len(dataset)
    with autocast(bundle, cfg.train.amp):
        for batch in _loader(dataset, frame_subset(n, e.max_frames), e.batch_size, cfg.train.num_workers):
            keys = batch["index"].tolist()
            episodes = batch["episode_index"].tolist()
            noise, times = _fixed_noise_time(policy, keys, e.seed, bundle.device)
            per_sample, _ = policy.forward(bundle.preprocessor(batch), noise=noise, time=times, reduction="none")
            for ep, value in zip(episodes, per_sample.float().cpu().tolist(), strict=True):
                loss_by_ep.setdefault(ep, []).append(value)
        for batch in _loader(dataset, frame_subset(n, e.action_frames), e.batch_size, cfg.train.num_workers):
            recorded, pad = batch["action"].float().clone(), batch["action_is_pad"]
            keys = batch["index"].tolist()
            noise, _ = _fixed_noise_time(policy, keys, e.seed + 1, bundle.device)
            chunk = policy.predict_action_chunk(bundle.preprocessor(batch), noise=noise)
            predicted = bundle.postprocessor(chunk).float()
            valid = (~pad).unsqueeze(-1).float()
            err = ((predicted - recorded).abs() * valid).sum(1) / valid.sum(1).clamp_min(1)  # (B, joints)
            for ep, row in zip(batch["episode_index"].tolist(), err.numpy(), strict=True):
                mae_by_ep.setdefault(ep, []).append(row)
    policy.reset()
    ep_loss = {ep: float(np.mean(v)) for ep, v in sorted(loss_by_ep.items())}
    ep_mae_joint = {ep: np.mean(v, axis=0) for ep, v in sorted(mae_by_ep.items())}
    ep_mae = {ep: float(v.mean()) for ep, v in ep_mae_joint.items()}
    result: dict[str, Any] = {
        "loss": float(np.mean(list(ep_loss.values()))),
        "loss_ci": mean_ci([list(ep_loss.values())], cfg),
        "frames": sum(len(v) for v in loss_by_ep.values()),
        "episodes": len(ep_loss),
        "episode_loss": {str(k): v for k, v in ep_loss.items()},
    }
    if ep_mae:
        result |= {
            "action_mae": float(np.mean(list(ep_mae.values()))),
            "action_mae_ci": mean_ci([list(ep_mae.values())], cfg),
            "action_mae_joint": [float(x) for x in np.mean(list(ep_mae_joint.values()), axis=0)],
            "action_frames": sum(len(v) for v in mae_by_ep.values()),
            "episode_action_mae": {str(k): v for k, v in ep_mae.items()},
        }
    return result


def mean_ci(groups: list[list[float]], cfg: ExperimentConfig) -> list[float]:
    """The 95% interval of the mean of group (client) means that eval.interval names."""
    if cfg.eval.interval == "t":
        return t_interval(groups)
    return bootstrap_ci(groups, cfg.eval.bootstrap, cfg.eval.seed)


def t_interval(groups: list[list[float]], level: float = 0.95) -> list[float]:
    """Student-t interval of the mean of group means (episodes within clients), Welch-Satterthwaite df.

    The variance of the mean is sum_k s_k^2 / n_k / K^2. A client with a single episode has no variance
    of its own: it is given the pooled within-client variance of the others; with no client of two or
    more episodes there is no interval (NaN). Unlike a percentile bootstrap over 2-5 episodes, which
    covers the true mean far less often than 95%, this one keeps its coverage (tested by simulation)."""
    from scipy import stats

    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return [float("nan"), float("nan")]
    point = float(np.mean([g.mean() for g in groups]))
    multi = [g for g in groups if len(g) > 1]
    if not multi:
        return [float("nan"), float("nan")]
    pooled_df = sum(len(g) - 1 for g in multi)
    pooled_var = sum(((g - g.mean()) ** 2).sum() for g in multi) / pooled_df
    k = len(groups)
    parts, dfs = [], []
    for g in groups:
        var, df = (float(g.var(ddof=1)), len(g) - 1) if len(g) > 1 else (pooled_var, pooled_df)
        parts.append(var / len(g) / k**2)
        dfs.append(df)
    se2 = sum(parts)
    if se2 == 0:
        return [point, point]
    df = se2**2 / sum(p**2 / d for p, d in zip(parts, dfs, strict=True) if p > 0)
    half = float(stats.t.ppf(0.5 + level / 2, df)) * np.sqrt(se2)
    return [point - half, point + half]


def bootstrap_ci(groups: list[list[float]], n_boot: int, seed: int) -> list[float]:
    """95% percentile interval of the mean of group means, resampling units within each group.

    One group: the usual bootstrap over episodes. Several (clients): a stratified bootstrap of the
    mean over clients, each client's episodes resampled on their own.
    """
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return [float("nan"), float("nan")]
    point = float(np.mean([g.mean() for g in groups]))
    if n_boot == 0:
        return [point, point]
    rng = np.random.default_rng(seed)
    draws = np.zeros(n_boot)
    for g in groups:
        draws += g[rng.integers(0, len(g), size=(n_boot, len(g)))].mean(axis=1)
    draws /= len(groups)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return [float(lo), float(hi)]


def combine_clients(evals: dict[str, dict[str, Any]], cfg: ExperimentConfig) -> dict[str, Any]:
    """The mean over clients (each client weighs the same) with its 95% interval, stratified by client."""
    out: dict[str, Any] = {}
    for key, per_ep in (("loss", "episode_loss"), ("action_mae", "episode_action_mae")):
        groups = [list(ev[per_ep].values()) for ev in evals.values() if per_ep in ev]
        if groups:
            out[key] = float(np.mean([np.mean(g) for g in groups]))
            out[f"{key}_ci"] = mean_ci(groups, cfg)
    return out
