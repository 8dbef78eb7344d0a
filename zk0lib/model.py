"""SmolVLA through lerobot's factories: pretrained (Hub or folder) or a tiny offline one.

The tiny SmolVLA differs from `lerobot/smolvla_base` only in size: its VLM (config, tokenizer and
processor) is generated here, deterministically, and installed into the local Hugging Face cache under
the repo id `zk0/tiny-smolvlm2`, so saved policies name it exactly as real ones name
`HuggingFaceTB/SmolVLM2-500M-Video-Instruct`, and reload with `SmolVLAPolicy.from_pretrained` anywhere
that cache entry exists (`zk0lib.model.ensure_tiny_vlm()` recreates it bit for bit).
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zk0lib.config import TINY, ExperimentConfig, resolve_pretrained

TINY_VLM_REPO = "zk0/tiny-smolvlm2"
ADAPTER_DIR = "adapter"  # a LoRA checkpoint's adapter, in PEFT's format, inside its policy folder
TINY_IMAGE_SIZE = 128
SMOLVLM2_500M = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
_SPECIAL_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
# Text the tiny tokenizer is trained on: the words of SO-100/101 task strings, so prompts tokenize
# into words rather than bytes.
_CORPUS = [
    "pick up the red cube and place it on the green target",
    "pick up the blue cube and place it in the box",
    "move the gripper to the yellow marker and close it",
    "stack the orange block on the purple block",
    "sort the cubes by colour into the left and right bins",
    "grasp a lego brick and put it in the bowl",
    "open the gripper, lower the arm, close, lift, traverse, lower and release",
]


class ModelNotAvailableError(RuntimeError):
    """A pretrained policy or VLM is neither in the local cache nor downloadable."""


# ----------------------------------------------------------------------------- tiny VLM


def image_tokens(image_size: int, patch_size: int, scale_factor: int) -> int:
    """Tokens SmolVLM gives one image: its patches, merged scale_factor x scale_factor by the connector."""
    return (image_size // patch_size) ** 2 // scale_factor**2


def _write_vlm_folder(dest: Path, text: dict[str, Any], vision: dict[str, Any], scale_factor: int) -> None:
    """A SmolVLM config + byte-level BPE tokenizer + processor, all made locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<pad>", *_SPECIAL_TOKENS.values()]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        extra_special_tokens=dict(_SPECIAL_TOKENS),
        model_max_length=2048,
    )
    text = {"vocab_size": len(tokenizer), **text, "pad_token_id": tokenizer.pad_token_id}
    config = SmolVLMConfig(
        text_config={"model_type": "llama", "tie_word_embeddings": False, **text},
        vision_config=vision,
        scale_factor=scale_factor,
        image_token_id=tokenizer.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=text["vocab_size"],
    )
    size = {"longest_edge": vision["image_size"]}
    seq_len = image_tokens(vision["image_size"], vision["patch_size"], scale_factor)
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=size, max_image_size=size, do_image_splitting=False),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(size=size, max_image_size=size),
        image_seq_len=seq_len,
    )
    config.save_pretrained(dest)
    processor.save_pretrained(dest)


TINY_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
}
TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": TINY_IMAGE_SIZE,
    "patch_size": 16,
}


def _tiny_vlm_folder(dest: Path, vision: dict[str, Any] | None = None) -> None:
    """The tiny VLM's config and tokenizer; `vision` overrides parts of its vision tower (probes only)."""
    _write_vlm_folder(dest, text=dict(TINY_TEXT), vision={**TINY_VISION, **(vision or {})}, scale_factor=2)


