"""One typed experiment config, its presets, dotted overrides and validation.

The same dotted names (`fl.num_rounds`, `train.local_steps`, ...) are used by the CLI's `--set`,
the notebooks' papermill `overrides` parameter and the Flower app's `set` run-config value.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")
WEIGHTINGS = ("frames", "uniform")  # how client updates are weighted in the mean (see FLConfig.weighting)
TRANSPORT_DTYPES = ("float32", "bfloat16")
SOURCES = ("hub", "local", "synthetic", "sim")
EVAL_WHERE = ("server", "clients")
TINY = "tiny"
BASE_DIR_ENV = "ZK0_BASE_DIR"
BASE = "base"  # the tiny base shipped in zk0lib/assets/tiny-base (`zk0 base` remakes it)
SHIPPED_BASE = Path(__file__).resolve().parent / "assets" / "tiny-base"
FAULT_MODES = ("raise", "exit", "hang", "nan", "shape")
FAULTS_ENV = "ZK0_ENABLE_FAULT_INJECTION"


class _Problems(list):
    """Problems found in a config, each naming its key and what would be valid."""

    def need(self, condition: bool, message: str) -> None:
        if not condition:
            self.append(message)


class ConfigError(ValueError):
    """A config value is wrong; the message lists every problem with its dotted key."""


CACHES = ("none", "frames", "features")


@dataclass
class ClientConfig:
    """One robot owner's dataset; each client of the federation trains on exactly one."""

    name: str
    repo_id: str = ""
    source: str = "hub"  # hub: Hub id (cached under HF_LEROBOT_HOME); local: `root`; synthetic: generated
    root: str | None = None  # dataset folder for source=local (or to read a Hub dataset from a copy)
    episodes: int | None = None  # use only the first N episodes (None: all)
    heldout_episodes: int | None = None  # None: data.heldout_episodes
    variant: int = 0  # scene variation of a synthetic client
    lab: str = ""  # simulated lab (source=sim), e.g. lab-red: recorded by the scripted expert on first use
    # this owner's camera keys -> the federation's, before data.rename_map maps those onto the policy's: the
    # client reads a copy of its dataset with the cameras renamed (convert.renamed_copy; hard links)
    rename_map: dict[str, str] = field(default_factory=dict)


@dataclass
class DataConfig:
    clients: list[ClientConfig] = field(default_factory=list)
    eval_only: list[ClientConfig] = field(default_factory=list)  # evaluated by the server, never trained on
    heldout_episodes: int = 2  # per client, kept out of training for evaluation
    # per client, kept out of training and out of every reported number: only choosing the best round
    # (checkpoints/best) looks at them, so the held-out (test) episodes judge a choice they did not make
    val_episodes: int = 1
    split_seed: int = 0  # which episodes are held out
    rename_map: dict[str, str] = field(default_factory=dict)  # dataset camera key -> policy camera key
    video_backend: str | None = None  # None: lerobot's default (torchcodec)
    # what training computes once (cache.py): none; frames: every video frame decoded once into a uint8
    # store under data_cache/frames (H*W*3 bytes per frame and camera), items assembled in memory;
    # features: also each frame's embedding by the frozen vision encoder and connector, in place of pixels.
    # Both pay off once training sees more samples than its datasets have frames.
    cache: str = "none"
    synthetic_episodes: int = 8
    synthetic_frames: int = 45
    synthetic_image_size: int = 64
    sim_episodes: int = 20  # expert demonstrations recorded per simulated lab
    sim_image_size: int = 128  # camera frames of the simulated labs (square)
    sim_noise_deg: float = 0.0  # execution noise while recording simulated labs (see sim.env.run_expert_episode)
    record_workers: int = 0  # processes simulating episodes while recording (0: as many as pay)
    validate: str = "sample"  # before training: full (decode every frame), sample, or off
    validate_fraction: float = 0.1  # share of each episode's frames decoded in sample mode
    repair: bool = False  # train on a repaired copy (under data_cache/repaired) of datasets with errors
    allow_invalid: bool = False  # train despite validation errors (they are still printed and recorded)

    def problems(self, cfg: ExperimentConfig) -> list[str]:
        """What is wrong with the data section (each with its key)."""
        p = _Problems()
        d = self
        p.need(len(d.clients) >= 1, "data.clients: at least one client dataset is needed")
        names = [c.name for c in d.clients]
        p.need(len(set(names)) == len(names), f"data.clients: client names must be unique, got {names}")
        p.need(d.heldout_episodes >= 0, f"data.heldout_episodes must be >= 0 (got {d.heldout_episodes})")
        p.need(d.val_episodes >= 0, f"data.val_episodes must be >= 0 (got {d.val_episodes})")
        p.need(d.synthetic_episodes >= 1, f"data.synthetic_episodes must be >= 1 (got {d.synthetic_episodes})")
        p.need(d.synthetic_frames >= 2, f"data.synthetic_frames must be >= 2 (got {d.synthetic_frames})")
        p.need(d.synthetic_image_size >= 16, f"data.synthetic_image_size must be >= 16 (got {d.synthetic_image_size})")
        p.need(d.cache in CACHES, f"data.cache must be one of {', '.join(CACHES)} (got {d.cache!r})")
        p.need(
            d.cache != "features"
            or (cfg.model.freeze_vision_encoder and (cfg.model.train_expert_only or cfg.model.freeze_connector)),
            "data.cache=features needs the vision path frozen (model.freeze_vision_encoder true, and "
            "model.train_expert_only or model.freeze_connector true); use data.cache=frames",
        )
        p.need(
            d.video_backend in (None, "torchcodec", "pyav"),
            f"data.video_backend: torchcodec or pyav, got {d.video_backend!r}",
        )
        extra = [c.name for c in d.eval_only]
        p.need(
            not set(extra) & set(names) and len(set(extra)) == len(extra),
            f"data.eval_only: names must be unique and differ from the clients', got {extra}",
        )
        for i, c in enumerate(d.eval_only):
            key = f"data.eval_only.{i}"
            _check_source(c, key, p.need)
            p.need(c.episodes is None or c.episodes >= 1, f"{key}.episodes must be >= 1 (got {c.episodes})")
        for i, c in enumerate(d.clients):
            key = f"data.clients.{i}"
            _check_source(c, key, p.need)
            heldout = cfg.heldout_for(c)
            p.need(heldout >= 0, f"{key}.heldout_episodes must be >= 0 (got {heldout})")
            kept = heldout + max(0, d.val_episodes)
            what = f"held-out ({heldout}) and validation ({d.val_episodes}) episodes"
            if c.episodes is not None:
                p.need(c.episodes >= 1, f"{key}.episodes must be >= 1 (got {c.episodes})")
                p.need(kept < c.episodes, f"{key}: {what} must be fewer than episodes used ({c.episodes})")
            if c.source == "sim":
                p.need(kept < d.sim_episodes, f"{key}: {what} must be fewer than data.sim_episodes ({d.sim_episodes})")
            if c.source == "synthetic":
                p.need(
                    kept < d.synthetic_episodes,
                    f"{key}: {what} must be fewer than data.synthetic_episodes ({d.synthetic_episodes})",
                )
        p.need(d.sim_episodes >= 1, f"data.sim_episodes must be >= 1 (got {d.sim_episodes})")
        p.need(d.sim_image_size >= 32, f"data.sim_image_size must be >= 32 (got {d.sim_image_size})")
        p.need(d.sim_noise_deg >= 0, f"data.sim_noise_deg must be >= 0 (got {d.sim_noise_deg})")
        p.need(d.record_workers >= 0, f"data.record_workers must be >= 0, 0 for automatic (got {d.record_workers})")
        p.need(d.validate in ("full", "sample", "off"), f"data.validate: full, sample or off, got {d.validate!r}")
        p.need(0 < d.validate_fraction <= 1, f"data.validate_fraction must be in (0, 1] (got {d.validate_fraction})")
        return p


