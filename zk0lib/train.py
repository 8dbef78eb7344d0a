"""Local training: the FedProx step, lerobot's optimizer and schedule over the run, and seeded client sampling."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from zk0lib import auxiliary
from zk0lib.config import ExperimentConfig
from zk0lib.data import BatchStream
from zk0lib.model import PolicyBundle, trainable_parameters


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (run seed, round, client, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def round_seed(cfg: ExperimentConfig, server_round: int, partition_id: int) -> int:
    """What a client's round draws its batches and noise from."""
    return derive_seed(cfg.seed, server_round, partition_id)


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
        aux = auxiliary.aux_loss(policy, batch)  # train.aux_environment_state: None unless the policy has a head
    (loss if aux is None else loss + auxiliary.head_of(policy).weight * aux).backward()
    if aux is not None:
        auxiliary.head_of(policy).last = aux.detach()  # read with the step's loss (one sync a step, not two)
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
    partition_id: int,
    mu: float,
    client_name: str = "",
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """`train.local_steps` optimizer steps from the current (global) weights; returns the round's metrics.

    `batches` is the client's stream, kept across rounds; the round draws from it with its own seed. With
    `progress`, a line about every minute of a long round (see `train_steps`)."""
    steps = cfg.train.local_steps
    optimizer, scheduler = make_optimizer(
        bundle.policy, cfg.fl.num_rounds * steps, (server_round - 1) * steps, cfg.train.warmup_steps
    )
    seed = round_seed(cfg, server_round, partition_id)
    torch.manual_seed(seed)  # the policy samples flow-matching noise and time from the global RNG
    return train_steps(
        bundle,
        batches.batches(seed),
        optimizer,
        scheduler,
        steps,
        cfg,
        mu=mu,
        label=f"client {client_name or partition_id} in round {server_round}",
        progress=progress,
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
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """`steps` optimizer steps on batches from `stream`, with the FedProx term around the weights the
    policy holds when called (none when mu == 0); returns the metrics of these steps. With `progress`,
    a line about every train.progress_every_s seconds (step, recent loss, samples/s, time left) for long
    rounds."""
    t0 = time.perf_counter()
    progress_every_s = cfg.train.progress_every_s
    next_line = t0 + progress_every_s
    policy = bundle.policy
    params = [p for _, p in trainable_parameters(policy)]
    start_params = [p.detach().clone() for p in params]
    clip = policy.config.optimizer_grad_clip_norm
    allowed_skips = math.floor(cfg.train.max_skipped_fraction * steps)
    losses, proxes, grad_norms, errors, aux_losses = [], [], [], [], []
    head = auxiliary.head_of(policy)
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
        if head is not None:
            aux_losses.append(head.last.item())
        if progress is not None and time.perf_counter() >= next_line and len(losses) < steps:
            elapsed = time.perf_counter() - t0
            progress(
                f"{label}: step {len(losses)}/{steps}, loss {np.mean(losses[-100:]):.4f} (last 100), "
                f"{samples / elapsed:.0f} samples/s, {elapsed * (steps - len(losses)) / len(losses) / 60:.1f} min left"
            )
            next_line += progress_every_s
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
    } | ({"aux_loss": float(np.mean(aux_losses))} if aux_losses else {})