def smolvlm2_500m_folder(dest: Path) -> None:
    """A config-only stand-in for SmolVLM2-500M (its published dimensions) to build smolvla_base on meta."""
    _write_vlm_folder(
        dest,
        text={
            "hidden_size": 960,
            "intermediate_size": 2560,
            "num_hidden_layers": 32,
            "num_attention_heads": 15,
            "num_key_value_heads": 5,
            "head_dim": 64,
            "max_position_embeddings": 8192,
            "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5,
            "vocab_size": 49280,
        },
        vision={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 512,
            "patch_size": 16,
        },
        scale_factor=4,
    )


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def ensure_tiny_vlm() -> str:
    """Install the tiny VLM into the local Hugging Face cache (once) and return its repo id."""
    repo_dir = _hub_cache() / ("models--" + TINY_VLM_REPO.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if ref.exists() and (repo_dir / "snapshots" / ref.read_text().strip() / "tokenizer.json").exists():
        return TINY_VLM_REPO
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / "vlm"
        _tiny_vlm_folder(built)
        digest = hashlib.sha1()
        for f in sorted(built.iterdir()):
            digest.update(f.name.encode() + f.read_bytes())
        commit = digest.hexdigest()
        snapshot = repo_dir / "snapshots" / commit
        if not snapshot.exists():
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            staging = snapshot.parent / f".{commit}.{os.getpid()}"
            shutil.copytree(built, staging)
            try:
                staging.rename(snapshot)
            except OSError:  # another process installed it first
                shutil.rmtree(staging, ignore_errors=True)
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp_ref = ref.with_name(f".main.{os.getpid()}")
        tmp_ref.write_text(commit)
        tmp_ref.replace(ref)
    return TINY_VLM_REPO


# ----------------------------------------------------------------------------- policy


@dataclass
class PolicyBundle:
    """A policy with the processors that feed it; one per process, reused across rounds and clients."""

    policy: Any
    preprocessor: Any
    postprocessor: Any
    device: torch.device

    @property
    def config(self) -> Any:
        return self.policy.config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={name} but CUDA is not available here; use model.device=cpu or auto")
    return torch.device(name)


def _load_pretrained_config(pretrained: str) -> Any:
    import lerobot.policies.smolvla.configuration_smolvla  # noqa: F401 - registers the "smolvla" policy type
    from lerobot.configs.policies import PreTrainedConfig

    folder = Path(pretrained).expanduser()
    if folder.exists():
        _install_tiny_vlm_if_named(folder)
        return PreTrainedConfig.from_pretrained(folder)  # a broken local folder raises as it is
    if pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
        raise ModelNotAvailableError(
            f"model.pretrained={pretrained!r}: no such policy folder, and not a Hub id like 'lerobot/smolvla_base'"
        )
    try:
        return PreTrainedConfig.from_pretrained(pretrained)
    except Exception as e:  # noqa: BLE001 - any failure here means "not available", explained below
        raise ModelNotAvailableError(_missing_model_message(pretrained, e)) from e


def _install_tiny_vlm_if_named(folder: Path) -> None:
    """A policy folder built on the tiny VLM (the shipped base, a tiny run's checkpoint) needs it in the
    local Hugging Face cache, and the Hub offline: that VLM exists nowhere else."""
    import json

    from zk0lib.env import set_hub_offline

    config = folder / "config.json"
    if config.exists() and json.loads(config.read_text()).get("vlm_model_name") == TINY_VLM_REPO:
        ensure_tiny_vlm()
        set_hub_offline()


def _missing_model_message(pretrained: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    return (
        f"cannot load the policy {pretrained!r}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
        f"It is not in the local Hugging Face cache ({_hub_cache()}) "
        f"{'and HF_HUB_OFFLINE is set' if offline else 'and the Hub could not be reached'}.\n"
        "Pre-download it on a machine with network, with the VLM it is built on:\n"
        f"    huggingface-cli download {pretrained}\n"
        f"    huggingface-cli download {SMOLVLM2_500M}\n"
        "then copy that cache folder here (or point HF_HOME at it), or set model.pretrained to a local policy "
        "folder (one holding config.json and model.safetensors). For an offline run use model.pretrained=tiny."
    )


def pretrained_stats(pretrained: str) -> dict[str, dict[str, Any]]:
    """The normalization stats a pretrained policy was saved with (its preprocessor's normalizer: the stats of
    its pretraining data), for the observation and action features."""
    from lerobot.processor import NormalizerProcessorStep, PolicyProcessorPipeline

    import zk0lib.steps  # noqa: F401  (registers zk0's processor steps, which a saved preprocessor may name)

    path = resolve_pretrained(pretrained)
    if Path(path).expanduser().exists():
        _install_tiny_vlm_if_named(Path(path).expanduser())
    try:
        pipeline = PolicyProcessorPipeline.from_pretrained(path, config_filename="policy_preprocessor.json")
    except Exception as e:  # noqa: BLE001 - a missing file or an offline Hub: say which policy and what to do
        raise ModelNotAvailableError(
            f"privacy.stats=pretrained: cannot read the normalization stats of {pretrained!r} "
            f"(policy_preprocessor.json and its normalizer): {type(e).__name__}: {e}"
        ) from e
    steps = [s for s in pipeline.steps if isinstance(s, NormalizerProcessorStep) and s.stats]
    if not steps:
        raise ModelNotAvailableError(f"privacy.stats=pretrained: {pretrained!r} was saved without normalization stats")
    return {
        feat: {k: np.asarray(v.detach().cpu() if torch.is_tensor(v) else v) for k, v in stat.items()}
        for feat, stat in steps[0].stats.items()
        if feat.startswith("observation.") or feat == "action"
    }


def check_pretrained(pretrained: str) -> None:
    """Raise ModelNotAvailableError (with what to download) unless the policy's config can be read."""
    _load_pretrained_config(resolve_pretrained(pretrained))


def policy_config(cfg: ExperimentConfig, device: torch.device) -> Any:
    """The lerobot SmolVLAConfig for this experiment (tiny, or a pretrained one with our overrides)."""
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    m = cfg.model
    if m.pretrained == TINY:
        pc = SmolVLAConfig(
            vlm_model_name=ensure_tiny_vlm(),
            load_vlm_weights=False,
            resize_imgs_with_padding=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
            num_vlm_layers=4,
        )
    else:
        pretrained = resolve_pretrained(m.pretrained)
        pc = _load_pretrained_config(pretrained)
        pc.pretrained_path = pretrained
    pc.device = device.type if device.index is None else str(device)
    pc.chunk_size, pc.n_action_steps, pc.num_steps = m.chunk_size, m.n_action_steps, m.num_denoise_steps
    pc.freeze_vision_encoder, pc.train_expert_only = m.freeze_vision_encoder, m.train_expert_only
    pc.train_state_proj = m.train_state_proj
    t = cfg.train
    if t.lr is not None:
        pc.optimizer_lr = t.lr
    if t.warmup_steps is not None:
        pc.scheduler_warmup_steps = t.warmup_steps
    if t.grad_clip_norm is not None:
        pc.optimizer_grad_clip_norm = t.grad_clip_norm
    return pc


def build_policy(cfg: ExperimentConfig, ds_meta: Any, stats: dict) -> PolicyBundle:
    """Policy + processors with the federation's normalization stats; features from the dataset."""
    from lerobot.configs.types import FeatureType
    from lerobot.policies.factory import make_policy, make_pre_post_processors
    from lerobot.processor import RenameObservationsProcessorStep
    from lerobot.utils.feature_utils import dataset_to_policy_features

    from zk0lib.env import use_offline_hub_if_possible

    use_offline_hub_if_possible(cfg)
    device = resolve_device(cfg.model.device)
    pc = policy_config(cfg, device)
    rename = dict(cfg.data.rename_map)
    features = {rename.get(k, k): v for k, v in dataset_to_policy_features(ds_meta.features).items()}
    if cfg.model.pretrained == TINY:
        # SmolVLA reads the state and the cameras; privileged environment state (sim recordings) is for
        # reference policies, so it is left out of what the policy expects and normalizes
        pc.input_features = {k: f for k, f in features.items() if f.type not in (FeatureType.ACTION, FeatureType.ENV)}
        torch.manual_seed(cfg.model.init_seed)
    else:
        _check_cameras(pc, features, cfg)
    if cfg.model.environment_state:
        _read_environment_state(pc, features)
    try:
        policy = make_policy(pc, ds_meta=ds_meta, rename_map=rename or None)
    except (OSError, ValueError) as e:
        if "offline" in str(e).lower() or "not found" in str(e).lower() or "connect" in str(e).lower():
            raise ModelNotAvailableError(_missing_model_message(cfg.model.pretrained, e)) from e
        raise
    if cfg.model.freeze_connector:
        for param in policy.model.vlm_with_expert.get_vlm_model().connector.parameters():
            param.requires_grad = False
    if cfg.train.aux_environment_state > 0:  # rung 2: the prefix must locate the cube (zk0lib/auxiliary.py)
        from zk0lib import auxiliary

        w, seed = cfg.train.aux_environment_state, cfg.model.init_seed
        if cfg.model.estimate_environment_state != "none":
            from lerobot.utils.constants import OBS_STATE

            state_size = pc.input_features[OBS_STATE].shape[0]
            kind = cfg.model.estimate_environment_state
            if cfg.model.pretrained == TINY or auxiliary.load_estimator(policy, pc.pretrained_path, w, kind) is None:
                if cfg.model.freeze_estimator:
                    raise ValueError(
                        f"model.freeze_estimator keeps a pretrained state estimator fixed, and model.pretrained="
                        f"{cfg.model.pretrained} has none: make one (zk0 estimator --base <policy folder> --out "
                        "<folder>) and set model.pretrained to that folder, or set model.freeze_estimator=false"
                    )
                auxiliary.attach_estimator(policy, stats, w, seed, state_size, kind, cfg.model.estimator_reads_task)
            head = auxiliary.estimator_of(policy)
            if cfg.model.estimator_reads_task and not head.shape.get("task_width"):
                raise ValueError(
                    f"model.estimator_reads_task: the estimator model.pretrained={cfg.model.pretrained} holds does "
                    "not read the task (make one that does: zk0 estimator --set reads_task=true)"
                )
            head.teacher_forcing = cfg.train.teacher_forcing
            if cfg.model.freeze_estimator:  # the shared estimate: neither trained nor sent
                head.freeze()
        else:
            auxiliary.attach(policy, stats, w, seed)
    if cfg.model.peft.method == "lora":
        policy = wrap_with_lora(policy, cfg.model.peft, cfg.model.init_seed)
    fp32_master_weights(policy)  # after LoRA: only what trains in the end is made fp32
    norm_features = {**pc.input_features, **pc.output_features}
    check_stats_cover(norm_features, pc.normalization_mapping, stats)
    if cfg.model.pretrained == TINY:
        pre, post = make_pre_post_processors(pc, dataset_stats=stats)
        for step in pre.steps:
            if isinstance(step, RenameObservationsProcessorStep):
                step.rename_map = rename
    else:
        pre, post = make_pre_post_processors(
            pc,
            pretrained_path=pc.pretrained_path,
            preprocessor_overrides={
                "device_processor": {"device": pc.device},
                "rename_observations_processor": {"rename_map": rename},
                "normalizer_processor": {
                    "stats": stats,
                    "features": norm_features,
                    "norm_map": pc.normalization_mapping,
                },
            },
            postprocessor_overrides={
                "unnormalizer_processor": {
                    "stats": stats,
                    "features": pc.output_features,
                    "norm_map": pc.normalization_mapping,
                },
            },
        )
    if cfg.model.environment_state:
        from lerobot.processor import NormalizerProcessorStep

        from zk0lib.steps import EnvironmentStateIntoState

        at = next(i for i, s in enumerate(pre.steps) if isinstance(s, NormalizerProcessorStep))
        pre.steps.insert(at + 1, EnvironmentStateIntoState())
    from zk0lib.cache import tokenize_tasks_once

    tokenize_tasks_once(pre)  # the same tokens, computed once per task instead of at every batch
    return PolicyBundle(policy=policy, preprocessor=pre, postprocessor=post, device=device)


def check_stats_cover(features: dict[str, Any], norm_map: dict[Any, Any], stats: dict[str, dict[str, Any]]) -> None:
    """Every policy input and output that lerobot normalizes must have the stats its mode reads: lerobot's
    normalizer passes a feature without them through raw (an arm that wobbles), so it is an error here,
    before round 1, naming the key."""
    from lerobot.configs.types import NormalizationMode

    reads = {
        NormalizationMode.MEAN_STD: ("mean", "std"),
        NormalizationMode.MIN_MAX: ("min", "max"),
        NormalizationMode.QUANTILES: ("q01", "q99"),
        NormalizationMode.QUANTILE10: ("q10", "q90"),
    }
    problems = []
    for key, feature in features.items():
        kind = getattr(feature.type, "value", feature.type)
        mode = NormalizationMode(norm_map.get(kind, norm_map.get(feature.type, NormalizationMode.IDENTITY)))
        lacking = [s for s in reads.get(mode, ()) if s not in stats.get(key, {})]
        if lacking:
            problems.append(f"{key} ({kind}, {mode.value}: no {'/'.join(lacking)})")
    if problems:
        raise ValueError(
            f"the normalization stats lack what the policy normalizes: {'; '.join(problems)}. The stats have "
            f"{sorted(stats)}: map a dataset key that differs from the policy's with data.rename_map, or give the "
            "datasets the feature (with its stats)"
        )


def fp32_master_weights(policy: torch.nn.Module) -> None:
    """Make every trainable parameter fp32 (the frozen ones keep their dtype).

    With `load_vlm_weights`, lerobot loads the VLM in bf16 and builds the action expert from a copy of its
    config, so the expert comes out bf16 too; an optimizer step on bf16 weights rounds away any update
    below the weight's bf16 spacing (1/256 of it), which is most of a 1e-4 step. lerobot casts each
    layer's input to that layer's weight dtype, so a mixed model runs; on CUDA the compute goes under bf16
    autocast (train.amp), the weights the optimizer updates and that travel stay fp32."""
    for param in policy.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _read_environment_state(pc: Any, features: dict) -> None:
    """model.environment_state: the policy takes the dataset's environment state as an input, normalized
    (mean/std) and appended to its state by zk0lib.steps (SmolVLA pads the state to max_state_dim)."""
    from lerobot.configs.types import FeatureType, NormalizationMode
    from lerobot.utils.constants import OBS_ENV_STATE, OBS_STATE

    env = features.get(OBS_ENV_STATE)
    if env is None:
        raise ValueError(
            f"model.environment_state=true needs {OBS_ENV_STATE} in every dataset, and this one has "
            f"{sorted(features)}: only sim recordings carry it (`zk0 sim record`, recorder version >= 2); "
            "set model.environment_state=false for camera datasets"
        )
    size = pc.input_features[OBS_STATE].shape[0] + env.shape[0]
    if size > pc.max_state_dim:
        raise ValueError(
            f"model.environment_state: the state with the environment state has {size} numbers, more than the "
            f"policy's max_state_dim={pc.max_state_dim}"
        )
    pc.input_features = {**pc.input_features, OBS_ENV_STATE: env}
    pc.normalization_mapping = {**pc.normalization_mapping, FeatureType.ENV.value: NormalizationMode.MEAN_STD}


def _check_cameras(pc: Any, features: dict, cfg: ExperimentConfig) -> None:
    from lerobot.configs.types import FeatureType

    expected = {k for k, f in pc.input_features.items() if f.type is FeatureType.VISUAL}
    provided = {k for k, f in features.items() if f.type is FeatureType.VISUAL}
    if expected and not (expected & provided):
        raise ValueError(
            f"the policy {cfg.model.pretrained!r} expects cameras {sorted(expected)} but the dataset provides "
            f"{sorted(provided)} (after data.rename_map={cfg.data.rename_map}). Map the dataset's camera keys to "
            "the policy's with data.rename_map, e.g. "
            '--set \'data.rename_map={"observation.images.top": "observation.images.camera1"}\''
        )


# ----------------------------------------------------------------------------- LoRA


def wrap_with_lora(policy: Any, s: Any, seed: int = 0) -> Any:
    """The policy with LoRA adapters (lerobot's `wrap_with_peft`) as `s` (model.peft) says: every
    pretrained weight frozen, the adapters (and full_training_modules) trainable. Seeded (model.init_seed),
    so the server and every client start from the same adapters."""
    overrides = {
        "method_type": "lora",
        "r": s.r,
        "lora_alpha": s.alpha,
        "target_modules": s.target_modules,
        "full_training_modules": list(s.full_training_modules) or None,
    }
    # lerobot warns of training "from scratch" when load_vlm_weights is off; a policy folder brings its VLM
    # weights with it, so the flag is raised while wrapping only.
    load_vlm = policy.config.load_vlm_weights
    policy.config.load_vlm_weights = True
    torch.manual_seed(seed)
    try:
        return policy.wrap_with_peft(peft_cli_overrides=overrides)
    finally:
        policy.config.load_vlm_weights = load_vlm


def is_peft(policy: Any) -> bool:
    from peft import PeftModel

    return isinstance(policy, PeftModel)


def merged_policy(policy: Any) -> Any:
    """A plain lerobot policy with the adapters merged into the pretrained weights (the PEFT model itself
    is left as it is)."""
    merged = copy.deepcopy(policy).merge_and_unload()
    merged.config.use_peft = False
    return merged


# ----------------------------------------------------------------------------- trainable weights


def trainable_parameters(policy: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that train and travel (lerobot's freeze_vision_encoder / train_expert_only)."""
    return [(n, p) for n, p in policy.named_parameters() if p.requires_grad]


def get_trainable(policy: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Detached fp32 CPU copies of the trainable parameters, in a fixed order."""
    return OrderedDict((n, p.detach().to("cpu", torch.float32).clone()) for n, p in trainable_parameters(policy))


@torch.no_grad()
def set_trainable(policy: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(trainable_parameters(policy))
    missing, unexpected = set(params) - set(weights), set(weights) - set(params)
    if missing or unexpected:
        raise ValueError(
            f"trainable weights do not match the policy: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}); are both sides using the same "
            "model.pretrained and freeze settings?"
        )
    for name, param in params.items():
        value = weights[name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"weight {name}: shape {tuple(value.shape)} != policy's {tuple(param.shape)}")
        param.copy_(value.to(param.device, param.dtype))


def frozen_fingerprint(policy: torch.nn.Module) -> str:
    """A hash of every frozen parameter: server and clients must share the same frozen backbone."""
    digest = hashlib.blake2b(digest_size=12)
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parameter_counts(policy: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for _, p in trainable_parameters(policy))
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def save_policy(bundle: PolicyBundle, path: Path) -> None:
    """A lerobot policy folder (config, weights, processors), written to a temp folder then renamed. A LoRA
    policy is saved merged (what `SmolVLAPolicy.from_pretrained` loads) with its adapter in PEFT's format
    under `adapter/` (adapter_config.json names the pretrained policy it adapts)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_peft(bundle.policy):
        merged_policy(bundle.policy).save_pretrained(tmp)
        bundle.policy.save_pretrained(tmp / ADAPTER_DIR)
    else:
        from zk0lib import auxiliary

        with auxiliary.head_set_aside(bundle.policy):  # a training-only head: not saved
            bundle.policy.save_pretrained(tmp)
        auxiliary.save_estimator(bundle.policy, tmp)  # a state estimator is part of the policy: saved beside it
    bundle.preprocessor.save_pretrained(tmp)
    bundle.postprocessor.save_pretrained(tmp)
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_policy(path: str | Path, device: str = "cpu") -> PolicyBundle:
    """Reload a saved policy folder with lerobot (installing the tiny VLM first if it is named)."""
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    import zk0lib.steps  # noqa: F401  (registers zk0's processor steps, which a saved preprocessor may name)

    path = Path(path)
    _install_tiny_vlm_if_named(path)
    policy = SmolVLAPolicy.from_pretrained(path)
    dev = resolve_device(device)
    policy.to(dev)
    from zk0lib import auxiliary

    auxiliary.load_estimator(policy, path)  # model.estimate_environment_state: the policy's own estimator
    pre, post = make_pre_post_processors(
        policy.config, pretrained_path=str(path), preprocessor_overrides={"device_processor": {"device": dev.type}}
    )
    return PolicyBundle(policy=policy, preprocessor=pre, postprocessor=post, device=dev)


def smolvla_base_policy(device: str = "meta") -> Any:
    """A policy with `lerobot/smolvla_base`'s architecture and random weights, offline.

    SmolVLAConfig's defaults (those smolvla_base was trained with) on a VLM config with SmolVLM2-500M's
    published dimensions, three 256x256 cameras and 6 joints. On the meta device nothing is allocated.
    """
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    with tempfile.TemporaryDirectory() as tmp:
        smolvlm2_500m_folder(Path(tmp))
        pc = SmolVLAConfig(vlm_model_name=tmp, load_vlm_weights=False, device="cpu" if device == "meta" else device)
        pc.input_features = {
            "observation.state": PolicyFeature(FeatureType.STATE, (6,)),
            **{f"observation.images.camera{i}": PolicyFeature(FeatureType.VISUAL, (3, 256, 256)) for i in (1, 2, 3)},
        }
        pc.output_features = {"action": PolicyFeature(FeatureType.ACTION, (6,))}
        with torch.device(device):
            return SmolVLAPolicy(pc)


def payload_sizes(policy: torch.nn.Module) -> dict[str, Any]:
    """Bytes one client sends per round: the whole fp32 state dict (what the original zk0 sent) against
    the trainable parameters only, as fp32 and as bf16."""
    counts = parameter_counts(policy)
    state_dict_bytes = sum(t.numel() * 4 for t in policy.state_dict().values())
    sizes = {
        "full_state_dict_fp32": state_dict_bytes,
        "trainable_fp32": counts["trainable"] * 4,
        "trainable_bf16": counts["trainable"] * 2,
    }
    return {
        "parameters": counts,
        "bytes_per_round": sizes,
        "mib_per_round": {k: round(v / 2**20, 3) for k, v in sizes.items()},
        "trainable_bf16_share_of_full": round(sizes["trainable_bf16"] / state_dict_bytes, 4),
    }


def smolvla_base_sizes(lora_r: int | None = None) -> dict[str, Any]:
    """Parameters and bytes per client per round of `lerobot/smolvla_base`, built on the meta device;
    with `lora_r`, of LoRA adapters of that rank on SmolVLA's default targets (the share is then of the
    pretrained policy's own fp32 state dict)."""
    from zk0lib.config import PeftSettings

    policy = smolvla_base_policy("meta")
    if not lora_r:
        return payload_sizes(policy)
    full = sum(t.numel() * 4 for t in policy.state_dict().values())
    policy.config.pretrained_path = "lerobot/smolvla_base"  # what the adapters adapt; nothing is loaded
    sizes = payload_sizes(wrap_with_lora(policy, PeftSettings(method="lora", r=lora_r)))
    sizes["bytes_per_round"]["full_state_dict_fp32"] = full
    sizes["mib_per_round"]["full_state_dict_fp32"] = round(full / 2**20, 3)
    sizes["trainable_bf16_share_of_full"] = round(sizes["bytes_per_round"]["trainable_bf16"] / full, 5)
    sizes["trainable_fp32_share_of_full"] = round(sizes["bytes_per_round"]["trainable_fp32"] / full, 5)
    return sizes