@dataclass
class PeftSettings:
    """Parameter-efficient fine-tuning through lerobot's `wrap_with_peft` and the `peft` package: only the
    adapters (and any full-training modules) train, travel and aggregate; the pretrained weights stay."""

    method: str = "none"  # none: fine-tune the trainable modules themselves; lora: LoRA adapters on them
    r: int = 16  # adapter rank
    alpha: int | None = None  # LoRA scaling alpha/r; None: peft's default (8)
    target_modules: str | None = (
        None  # a regex or module-name suffix; None: SmolVLA's default (expert q/v + projections)
    )
    full_training_modules: list[str] = field(
        default_factory=list
    )  # trained whole beside the adapters (peft's modules_to_save)


@dataclass
class ModelConfig:
    pretrained: str = TINY  # "tiny" (random weights), "base" (the shipped tiny base), a Hub id or a policy folder
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    chunk_size: int = 50
    n_action_steps: int = 50
    num_denoise_steps: int = 10
    freeze_vision_encoder: bool = True
    train_expert_only: bool = True
    # with train_expert_only off, lerobot trains the connector and the VLM layers; freeze_connector keeps the
    # connector (the vision path's last module) frozen too, so the VLM layers learn to read the image features
    # while those features stay cacheable (data.cache=features)
    freeze_connector: bool = False
    train_state_proj: bool = True
    init_seed: int = 0  # random init of the tiny model (identical in every process)
    # "told the answer" (the closed-loop ladder's rung 1): the recording's observation.environment_state
    # (cube and target positions, sim datasets only), normalized and appended to the state SmolVLA reads
    environment_state: bool = False
    # rung 2's state estimator (zk0lib/auxiliary.py): a keypoint readout estimates the cube and target
    # positions and fills the state slots rung 1 filled with the recorded ones; it learns from the recording's
    # environment state with weight train.aux_environment_state and is saved with the policy. none | tokens
    # (from the frozen vision path's camera tokens) | pixels (its own small CNN on the camera frames at 64x64)
    estimate_environment_state: str = "none"
    # a pretrained estimator (model.pretrained holds one: `zk0 estimator`) kept fixed: every owner's action
    # expert reads the same estimates, and the estimator's weights neither train nor travel
    freeze_estimator: bool = False
    # the pixel estimator reads the instruction as well as the cameras (FiLM from the task tokens' mean embedding):
    # at the first frame only the instruction says which coloured thing on the table is the cube
    estimator_reads_task: bool = False
    peft: PeftSettings = field(default_factory=PeftSettings)

    def problems(self, cfg: ExperimentConfig) -> list[str]:
        """What is wrong with the model section."""
        p = _Problems()
        m = self
        p.need(bool(m.pretrained), "model.pretrained: 'tiny', a Hub id or a local policy folder")
        p.need(
            m.device == "auto" or m.device == "cpu" or m.device.startswith("cuda"),
            f"model.device: auto, cpu or cuda[:N], got {m.device!r}",
        )
        p.need(m.chunk_size >= 1, f"model.chunk_size must be >= 1 (got {m.chunk_size})")
        p.need(
            1 <= m.n_action_steps <= m.chunk_size,
            f"model.n_action_steps must be in [1, chunk_size={m.chunk_size}] (got {m.n_action_steps})",
        )
        p.need(m.num_denoise_steps >= 1, f"model.num_denoise_steps must be >= 1 (got {m.num_denoise_steps})")
        p.need(m.peft.method in ("none", "lora"), f"model.peft.method: none or lora, got {m.peft.method!r}")
        p.need(
            m.estimate_environment_state in ESTIMATORS,
            f"model.estimate_environment_state: one of {', '.join(ESTIMATORS)}, got {m.estimate_environment_state!r}",
        )
        p.need(
            not m.freeze_estimator or m.estimate_environment_state != "none",
            "model.freeze_estimator keeps a pretrained state estimator fixed: it needs "
            "model.estimate_environment_state=pixels or tokens (the kind model.pretrained holds)",
        )
        p.need(
            not m.estimator_reads_task or m.estimate_environment_state == "pixels",
            "model.estimator_reads_task: the pixel estimator reads the task; set model.estimate_environment_state=pixels",
        )
        if m.peft.method != "none":
            p.need(m.peft.r >= 1, f"model.peft.r must be >= 1 (got {m.peft.r})")
            p.need(m.peft.alpha is None or m.peft.alpha >= 1, f"model.peft.alpha must be >= 1 (got {m.peft.alpha})")
            p.need(
                m.pretrained != TINY,
                "model.peft.method=lora adapts a pretrained policy: set model.pretrained to base (the shipped tiny "
                "base), a Hub id such as lerobot/smolvla_base, or a policy folder, not 'tiny' (random weights)",
            )
        return p


