"""An auxiliary training signal for SmolVLA from images (the closed-loop ladder's rung 2): the VLM's output
over the prefix (camera tokens, task, state) must locate the cube and the target.

Rung 2's runs found that the flow-matching loss barely asks for the image: after the first frame the arm's
own joint positions say where it is going, so the first decision, the only one where the image alone says
where the cube is, is one frame in ~135. `train.aux_environment_state` (a weight) adds a loss that asks for
the image on every frame: a small head reads the prefix output by attention and predicts the sim
recording's `observation.environment_state` (cube and target positions, mean/std-normalized with the
federation's stats), as privileged simulator state is used as an auxiliary target in sim robot learning.
The state is a training target only: the policy still sees the cameras and the joints, nothing else, and
the head is dropped from saved policies. It trains the VLM layers (model.train_expert_only=false), which
the action expert reads at every layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

OBS_ENV_STATE = "observation.environment_state"
HEAD = "zk0_aux_head"  # the head's attribute on the policy (its parameters train and travel with the rest)


class EnvironmentStateHead(nn.Module):
    """Attention pooling over the prefix output (one learned query), then a two-layer MLP to the positions."""

    def __init__(self, width: int, mean: torch.Tensor, std: torch.Tensor, hidden: int = 128):
        super().__init__()
        self.query = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.key = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, mean.numel()))
        self.register_buffer("mean", mean.float().flatten(), persistent=False)
        self.register_buffer("std", std.float().flatten().clamp_min(1e-6), persistent=False)
        self.captured: dict[str, torch.Tensor] = {}

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = tokens.float()
        scores = (self.key(tokens) @ self.query) / math.sqrt(tokens.shape[-1])
        scores = scores.masked_fill(~mask.bool(), float("-inf"))
        pooled = (scores.softmax(dim=1).unsqueeze(-1) * tokens).sum(dim=1)
        return self.mlp(pooled)

    def loss(self, target: torch.Tensor) -> torch.Tensor:
        """MSE of the normalized positions predicted from the prefix the last forward computed (the batch's
        positions at the current frame: lerobot gives observations a time axis of n_obs_steps)."""
        predicted = self(self.captured["prefix"], self.captured["mask"])
        if target.dim() == 3:
            target = target[:, -1]
        if target.shape != predicted.shape:
            raise ValueError(
                f"{OBS_ENV_STATE}: shape {tuple(target.shape)}, the head predicts {tuple(predicted.shape)}"
            )
        return nn.functional.mse_loss(predicted, (target.float().to(predicted.device) - self.mean) / self.std)


def attach(policy: Any, stats: dict[str, dict[str, Any]], weight: float, seed: int) -> EnvironmentStateHead:
    """Give the policy the head (seeded: every process of a federation builds the same one) and the hooks that
    keep the prefix output and its padding mask of each forward."""
    if OBS_ENV_STATE not in stats:
        raise ValueError(
            f"train.aux_environment_state needs {OBS_ENV_STATE} in the datasets (zk0's sim recordings have it); "
            "these have none: set train.aux_environment_state=0"
        )
    inner = policy.model
    width = inner.vlm_with_expert.config.text_config.hidden_size
    s = stats[OBS_ENV_STATE]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = EnvironmentStateHead(width, torch.as_tensor(s["mean"]), torch.as_tensor(s["std"]))
    head.to(next(policy.parameters()).device)
    head.weight = weight

    def keep_mask(output: Any) -> None:
        head.captured["mask"] = output[1]  # (embeddings, pad masks, attention masks)

    def keep_prefix(output: Any) -> None:
        outputs, _ = output
        if outputs[0] is not None and outputs[1] is not None:  # the training forward (prefix and suffix)
            head.captured["prefix"] = outputs[0]

    _wrap(inner, "embed_prefix", keep_mask)
    _wrap(inner.vlm_with_expert, "forward", keep_prefix)
    setattr(policy, HEAD, head)
    return head


def _wrap(owner: Any, method: str, keep: Any) -> None:
    """See a method's output: lerobot calls embed_prefix and vlm_with_expert.forward directly, so a module's
    forward hooks would not run."""
    original = getattr(owner, method)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        keep(out)
        return out

    setattr(owner, method, wrapped)


def head_of(policy: Any) -> EnvironmentStateHead | None:
    return getattr(policy, HEAD, None)


@contextmanager
def head_set_aside(policy: Any) -> Iterator[None]:
    """The policy without its head for the duration (what a saved policy holds), then with it again."""
    head = head_of(policy)
    if head is not None:
        delattr(policy, HEAD)
    try:
        yield
    finally:
        if head is not None:
            setattr(policy, HEAD, head)


def aux_loss(policy: Any, batch: dict) -> torch.Tensor | None:
    """The head's loss on the last forward's prefix (unweighted), or None when the policy has no head."""
    head = head_of(policy)
    if head is None:
        return None
    if OBS_ENV_STATE not in batch:
        raise ValueError(f"train.aux_environment_state: the batch has no {OBS_ENV_STATE}")
    return head.loss(batch[OBS_ENV_STATE])
