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

`model.estimate_environment_state` is the other way to use the same target: a state estimator that is part
of the policy. A spatial softmax, the keypoint readout of visuomotor policy learning (per learned channel,
the expected position on the map where it fires), reads either each camera's image tokens (`tokens`: the
frozen vision path's output, so `data.cache=features` serves it; 4x4 tokens per camera in the tiny model)
or the frames through the estimator's own small CNN (`pixels`: finer, what rung 2 needed), and an MLP turns
the keypoints into the cube's and target's positions. Its estimate (detached: only the estimator's own loss
trains it) fills the state slots that rung 1 filled with the recorded positions, so the action expert reads
it as it read the answer. At inference the policy still sees only the cameras and the joints; the estimator
is saved beside the policy and reattached when it is loaded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

OBS_ENV_STATE = "observation.environment_state"
HEAD = "zk0_aux_head"  # the head's attribute on the policy (its parameters train and travel with the rest)
ESTIMATOR_FILE = "zk0_state_estimator"  # .json (its shape and stats) and .safetensors, beside a saved policy
FILM_CHANNELS = 32  # the pixel estimator's middle convolution: the channels the task's FiLM scales and shifts


class _PositionsHead(nn.Module):
    """What every head that predicts the normalized cube and target positions has: the positions' stats, what
    the last forward left for its loss (`captured`), and the loss."""

    def __init__(self, mean: Any, std: Any):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).float().flatten(), persistent=False)
        self.register_buffer("std", torch.as_tensor(std).float().flatten().clamp_min(1e-6), persistent=False)
        self.captured: dict[str, Any] = {}

    def predicted(self) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, target: torch.Tensor) -> torch.Tensor:
        """MSE of the normalized positions the last forward predicted (the batch's positions at the current
        frame: lerobot gives observations a time axis of n_obs_steps)."""
        predicted = self.predicted()
        normalized = self.normalized(target)
        if normalized.shape != predicted.shape:
            raise ValueError(
                f"{OBS_ENV_STATE}: shape {tuple(normalized.shape)}, the head predicts {tuple(predicted.shape)}"
            )
        return nn.functional.mse_loss(predicted, normalized)

    def normalized(self, target: torch.Tensor) -> torch.Tensor:
        """The recorded positions at the current frame (lerobot gives observations a time axis of n_obs_steps),
        normalized as the head predicts them."""
        target = target[:, -1] if target.dim() == 3 else target
        return (target.float().to(self.mean.device) - self.mean) / self.std


class EnvironmentStateHead(_PositionsHead):
    """Attention pooling over the prefix output (one learned query), then a two-layer MLP to the positions."""

    def __init__(self, width: int, mean: torch.Tensor, std: torch.Tensor, hidden: int = 128):
        super().__init__(mean, std)
        self.query = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.key = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, mean.numel()))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = tokens.float()
        scores = (self.key(tokens) @ self.query) / math.sqrt(tokens.shape[-1])
        scores = scores.masked_fill(~mask.bool(), float("-inf"))
        pooled = (scores.softmax(dim=1).unsqueeze(-1) * tokens).sum(dim=1)
        return self.mlp(pooled)

    def predicted(self) -> torch.Tensor:
        return self(self.captured["prefix"], self.captured["mask"])