ESTIMATORS = ("none", "tokens", "pixels")


@dataclass
class TrainConfig:
    local_steps: int = 20  # optimizer steps per client per round
    batch_size: int = 8
    lr: float | None = None  # None: the policy's preset (SmolVLA: 1e-4)
    warmup_steps: int | None = None  # None: preset, scaled to the run's total steps by lerobot
    grad_clip_norm: float | None = None  # None: preset (SmolVLA: 10)
    num_workers: int = 2
    amp: bool = True  # bf16 autocast, CUDA only
    max_skipped_fraction: float = 0.2  # undecodable batches tolerated before a client fails
    progress_every_s: float = 60.0  # a progress line about this often inside a long round (0: every step)
    # weight of an auxiliary loss (zk0lib/auxiliary.py): a head on the VLM's prefix output predicts the sim
    # recording's environment state (cube and target positions), a training target only; 0: off
    aux_environment_state: float = 0.0
    # with model.estimate_environment_state: the fraction of training samples whose action expert reads the
    # recording's positions instead of the estimator's (teacher forcing; 1: the expert learns as rung 1 did,
    # told the answer, and reads the estimate only at inference). 0: always the estimate
    teacher_forcing: float = 0.0

    def problems(self, cfg: ExperimentConfig) -> list[str]:
        """What is wrong with the train section."""
        p = _Problems()
        t = self
        p.need(t.local_steps >= 1, f"train.local_steps must be >= 1 (got {t.local_steps})")
        p.need(t.batch_size >= 1, f"train.batch_size must be >= 1 (got {t.batch_size})")
        p.need(t.lr is None or t.lr > 0, f"train.lr must be > 0 (got {t.lr})")
        p.need(t.warmup_steps is None or t.warmup_steps >= 0, f"train.warmup_steps must be >= 0 (got {t.warmup_steps})")
        p.need(
            t.grad_clip_norm is None or t.grad_clip_norm > 0,
            f"train.grad_clip_norm must be > 0 (got {t.grad_clip_norm})",
        )
        p.need(t.num_workers >= 0, f"train.num_workers must be >= 0 (got {t.num_workers})")
        p.need(
            t.aux_environment_state >= 0, f"train.aux_environment_state must be >= 0 (got {t.aux_environment_state})"
        )
        p.need(0 <= t.teacher_forcing <= 1, f"train.teacher_forcing must be in [0, 1] (got {t.teacher_forcing})")
        p.need(
            t.teacher_forcing == 0 or cfg.model.estimate_environment_state != "none",
            "train.teacher_forcing replaces the state estimator's estimate in training: it needs "
            "model.estimate_environment_state=pixels or tokens",
        )
        if cfg.model.estimate_environment_state != "none":
            p.need(
                t.aux_environment_state > 0,
                "model.estimate_environment_state learns from the recording's environment state with weight "
                "train.aux_environment_state: set it > 0 (e.g. 1)",
            )
            p.need(
                not cfg.model.environment_state,
                "model.estimate_environment_state and model.environment_state both fill the state's environment "
                "slots: choose one (the estimate from the cameras, or the recorded answer)",
            )
        if t.aux_environment_state > 0:
            p.need(
                not cfg.model.train_expert_only or cfg.model.estimate_environment_state != "none",
                "train.aux_environment_state trains the VLM layers to locate the cube: set model.train_expert_only="
                "false (and model.freeze_connector=true to keep data.cache=features), or let a state estimator "
                "read the cameras (model.estimate_environment_state=pixels or tokens)",
            )
            p.need(cfg.model.peft.method == "none", "train.aux_environment_state: not with model.peft (LoRA)")
        p.need(t.progress_every_s >= 0, f"train.progress_every_s must be >= 0 seconds (got {t.progress_every_s})")
        p.need(
            0 <= t.max_skipped_fraction < 1,
            f"train.max_skipped_fraction must be in [0, 1) (got {t.max_skipped_fraction})",
        )
        return p


