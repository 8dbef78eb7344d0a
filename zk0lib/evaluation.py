"""Judging a policy the same way in every kind of run: the seeded held-out loss and action error with
their intervals, the held-out and eval-only sets, and closed-loop rollouts in the simulated labs.

Federated runs and the centralized and local-only baselines all evaluate through `HeldOutSets` and
`closed_loop` (and record through `book.RoundBook`), so 04 and the app put them side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from zk0lib import data, model, train
from zk0lib.config import ExperimentConfig


class HeldOutSets:
    """The datasets a run is judged on: each client's held-out episodes and every eval-only dataset."""

    def __init__(self, cfg: ExperimentConfig, policy_config: Any, clients: bool = True, opened: list | None = None):
        """`clients`: judge on the clients' held-out episodes too (the server reads their datasets);
        `opened`: their ClientData when the caller has opened them already."""
        self.cfg = cfg
        self.clients: dict[str, Any] = {}
        self.validation: dict[str, Any] = {}  # the clients' validation episodes: only to choose the best round
        if clients:
            for local in opened or [self._open_client(i) for i in range(len(cfg.data.clients))]:
                self.clients[local.name] = self._open(local, policy_config)
                if local.val_episodes:
                    self.validation[local.name] = self._open(local, policy_config, local.val_episodes)
        self.extra = {
            spec.name: self._open(data.open_eval_only(cfg, i), policy_config)
            for i, spec in enumerate(cfg.data.eval_only)
        }

    def _open_client(self, index: int) -> data.ClientData:
        try:
            return data.open_client(self.cfg, index)
        except data.DatasetNotAvailableError as e:
            raise RuntimeError(
                f"eval.where=server but the server cannot read client {self.cfg.data.clients[index].name!r}'s "
                f"dataset; use eval.where=clients when the data stays on the clients.\n{e}"
            ) from e

    def _open(self, local: data.ClientData, policy_config: Any, episodes: list[int] | None = None) -> Any:
        """The dataset over `episodes` (default: the held-out ones)."""
        chosen = local.heldout_episodes if episodes is None else episodes
        return data.open_for(self.cfg, local, chosen, policy_config)

    def evaluate(
        self, bundle: model.PolicyBundle, validation: bool = True
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(per-client results, per-eval-only-dataset results, per-client validation loss) of the bundle's
        current weights; the validation episodes are judged on the loss only (no action sampling)."""
        per_client = {name: evaluate(bundle, ds, self.cfg) for name, ds in self.clients.items()}
        extra = {name: evaluate(bundle, ds, self.cfg) for name, ds in self.extra.items()}
        val = (
            {name: evaluate(bundle, ds, self.cfg, actions=False) for name, ds in self.validation.items()}
            if validation
            else {}
        )
        return per_client, extra, val


def sim_labs(cfg: ExperimentConfig) -> dict[str, tuple[Any, str]]:
    """Simulated labs of the config: name -> (client spec, role 'client' or 'eval_only')."""
    labs = {c.name: (c, "client") for c in cfg.data.clients if c.source == "sim"}
    return labs | {c.name: (c, "eval_only") for c in cfg.data.eval_only if c.source == "sim"}


def rollout_due(cfg: ExperimentConfig, server_round: int, last: int | None = None) -> bool:
    """Whether this round ends in closed loop: round 0 when asked, every eval.rollout_every rounds, and the last
    round (`last`: the run's last, or the last a privacy budget allows)."""
    e, last = cfg.eval, cfg.fl.num_rounds if last is None else last
    if not e.rollout_episodes:
        return False
    if server_round == 0:
        return e.rollout_round0
    return server_round == last or bool(e.rollout_every and server_round % e.rollout_every == 0)


def eval_due(cfg: ExperimentConfig, server_round: int, last: int | None = None) -> bool:
    every, last = cfg.eval.every, cfg.fl.num_rounds if last is None else last
    return server_round == 0 or server_round % every == 0 or server_round == last


def lab_rollout(
    cfg: ExperimentConfig, bundle: model.PolicyBundle, spec: Any, videos: Path | None, episodes: int | None = None
) -> dict[str, Any]:
    """Closed-loop episodes (eval.rollout_episodes unless given) of the bundle's policy in one simulated lab."""
    from zk0lib.sim.rollout import rollout

    e = cfg.eval
    return rollout(
        bundle.policy,
        (bundle.preprocessor, bundle.postprocessor),
        spec.lab,
        e.rollout_episodes if episodes is None else episodes,
        seed=e.seed,
        image_size=cfg.data.sim_image_size,
        cache_dir=cfg.cache_dir,
        max_frames=e.rollout_max_frames,
        video_dir=videos,
        device=bundle.device,
    )


def pooled_success(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Success over several labs' episodes together, with its Wilson interval."""
    from zk0lib.sim.rollout import wilson_interval

    wins = sum(round(s["success_rate"] * s["episodes"]) for s in summaries)
    n = sum(s["episodes"] for s in summaries)
    return {
        "success_rate": wins / n if n else float("nan"),
        "success_ci": list(wilson_interval(wins, n)),
        "episodes": n,
    }


def closed_loop(cfg: ExperimentConfig, bundle: model.PolicyBundle, videos: Path | None) -> dict[str, Any]:
    """One policy in every simulated lab (clients' and evaluation-only): success and stages per lab."""
    out: dict[str, Any] = {"labs": {}}
    for name, (spec, role) in sim_labs(cfg).items():
        out["labs"][name] = {"role": role, **lab_rollout(cfg, bundle, spec, videos)}
    clients = [v["summary"] for v in out["labs"].values() if v["role"] == "client"]
    if clients:
        out["clients"] = pooled_success(clients)
    return out


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
        g = torch.Generator().manual_seed(train.derive_seed(seed, key))
        noise.append(torch.randn(c.chunk_size, c.max_action_dim, generator=g))
        u = torch.rand((), generator=g)
        times.append(u ** (1 / 1.5) * 0.999 + 0.001)
    return torch.stack(noise).to(device), torch.stack(times).to(device)


def _loader(dataset: Any, positions: list[int], batch_size: int, num_workers: int):
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, positions),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=data._one_thread_worker if num_workers else None,
    )


@torch.no_grad()
def evaluate(bundle: model.PolicyBundle, dataset: Any, cfg: ExperimentConfig, actions: bool = True) -> dict[str, Any]:
    """Seeded flow-matching loss and sampled-action error (unless `actions` is False) on a client's held-out
    episodes.

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
    with train.autocast(bundle, cfg.train.amp):
        for batch in _loader(dataset, frame_subset(n, e.max_frames), e.batch_size, cfg.train.num_workers):
            keys = batch["index"].tolist()
            episodes = batch["episode_index"].tolist()
            noise, times = _fixed_noise_time(policy, keys, e.seed, bundle.device)
            per_sample, _ = policy.forward(bundle.preprocessor(batch), noise=noise, time=times, reduction="none")
            for ep, value in zip(episodes, per_sample.float().cpu().tolist(), strict=True):
                loss_by_ep.setdefault(ep, []).append(value)
        action_positions = frame_subset(n, e.action_frames) if actions else []
        for batch in (
            _loader(dataset, action_positions, e.batch_size, cfg.train.num_workers) if action_positions else ()
        ):
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
    """The 95% interval of the mean of group (client) means that eval.interval names. The metrics it is
    used for (flow-matching loss, action error) cannot be negative, so a t interval reaching below 0
    (few, spread episodes) is cut at 0: the true mean is never there, so the coverage is the same."""
    if cfg.eval.interval == "t":
        lo, hi = t_interval(groups)
        return [0.0 if lo < 0 else lo, hi]  # NaN stays NaN
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