class _Keypoints(nn.Module):
    """(B, K, H, W) maps -> (B, K, 2): lerobot's SpatialSoftmax (each channel's expected position under its
    softmax over the map), as (row, column), the order the estimators were trained with."""

    def __init__(self, keypoints: int, height: int, width: int):
        super().__init__()
        from lerobot.policies.diffusion.modeling_diffusion import SpatialSoftmax

        self.softmax = SpatialSoftmax((keypoints, height, width))
        # its coordinate grid follows from the map's size: not saved with the estimator's weights
        self.softmax.register_buffer("pos_grid", self.softmax.pos_grid, persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.softmax(maps.float()).flip(-1)  # lerobot gives (x, y): (column, row)


class _Estimator(_PositionsHead):
    """What both estimators share: the MLP from every camera's keypoints to the normalized positions and the
    description saved beside the policy."""

    def __init__(self, kind: str, shape: dict[str, int], mean: Any, std: Any):
        super().__init__(mean, std)
        self.kind, self.shape = kind, shape

    frozen = False  # model.freeze_estimator: kept fixed (`freeze`), so its forward runs without a graph
    teacher_forcing = 0.0  # train.teacher_forcing: the fraction of training samples given the recorded positions

    def freeze(self) -> None:
        """Neither trained nor sent (not among the trainable weights), and run without a graph."""
        self.requires_grad_(False)
        self.frozen = True

    def recorded(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's recorded positions at the current frame, normalized as the estimate, and which samples
        take them in place of the estimate (each with probability `teacher_forcing`, from torch's seeded RNG)."""
        if OBS_ENV_STATE not in batch:
            raise ValueError(f"train.teacher_forcing: the batch has no {OBS_ENV_STATE} (zk0's sim recordings have it)")
        truth = self.normalized(batch[OBS_ENV_STATE])
        if self.teacher_forcing >= 1:
            return truth, torch.ones(truth.shape[0], dtype=torch.bool, device=truth.device)
        return truth, torch.rand(truth.shape[0], device=truth.device) < self.teacher_forcing

    def _add_mlp(self) -> None:
        """The MLP, made after the readout's own layers (the seeded initialization's order)."""
        s, hidden = self.shape, self.shape["hidden"]
        self.mlp = nn.Sequential(
            nn.Linear(s["cameras"] * s["keypoints"] * 2, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, self.mean.numel()),
        )  # fmt: skip

    def predicted(self) -> torch.Tensor:
        return self.captured["estimate"]


class StateEstimator(_Estimator):
    """Camera tokens -> normalized cube and target positions: per camera, a spatial softmax over its token grid
    (LayerNorm, a linear map to `keypoints` channels), then the MLP over every camera's keypoints."""

    def __init__(
        self, width: int, cameras: int, tokens: int, mean: Any, std: Any, keypoints: int = 32, hidden: int = 256
    ):
        shape = {"width": width, "cameras": cameras, "tokens": tokens, "keypoints": keypoints, "hidden": hidden}
        super().__init__("tokens", shape, mean, std)
        self.side = math.isqrt(tokens)
        if self.side * self.side != tokens:
            raise ValueError(f"model.estimate_environment_state: {tokens} tokens per camera do not form a square grid")
        self.norm = nn.LayerNorm(width)
        self.channels = nn.Linear(width, keypoints)
        self._add_mlp()
        self.keypoints = _Keypoints(keypoints, self.side, self.side)

    def estimate(
        self, image_tokens: torch.Tensor, pixels: list[torch.Tensor] | None, task: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self(image_tokens)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        b = image_tokens.shape[0]
        c, t = self.shape["cameras"], self.shape["tokens"]
        if image_tokens.shape[1] != c * t:
            raise ValueError(
                f"model.estimate_environment_state: the prefix has {image_tokens.shape[1]} image tokens, the "
                f"estimator was built for {c} cameras of {t}"
            )
        maps = self.channels(self.norm(image_tokens.float())).reshape(b * c, self.side, self.side, -1)
        return self.mlp(self.keypoints(maps.permute(0, 3, 1, 2)).reshape(b, -1))


class PixelStateEstimator(_Estimator):
    """Camera frames -> normalized cube and target positions: per camera, its own small CNN on the frame at
    `size` x `size` (a 5x5 convolution of stride 2, a 3x3, then a 1x1 to `keypoints` maps) and a spatial
    softmax over its maps; the MLP over every camera's keypoints. It sees the pixels, so it can place the
    cube finer than the vision encoder's token grid.

    With `task_width` > 0 it reads the instruction too: the mean of the task tokens' embeddings (the VLM's own
    token embeddings, `task_width` wide) scales and shifts the 3x3 convolution's channels (FiLM, zero-initialized
    so that it starts as the estimator that does not read it). At the first frame the cube and the target are
    two coloured things on the table, and only the instruction says which is the cube."""

    def __init__(
        self,
        cameras: int,
        mean: Any,
        std: Any,
        size: int = 64,
        keypoints: int = 16,
        hidden: int = 256,
        task_width: int = 0,
    ):
        shape = {"cameras": cameras, "size": size, "keypoints": keypoints, "hidden": hidden, "task_width": task_width}
        super().__init__("pixels", shape, mean, std)
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.GELU(), nn.Conv2d(16, FILM_CHANNELS, 3, padding=1),
                nn.GELU(), nn.Conv2d(FILM_CHANNELS, keypoints, 1),
            )
            for _ in range(cameras)
        )  # fmt: skip
        self._add_mlp()
        self.keypoints = _Keypoints(keypoints, size // 2, size // 2)  # the first convolution's stride halves it
        self.film = None
        if task_width:  # made last: the convolutions and the MLP start as the seeded estimator without it
            self.film = nn.Linear(task_width, 2 * FILM_CHANNELS)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def estimate(
        self, image_tokens: torch.Tensor, pixels: list[torch.Tensor] | None, task: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pixels is None:
            raise ValueError(
                "model.estimate_environment_state=pixels: the batch has no camera frames (with data.cache=features "
                "the training items keep them for the estimator)"
            )
        return self(pixels, task)

    def forward(self, pixels: list[torch.Tensor], task: torch.Tensor | None = None) -> torch.Tensor:
        """`pixels`: one (B, 3, H, W) frame per camera in [-1, 1], as SmolVLA prepares them for its encoder;
        `task`: (B, task_width), the mean embedding of each sample's task tokens (`task_vector`), when it reads it."""
        if len(pixels) != len(self.convs):
            raise ValueError(
                f"model.estimate_environment_state=pixels: {len(pixels)} cameras, the estimator has {len(self.convs)}"
            )
        if (self.film is None) != (task is None):
            raise ValueError(
                "the pixel estimator reads the task: give it the task's embedding"
                if task is None
                else "the pixel estimator was built without reading the task (task_width 0)"
            )
        size = self.shape["size"]
        film = None if task is None else self.film(task.float()).chunk(2, dim=-1)
        points = []
        for conv, img in zip(self.convs, pixels, strict=True):
            h = conv[:4](nn.functional.interpolate(img.float(), size=(size, size), mode="area"))
            if film is not None:
                h = h * (1 + film[0][:, :, None, None]) + film[1][:, :, None, None]
            points.append(self.keypoints(conv[4:](h)))
        return self.mlp(torch.cat([q.flatten(1) for q in points], dim=1))


def task_vector(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, W) token embeddings and their (B, L) mask -> (B, W): the mean over each sample's real tokens."""
    mask = mask.to(embeddings.device).float()[..., None]
    return (embeddings.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)


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


def attach_estimator(
    policy: Any,
    stats: dict[str, dict[str, Any]],
    weight: float,
    seed: int,
    state_size: int,
    kind: str = "tokens",
    reads_task: bool = False,
) -> StateEstimator | PixelStateEstimator:
    """model.estimate_environment_state (tokens or pixels): build the seeded estimator for this policy's
    cameras and attach it; `reads_task` (pixels): it reads the instruction through the VLM's token embeddings."""
    if OBS_ENV_STATE not in stats:
        raise ValueError(
            f"model.estimate_environment_state learns from {OBS_ENV_STATE}, which these datasets do not have "
            "(zk0's sim recordings have it): set model.estimate_environment_state=none"
        )
    inner = policy.model
    cameras = len(policy.config.image_features)
    s = stats[OBS_ENV_STATE]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "pixels":
            width = inner.vlm_with_expert.config.text_config.hidden_size if reads_task else 0
            head: Any = PixelStateEstimator(cameras, s["mean"], s["std"], task_width=width)
        else:
            width = inner.vlm_with_expert.config.text_config.hidden_size
            head = StateEstimator(width, cameras, _tokens_per_camera(inner.vlm_with_expert.config), s["mean"], s["std"])
    return _attach_estimator(policy, head, weight, state_size)


def _attach_estimator(policy: Any, head: Any, weight: float, state_size: int) -> Any:
    inner = policy.model
    if policy.config.add_image_special_tokens:
        raise ValueError(
            "model.estimate_environment_state: not with add_image_special_tokens (the image tokens' place)"
        )
    size = state_size + head.mean.numel()
    if size > policy.config.max_state_dim:
        raise ValueError(
            f"model.estimate_environment_state: the state with the estimate has {size} numbers, more than the "
            f"policy's max_state_dim={policy.config.max_state_dim}"
        )
    head.to(next(policy.parameters()).device)
    head.weight, head.state_size = weight, state_size
    original = inner.embed_prefix

    def embed_prefix(images: Any, img_masks: Any, lang_tokens: Any, lang_masks: Any, state: Any = None) -> Any:
        embs, pad_masks, att_masks = original(images, img_masks, lang_tokens, lang_masks, state=state)
        if state is None or state.dim() != 2:
            raise ValueError("model.estimate_environment_state: SmolVLA's padded state must be (batch, max_state_dim)")
        n_image = embs.shape[1] - lang_tokens.shape[1] - 1  # the prefix: camera tokens, task, one state token
        # the frames: these images, or (data.cache=features, where the images are embeddings) the batch's own
        pixels = list(images) if images[0].dim() == 4 else head.captured.pop("pixels", None)
        with torch.no_grad() if head.frozen else nullcontext():
            task = None
            if head.shape.get("task_width"):  # it reads the instruction: the VLM's (frozen) task-token embeddings
                with torch.no_grad():
                    task = task_vector(inner.vlm_with_expert.embed_language_tokens(lang_tokens), lang_masks)
            estimate = head.estimate(embs[:, :n_image], pixels, task)
        head.captured["estimate"] = estimate
        filled = state.clone()
        filled[:, state_size:size] = estimate.detach().to(state.dtype)
        truth = head.captured.pop("truth", None)  # train.teacher_forcing: the recording's positions instead
        if truth is not None:
            filled[:, state_size:size] = torch.where(
                truth[1][:, None], truth[0].to(state.dtype), filled[:, state_size:size]
            )
        proj = inner.state_proj
        state_emb = proj(filled.to(proj.weight.dtype)).to(embs.dtype)
        return torch.cat([embs[:, :-1], state_emb[:, None]], dim=1), pad_masks, att_masks

    inner.embed_prefix = embed_prefix
    from zk0lib.cache import embedding_key

    forward, keys = policy.forward, list(policy.config.image_features)
    embedded = [embedding_key(k) for k in keys]

    def forward_keeping_frames(batch: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if head.kind == "pixels" and all(k in batch for k in keys) and any(k in batch for k in embedded):
            head.captured["pixels"] = type(policy).prepare_images(policy, batch)[0]  # lerobot's own preparation
        if policy.training and head.teacher_forcing > 0:
            head.captured["truth"] = head.recorded(batch)
        return forward(batch, *args, **kwargs)

    policy.forward = forward_keeping_frames
    setattr(policy, HEAD, head)
    return head


def estimator_of(policy: Any) -> StateEstimator | PixelStateEstimator | None:
    """The policy's state estimator (model.estimate_environment_state), or None."""
    head = head_of(policy)
    return head if isinstance(head, _Estimator) else None


def needs_frames(policy: Any) -> bool:
    """Whether the policy's estimator reads the camera frames (so cached-feature items must keep them)."""
    estimator = estimator_of(policy)
    return estimator is not None and estimator.kind == "pixels"


def _tokens_per_camera(vlm_config: Any) -> int:
    """Image tokens per camera: the vision encoder's patches, merged by the connector's pixel shuffle."""
    from zk0lib.model import image_tokens

    vision = vlm_config.vision_config
    return image_tokens(vision.image_size, vision.patch_size, vlm_config.scale_factor)


def save_estimator(policy: Any, folder: Any) -> None:
    """Write the estimator beside a saved policy (nothing when the policy has none)."""
    from pathlib import Path

    head = estimator_of(policy)
    if head is not None:
        write_estimator(head, Path(folder))


def write_estimator(head: StateEstimator | PixelStateEstimator, folder: Any) -> None:
    """The estimator's description (shape, kind, state size, stats) and weights into `folder`."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    spec = {
        **head.shape,
        "kind": head.kind,
        "state_size": head.state_size,
        "mean": head.mean.tolist(),
        "std": head.std.tolist(),
    }
    (folder / f"{ESTIMATOR_FILE}.json").write_text(json.dumps(spec, indent=1))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
        folder / f"{ESTIMATOR_FILE}.safetensors",
    )


def load_estimator(policy: Any, folder: Any, weight: float = 0.0, kind: str | None = None) -> Any:
    """Reattach a saved policy's estimator (None when the folder has none); `kind`: the one the config asks for."""
    head = read_estimator(folder)
    if head is None:
        return None
    if kind is not None and kind != head.kind:
        raise ValueError(
            f"model.estimate_environment_state={kind}, but {folder} holds a '{head.kind}' estimator: set "
            f"model.estimate_environment_state={head.kind} to go on training it"
        )
    return _attach_estimator(policy, head, weight, head.state_size)


def read_estimator(folder: Any) -> StateEstimator | PixelStateEstimator | None:
    """The estimator saved in a folder (its `state_size` set), unattached; None when the folder has none."""
    from pathlib import Path

    from safetensors.torch import load_file

    spec_path = Path(folder) / f"{ESTIMATOR_FILE}.json"
    if not spec_path.exists():
        return None
    spec = json.loads(spec_path.read_text())
    state_size, saved = spec.pop("state_size"), spec.pop("kind", "tokens")  # the first estimators were tokens
    head = PixelStateEstimator(**spec) if saved == "pixels" else StateEstimator(**spec)
    head.load_state_dict(load_file(Path(folder) / f"{ESTIMATOR_FILE}.safetensors"))
    head.state_size = state_size
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