@dataclass
class FLConfig:
    strategy: str = "fedprox"
    num_rounds: int = 3
    proximal_mu: float = 0.01  # FedProx term weight: sent to clients by fedprox only (0 for the others)
    fraction_train: float = 1.0  # share of clients sampled to train each round (seeded, by partition id)
    fraction_evaluate: float = 1.0  # share of clients asked to evaluate when eval.where=clients
    min_train_clients: int = 0  # usable updates a round needs (0: every sampled client's)
    weighting: str = "frames"  # frames: a client's update weighs its training frames (FedAvg); uniform: equal
    min_evaluate_clients: int = 0
    min_available_clients: int = 0
    transport_dtype: str = "float32"
    server_lr: float | None = None  # server learning rate: fedadam/fedyogi's eta (None: 1e-3), fedavgm's (None: 1)
    server_momentum: float = 0.9  # fedavgm: the server's momentum on the mean update (Hsu et al. 2019)
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    round_timeout_s: float = 3600.0
    max_update_norm: float = 1000.0  # L2 norm of (client - global) trainable weights above which an update is rejected
    inject_failure: str = ""  # tests only (ZK0_ENABLE_FAULT_INJECTION=1): MODE:CLIENT@ROUND,... MODE in FAULT_MODES
    client_num_cpus: int = 2  # simulation resources per client
    client_num_gpus: float = 0.0

    @property
    def applied_mu(self) -> float:
        """The proximal weight clients train with: FedProx's mu, 0 for every other strategy."""
        return self.proximal_mu if self.strategy == "fedprox" else 0.0

    def sample_size(self, n_clients: int) -> int:
        """Clients sampled to train each round: Flower's max(int(n x fraction_train), min_train_nodes)."""
        return max(int(n_clients * self.fraction_train), self.min_train_clients or 1)

    def problems(self, cfg: ExperimentConfig) -> list[str]:
        """What is wrong with the fl section (client counts come from data)."""
        p = _Problems()
        f, d = self, cfg.data
        p.need(
            f.strategy in STRATEGIES, f"fl.strategy: unknown strategy {f.strategy!r} (choose {', '.join(STRATEGIES)})"
        )
        p.need(f.num_rounds >= 1, f"fl.num_rounds must be >= 1 (got {f.num_rounds})")
        p.need(f.proximal_mu >= 0, f"fl.proximal_mu must be >= 0 (got {f.proximal_mu})")
        for name in ("fraction_train", "fraction_evaluate"):
            v = getattr(f, name)
            p.need(0 <= v <= 1, f"fl.{name} must be in [0, 1] (got {v})")
        p.need(f.fraction_train > 0, "fl.fraction_train must be > 0: no client would train")
        p.need(f.weighting in WEIGHTINGS, f"fl.weighting: {' or '.join(WEIGHTINGS)}, got {f.weighting!r}")
        n = len(d.clients)
        for name in ("min_train_clients", "min_evaluate_clients", "min_available_clients"):
            v = getattr(f, name)
            p.need(0 <= v <= n, f"fl.{name} must be in [0, {n}] (0 = all {n} clients; got {v})")
        p.need(
            f.transport_dtype in TRANSPORT_DTYPES,
            f"fl.transport_dtype: {' or '.join(TRANSPORT_DTYPES)}, got {f.transport_dtype!r}",
        )
        p.need(f.server_lr is None or f.server_lr > 0, f"fl.server_lr must be > 0 (got {f.server_lr})")
        p.need(0 <= f.server_momentum < 1, f"fl.server_momentum must be in [0, 1) (got {f.server_momentum})")
        p.need(0 <= f.server_beta1 < 1 and 0 <= f.server_beta2 < 1, "fl.server_beta1/fl.server_beta2 must be in [0, 1)")
        p.need(f.server_tau > 0, f"fl.server_tau must be > 0 (got {f.server_tau})")
        p.need(f.round_timeout_s > 0, f"fl.round_timeout_s must be > 0 (got {f.round_timeout_s})")
        p.need(f.max_update_norm > 0, f"fl.max_update_norm must be > 0 (got {f.max_update_norm})")
        if f.inject_failure:
            try:
                faults = parse_faults(f.inject_failure)
                p.need(
                    all(partition_id < n and rnd <= f.num_rounds for _, partition_id, rnd in faults),
                    f"fl.inject_failure: client or round out of range in {f.inject_failure!r}",
                )
            except ValueError as problem:
                p.append(str(problem))
            p.need(
                os.environ.get(FAULTS_ENV) == "1",
                f"fl.inject_failure makes clients fail on purpose and is for tests only: set {FAULTS_ENV}=1 to allow it",
            )
        p.need(f.client_num_cpus >= 1, f"fl.client_num_cpus must be >= 1 (got {f.client_num_cpus})")
        p.need(f.client_num_gpus >= 0, f"fl.client_num_gpus must be >= 0 (got {f.client_num_gpus})")
        return p


PRIVACY_MODES = ("off", "server-clipping", "client-clipping")
PRIVACY_STATS = ("pretrained", "clients")
SECURE_AGGREGATION = ("off", "secaggplus")


