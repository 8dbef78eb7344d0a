"""The training loop every probe shares: `steps` optimizer steps on the policy's trainable parameters,
gradient clipping, a cosine schedule (optional linear warm-up) unless an optimizer is given, and a line
every `log_every` steps with the recent mean of each loss and the time per step.

`loss_of(step)` returns a dict of scalar tensors; its "loss" is the one backpropagated, the others are
only logged (e.g. the decision-frame loss beside the recorded frames' loss).
"""

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from zk0lib import model


def run(
    policy,
    steps: int,
    loss_of: Callable[[int], dict[str, torch.Tensor]],
    *,
    lr: float = 5e-4,
    warmup: int = 0,
    clip: float = 10.0,
    seed: int = 5,
    log_every: int = 200,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
) -> dict[str, list[float]]:
    params = [p for _, p in model.trainable_parameters(policy)]
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=1e-10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: (min(1.0, (s + 1) / warmup) if warmup else 1.0) * 0.5 * (1 + math.cos(math.pi * s / steps)),
        )
    policy.train()
    torch.manual_seed(seed)
    history: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for step in range(steps):
        losses = loss_of(step)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for name, value in losses.items():
            history.setdefault(name, []).append(float(value.detach()))
        if (step + 1) % log_every == 0:
            means = ", ".join(f"{name} {np.mean(v[-log_every:]):.4f}" for name, v in history.items())
            ms = 1000 * (time.perf_counter() - t0) / (step + 1)
            print(f"step {step + 1}/{steps}: {means} ({ms:.0f} ms/step)", flush=True)
    return history