@dataclass
class PrivacyConfig:
    """Client-level differential privacy through Flower's strategy wrappers (zk0lib/fl/privacy.py)."""

    # off; server-clipping: Flower's DifferentialPrivacyServerSideFixedClipping, each client's update clipped
    # to clipping_norm by the server, Gaussian noise of std noise_multiplier x clipping_norm / (clients
    # sampled) on the mean, epsilon counted by Flower's RDP accountant; client-clipping: the same with
    # DifferentialPrivacyClientSideFixedClipping, each client clipping its own update (Flower's
    # fixedclipping_mod) before it leaves. Flower's adaptive clipping is not offered: in flwr 1.41 it moves
    # the norm away from its target quantile (tests/test_aggregation.py shows it)
    mode: str = "off"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    target_delta: float = 1e-5  # the delta epsilon is reported at
    max_epsilon: float | None = None  # the run stops before a round that would pass it
    # the normalization stats are a release too: pretrained (the pretrained policy's own, from its
    # pretraining data; clients send none) or clients (the exact pooled stats: outside epsilon, recorded so)
    stats: str = "pretrained"
    # secure aggregation: off, or secaggplus (Flower's SecAgg+, zk0lib/fl/secagg.py: the server learns only the
    # weighted sum of the updates). Each sampled client shares its keys with secagg_shares of the others
    # (a fraction; 1: all), secagg_threshold of those shares rebuild a dropped client's masks, and its update
    # (local - global) is quantized within [-secagg_clipping_range, secagg_clipping_range]
    secure_aggregation: str = "off"
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.67
    secagg_clipping_range: float = 8.0

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def problems(self, cfg: ExperimentConfig) -> list[str]:
        """What is wrong with the privacy section."""
        p = _Problems()
        v = self
        p.need(
            v.mode != "adaptive",
            "privacy.mode=adaptive: Flower 1.41's adaptive clipping shrinks the norm when most updates are "
            "clipped (it should grow), so zk0 does not offer it; use server-clipping or client-clipping with a "
            "fixed clipping_norm",
        )
        p.need(
            v.mode in PRIVACY_MODES or v.mode == "adaptive",
            f"privacy.mode: one of {', '.join(PRIVACY_MODES)}, got {v.mode!r}",
        )
        p.need(
            v.secure_aggregation in SECURE_AGGREGATION,
            f"privacy.secure_aggregation: one of {', '.join(SECURE_AGGREGATION)}, got {v.secure_aggregation!r}",
        )
        if v.secure_aggregation != "off":
            p.need(0 < v.secagg_shares <= 1, f"privacy.secagg_shares must be in (0, 1] (got {v.secagg_shares})")
            p.need(
                0 < v.secagg_threshold <= 1, f"privacy.secagg_threshold must be in (0, 1] (got {v.secagg_threshold})"
            )
            p.need(
                v.secagg_clipping_range > 0,
                f"privacy.secagg_clipping_range must be > 0 (got {v.secagg_clipping_range})",
            )
            p.need(
                not v.on,
                f"privacy.secure_aggregation with privacy.mode={v.mode}: not combined yet (Flower's DP wrappers "
                "clip and noise the updates one by one, which the server no longer sees): use one of the two",
            )
            p.need(
                cfg.fl.transport_dtype == "float32",
                "privacy.secure_aggregation: SecAgg+ quantizes fp32 updates, not bf16 deltas: set "
                "fl.transport_dtype=float32",
            )
            n = len(cfg.data.clients)
            p.need(
                n == 0 or cfg.fl.sample_size(n) >= 2,
                f"privacy.secure_aggregation: SecAgg+ needs at least 2 clients a round, this config samples "
                f"{cfg.fl.sample_size(n) if n else 0} of {n}",
            )
        if not v.on:
            return p
        p.need(
            v.noise_multiplier > 0, f"privacy.noise_multiplier must be > 0 to count epsilon (got {v.noise_multiplier})"
        )
        p.need(v.clipping_norm > 0, f"privacy.clipping_norm must be > 0 (got {v.clipping_norm})")
        p.need(0 < v.target_delta < 1, f"privacy.target_delta must be in (0, 1) (got {v.target_delta})")
        p.need(v.max_epsilon is None or v.max_epsilon > 0, f"privacy.max_epsilon must be > 0 (got {v.max_epsilon})")
        p.need(v.stats in PRIVACY_STATS, f"privacy.stats: one of {', '.join(PRIVACY_STATS)}, got {v.stats!r}")
        if v.stats == "pretrained":
            p.need(
                cfg.model.pretrained != TINY,
                "privacy.stats=pretrained takes the normalization stats of model.pretrained, and model.pretrained="
                "tiny has none: use a pretrained policy (base, a Hub id, a folder) or privacy.stats=clients (the "
                "exact pooled stats, a release outside epsilon)",
            )
            p.need(
                not cfg.model.environment_state,
                "privacy.stats=pretrained: a pretrained policy has no stats for model.environment_state; use "
                "privacy.stats=clients",
            )
        # what Flower's accountant counts: a FedAvg mean of equally weighted updates
        p.need(
            cfg.fl.strategy in ("fedavg", "fedprox"),
            f"privacy.mode={v.mode}: Flower's accountant counts a FedAvg mean (fl.strategy fedavg or "
            f"fedprox), not fl.strategy={cfg.fl.strategy}",
        )
        p.need(
            cfg.fl.weighting == "uniform",
            f"privacy.mode={v.mode}: every client's update must weigh the same for the noise to cover "
            "it: set fl.weighting=uniform",
        )
        p.need(
            v.mode != "client-clipping" or cfg.fl.transport_dtype == "float32",
            "privacy.mode=client-clipping: Flower's fixedclipping_mod clips fp32 weights, not bf16 deltas: set "
            "fl.transport_dtype=float32 (or use server-clipping)",
        )
        return p


@dataclass
class EvalConfig:
    every: int = 1  # evaluate the global model every N rounds (and always after the last)
    where: str = "server"  # server: ServerApp reads the held-out episodes; clients: each client evaluates
    batch_size: int = 8
    max_frames: int | None = None  # held-out frames per client for the loss (None: all)
    action_frames: int = 16  # held-out frames per client whose action chunk is sampled
    seed: int = 0
    interval: str = "t"  # t: Student-t over episodes (stratified by client); bootstrap: percentile bootstrap
    bootstrap: int = 1000  # resamples of eval.interval=bootstrap
    rollout_episodes: int = 0  # closed-loop episodes per simulated lab (0: none)
    rollout_every: int = 0  # rounds between closed-loop evaluations (0: after the last round only)
    rollout_max_frames: int = 450  # 15 s at 30 fps
    rollout_videos: bool = False  # an mp4 per episode of the last closed-loop evaluation
    rollout_round0: bool = False  # closed loop before training too (the starting model, e.g. the base)

    def problems(self, cfg: ExperimentConfig) -> list[str]:
        """What is wrong with the eval section."""
        p = _Problems()
        e, d, f = self, cfg.data, cfg.fl
        p.need(e.every >= 1, f"eval.every must be >= 1 (got {e.every})")
        p.need(e.where in EVAL_WHERE, f"eval.where: {' or '.join(EVAL_WHERE)}, got {e.where!r}")
        p.need(e.batch_size >= 1, f"eval.batch_size must be >= 1 (got {e.batch_size})")
        p.need(e.max_frames is None or e.max_frames >= 1, f"eval.max_frames must be >= 1 or none (got {e.max_frames})")
        p.need(e.action_frames >= 0, f"eval.action_frames must be >= 0 (got {e.action_frames})")
        p.need(e.bootstrap >= 0, f"eval.bootstrap must be >= 0 (got {e.bootstrap})")
        p.need(e.interval in ("t", "bootstrap"), f"eval.interval: t or bootstrap, got {e.interval!r}")
        p.need(e.rollout_episodes >= 0, f"eval.rollout_episodes must be >= 0 (got {e.rollout_episodes})")
        p.need(e.rollout_every >= 0, f"eval.rollout_every must be >= 0 (got {e.rollout_every})")
        p.need(e.rollout_max_frames >= 1, f"eval.rollout_max_frames must be >= 1 (got {e.rollout_max_frames})")
        if e.rollout_episodes:
            p.need(
                any(c.source == "sim" for c in [*d.clients, *d.eval_only]),
                "eval.rollout_episodes > 0 needs simulated labs among data.clients or data.eval_only (source=sim)",
            )
        if e.where == "clients":
            p.need(f.fraction_evaluate > 0, "eval.where=clients needs fl.fraction_evaluate > 0")
        return p


@dataclass
class OutputConfig:
    runs_dir: str = "reports/runs"
    run_id: str = ""  # empty: <UTC time>-<preset>
    data_cache: str = "data_cache"
    save_checkpoints: bool = True
    wandb: bool = False  # log every round to Weights & Biases too
    wandb_project: str = "zk0"
    wandb_mode: str = "offline"  # offline (sync later with `wandb sync`) or online

    def problems(self, cfg: ExperimentConfig) -> list[str]:
        """What is wrong with the output section."""
        p = _Problems()
        p.need(
            self.wandb_mode in ("offline", "online"),
            f"output.wandb_mode: offline or online, got {self.wandb_mode!r}",
        )
        run_id = self.run_id
        p.need(
            not run_id or (run_id.replace("-", "").replace("_", "").replace(".", "").isalnum()),
            f"output.run_id may hold letters, digits, '-', '_' and '.' only (got {run_id!r})",
        )
        return p


@dataclass
class ExperimentConfig:
    preset: str = "smoke"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        return _build(cls, raw, "")

    @property
    def home(self) -> Path:
        return zk0_home()

    @property
    def cache_dir(self) -> Path:
        return _resolve(self.output.data_cache)

    @property
    def runs_dir(self) -> Path:
        return _resolve(self.output.runs_dir)

    def heldout_for(self, client: ClientConfig) -> int:
        return self.data.heldout_episodes if client.heldout_episodes is None else client.heldout_episodes


def zk0_home() -> Path:
    """Where data_cache/ and reports/ live: $ZK0_HOME, else the repo checkout, else the cwd."""
    if os.environ.get("ZK0_HOME"):
        return Path(os.environ["ZK0_HOME"]).expanduser().resolve()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "Makefile").exists() and (repo / "pyproject.toml").exists():
        return repo
    return Path.cwd().resolve()


def resolve_pretrained(name: str) -> str:
    """model.pretrained as lerobot loads it: "base" is the folder shipped with zk0lib, the rest as given.

    Flower runs the apps from a copy of the code (the FAB), which carries no weights: the processes zk0
    starts get the shipped folder's path in $ZK0_BASE_DIR (set it by hand on SuperNodes started by hand)."""
    if name == BASE:
        return os.environ.get(BASE_DIR_ENV) or str(SHIPPED_BASE)
    return name


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else zk0_home() / p


# ----------------------------------------------------------------------------- presets


def _synthetic_clients(n: int) -> list[ClientConfig]:
    return [
        ClientConfig(name=f"synth-{i}", repo_id=f"zk0/synthetic-{i}", source="synthetic", variant=i) for i in range(n)
    ]


def _unseen() -> list[ClientConfig]:
    """A scene variant no client trains on: how the federated model generalizes."""
    return [ClientConfig(name="unseen", repo_id="zk0/synthetic-unseen", source="synthetic", variant=3)]


def _smoke() -> ExperimentConfig:
    return ExperimentConfig(
        preset="smoke",
        data=DataConfig(
            clients=_synthetic_clients(2),
            eval_only=_unseen(),
            heldout_episodes=2,
            synthetic_episodes=6,
            synthetic_frames=30,
            synthetic_image_size=48,
        ),
        model=ModelConfig(pretrained=TINY, device="cpu", chunk_size=10, n_action_steps=10, num_denoise_steps=4),
        train=TrainConfig(local_steps=3, batch_size=4, lr=1e-3, num_workers=0),
        fl=FLConfig(strategy="fedprox", num_rounds=2, proximal_mu=0.01, client_num_cpus=2),
        eval=EvalConfig(batch_size=8, max_frames=32, action_frames=4, bootstrap=200),
    )


def _lab_clients(labs: tuple[str, ...]) -> list[ClientConfig]:
    return [ClientConfig(name=lab, source="sim", lab=lab) for lab in labs]


def _labs_from_base(preset: str, heldout: int, episodes: int, rounds: int, rollouts: int, **eval_kw: Any):
    """The four client labs and lab-unseen, fine-tuning the shipped base with the VLM frozen."""
    from zk0lib.sim.labs import CLIENT_LABS, UNSEEN_LAB

    return ExperimentConfig(
        preset=preset,
        data=DataConfig(
            clients=_lab_clients(CLIENT_LABS),
            eval_only=_lab_clients((UNSEEN_LAB,)),
            heldout_episodes=heldout,
            sim_episodes=episodes,
            sim_image_size=128,
        ),
        model=ModelConfig(pretrained=BASE, device="cpu", chunk_size=10, n_action_steps=10, num_denoise_steps=5),
        train=TrainConfig(local_steps=25, batch_size=8, lr=3e-4, warmup_steps=0, num_workers=1),
        fl=FLConfig(strategy="fedprox", num_rounds=rounds, proximal_mu=0.01, client_num_cpus=2),
        eval=EvalConfig(
            batch_size=16,
            max_frames=240,
            action_frames=12,
            bootstrap=1000,
            rollout_episodes=rollouts,
            rollout_max_frames=300,  # 10 s; the expert needs ~4.7 s
            **eval_kw,
        ),
    )


def _demo() -> ExperimentConfig:
    return _labs_from_base("demo", heldout=3, episodes=20, rounds=5, rollouts=5, rollout_round0=True)


def _study() -> ExperimentConfig:
    """The closed-loop study, at the recipe that made rung 2 of the ladder succeed from the cameras: 60
    demonstrations per lab, the pixel state estimator, cached image features, rung 2's 576,000 samples in all
    at batch 64, in 12 rounds of 188 local steps (3 rounds of 500 drifted apart: README, rung 2);
    20 closed-loop episodes per lab tell the strategies apart."""
    cfg = _labs_from_base("study", heldout=3, episodes=60, rounds=12, rollouts=20, every=3)
    cfg.data.cache = "features"
    cfg.model.estimate_environment_state = "pixels"
    cfg.train = TrainConfig(
        local_steps=188, batch_size=64, lr=1e-3, warmup_steps=100, grad_clip_norm=10, num_workers=1,
        aux_environment_state=1.0,
    )  # fmt: skip
    return cfg


def _community() -> ExperimentConfig:
    """The base's pretraining data as a federation: the 32 community labs (10 demonstrations each, one owner
    per lab), none with a client lab's task. Run centralized, it pretrains the action expert where no client's
    data is needed (`zk0 baseline centralized --preset community --set model.pretrained=<zk0 estimator folder>
    ...`); `zk0 sim variants --preset study --policy <its checkpoint>` then judges it in the client labs it never
    saw. The study's recipe otherwise (pixel estimator, cached features, batch 64, lr 1e-3), 9,024 steps."""
    from zk0lib.sim.labs import community_labs

    cfg = _study()
    cfg.preset = "community"
    cfg.data.clients = _lab_clients(tuple(lab.name for lab in community_labs(32, 0)))
    cfg.data.eval_only = []
    cfg.data.heldout_episodes, cfg.data.sim_episodes = 1, 10
    cfg.train.local_steps, cfg.fl.num_rounds = 94, 3  # 94 x 32 x 3 = 9,024 steps centralized
    cfg.eval.every, cfg.eval.rollout_episodes, cfg.eval.max_frames = 1, 0, 120
    return cfg


def _zk0_hub() -> ExperimentConfig:
    repos = [
        "lerobot/svla_so100_pickplace",
        "lerobot/svla_so100_stacking",
        "lerobot/svla_so100_sorting",
        "lerobot/svla_so101_pickplace",
    ]
    return ExperimentConfig(
        preset="zk0-hub",
        data=DataConfig(
            clients=[ClientConfig(name=r.split("/")[1], repo_id=r, source="hub") for r in repos],
            heldout_episodes=5,
            # smolvla_base reads camera1..3; the svla_so100_* datasets film top and wrist,
            # svla_so101_pickplace films up and side: each client's pair onto the same two slots
            rename_map={
                "observation.images.top": "observation.images.camera1",
                "observation.images.wrist": "observation.images.camera2",
                "observation.images.up": "observation.images.camera1",
                "observation.images.side": "observation.images.camera2",
            },
        ),
        model=ModelConfig(pretrained="lerobot/smolvla_base", device="cuda"),
        train=TrainConfig(local_steps=200, batch_size=64, lr=1e-4, num_workers=4),
        fl=FLConfig(strategy="fedprox", num_rounds=30, proximal_mu=0.01, client_num_cpus=4, client_num_gpus=0.25),
        eval=EvalConfig(every=5, batch_size=32, max_frames=2048, action_frames=64),
    )


PRESETS = {"smoke": _smoke, "demo": _demo, "study": _study, "community": _community, "zk0-hub": _zk0_hub}


# ----------------------------------------------------------------------------- overrides


def load_config(preset: str = "demo", overrides: dict[str, Any] | list[str] | str | None = None) -> ExperimentConfig:
    """Preset + dotted overrides -> a validated config (raises ConfigError listing every problem)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    for key, value in parse_overrides(overrides).items():
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


def spec_from_overrides(
    cls: type, overrides: list[str] | None, command: str, may_be_zero: tuple[str, ...], checks: Any = None
) -> Any:
    """A plain dataclass spec (`zk0 base`, `zk0 estimator`) from its defaults and `--set KEY=VALUE` overrides,
    refused with every problem at once: a numeric field must be > 0 (>= 0 when named in `may_be_zero`), held-out
    episodes fewer than the episodes per lab, and whatever `checks(spec)` lists."""
    spec = cls()
    hints = typing.get_type_hints(cls)
    for key, value in parse_overrides(overrides).items():
        if key not in hints:
            raise ConfigError(f"{command} --set {key}: unknown; KEY one of {', '.join(hints)}")
        setattr(spec, key, _convert(value, hints[key], key))
    problems = [
        f"{k} must be {'>= 0' if k in may_be_zero else '> 0'} (got {getattr(spec, k)})"
        for k in hints
        if hints[k] is not str and (getattr(spec, k) < 0 or (getattr(spec, k) == 0 and k not in may_be_zero))
    ]
    if spec.heldout_episodes >= spec.episodes_per_lab:
        problems.append("heldout_episodes must be fewer than episodes_per_lab")
    problems += checks(spec) if checks else []
    if problems:
        raise ConfigError(f"invalid {command} spec:\n  - " + "\n  - ".join(problems))
    return spec


def parse_overrides(overrides: dict[str, Any] | list[str] | str | None) -> dict[str, Any]:
    """Accept {"fl.num_rounds": 3}, ["fl.num_rounds=3"] or "fl.num_rounds=3 train.lr=1e-4"."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    items = overrides.split() if isinstance(overrides, str) else list(overrides)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (example: fl.num_rounds=3)")
        out[key.strip()] = value
    return out


def set_value(cfg: ExperimentConfig, key: str, value: Any) -> None:
    """Set a dotted key (`fl.num_rounds`, `data.clients.0.heldout_episodes`), converting strings by type."""
    if key == "preset":
        raise ConfigError("choose the preset with --preset (or the `preset` parameter), not as an override")
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        obj = _child(obj, part, ".".join(parts[: i + 1]), key)
    last = parts[-1]
    if isinstance(obj, list):
        idx = _index(obj, last, key)
        obj[idx] = _convert(value, ClientConfig, key)
        return
    hints = typing.get_type_hints(type(obj))
    if not dataclasses.is_dataclass(obj) or last not in hints:
        raise ConfigError(f"unknown config key {key!r}{_suggest(obj, last)}")
    setattr(obj, last, _convert(value, hints[last], key))


def _child(obj: Any, part: str, path: str, key: str) -> Any:
    if isinstance(obj, list):
        return obj[_index(obj, part, key)]
    if dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
        return getattr(obj, part)
    raise ConfigError(f"unknown config key {key!r}: no section {path!r}{_suggest(obj, part)}")


def _index(seq: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(seq):
        raise ConfigError(f"{key!r}: index {part!r} is not one of 0..{len(seq) - 1}")
    return int(part)


def _suggest(obj: Any, name: str) -> str:
    if not dataclasses.is_dataclass(obj):
        return ""
    names = [f.name for f in dataclasses.fields(obj)]
    return f" (known here: {', '.join(names)})"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (often a string from a CLI or run config) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return _convert(value, args[0], key)
    if isinstance(value, str) and (origin in (list, dict) or dataclasses.is_dataclass(tp)):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: expected JSON for a {_type_name(tp)}, got {value!r} ({e})") from None
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return copy.deepcopy(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        where = prefix or "config"
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


# ----------------------------------------------------------------------------- validation


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every value; raise one ConfigError that lists all problems with their keys."""
    errors = _Problems()
    errors.need(cfg.preset in PRESETS, f"preset: unknown preset {cfg.preset!r} (choose {', '.join(PRESETS)})")
    for section in (cfg.data, cfg.model, cfg.train, cfg.fl, cfg.eval, cfg.privacy, cfg.output):
        errors.extend(section.problems(cfg))
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return cfg


def parse_faults(text: str) -> list[tuple[str, int, int]]:
    """'raise:1@2,nan:0@1' -> [("raise", 1, 2), ("nan", 0, 1)]: (mode, partition id, round)."""
    out = []
    for item in text.split(","):
        mode, _, rest = item.strip().partition(":")
        partition, _, rnd = rest.partition("@")
        if mode not in FAULT_MODES or not partition.isdigit() or not rnd.isdigit():
            raise ValueError(
                f"fl.inject_failure: {item!r} is not MODE:CLIENT@ROUND (MODE one of {', '.join(FAULT_MODES)}), "
                "e.g. raise:1@2"
            )
        out.append((mode, int(partition), int(rnd)))
    return out


def _check_source(c: ClientConfig, key: str, need: Any) -> None:
    need(bool(c.name), f"{key}.name must not be empty")
    cameras = [*c.rename_map, *c.rename_map.values()]
    need(
        all(k.startswith("observation.images.") for k in cameras),
        f"{key}.rename_map: camera keys (observation.images.<name>) on both sides, got {c.rename_map}",
    )
    targets = list(c.rename_map.values())
    need(len(set(targets)) == len(targets), f"{key}.rename_map: two cameras renamed to one key: {c.rename_map}")
    need(c.source in SOURCES, f"{key}.source: unknown source {c.source!r} (choose {', '.join(SOURCES)})")
    if c.source == "hub":
        need(
            "/" in c.repo_id, f"{key}.repo_id: a Hub dataset id like 'lerobot/svla_so100_pickplace', got {c.repo_id!r}"
        )
    if c.source == "sim":
        from zk0lib.sim.labs import get_lab

        try:
            get_lab(c.lab)
        except KeyError as err:
            need(False, f"{key}.lab: {err.args[0]}")
    if c.source == "local":
        need(c.root is not None, f"{key}.root: a local dataset needs its folder (source=local)")
        if c.root is not None:
            root = _resolve(c.root)
            need(
                (root / "meta" / "info.json").exists(),
                f"{key}.root: no LeRobot dataset at {root} (missing meta/info.json)",
            )


def flat_items(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every leaf as a dotted key (lists and maps as JSON), for tables and config diffs."""
    out: dict[str, Any] = {}
    for section, value in cfg.to_dict().items():
        if not isinstance(value, dict):
            out[section] = value
            continue
        for k, v in value.items():
            out[f"{section}.{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
    return out
