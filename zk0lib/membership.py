"""Membership inference against a trained policy: can its loss tell the episodes it trained on from episodes
of the same labs it never saw? The check that shows what differential privacy buys (README, Privacy).

The attack is the loss attack (Yeom et al. 2018): an episode the model fits better is guessed a member. Labs
differ in how hard they are, so members are compared only with non-members of the same client (a stratified
ROC AUC: the chance that a member of a client has the lower loss than a non-member of that client). With a
reference policy (by default the run's starting point, `model.pretrained`) the score is also calibrated by
difficulty (Watson et al. 2022): the loss minus the reference's loss on the same frames and noise, so an
episode that is easy for any model is not mistaken for a member. AUC 0.5 is chance; the interval is a
bootstrap that resamples members and non-members within each client.

Members are a seeded sample of each client's training episodes; non-members are its held-out and validation
episodes (never trained on). Both are scored on the same number of evenly spaced frames per episode, with the
evaluation's seeded noise and time (`evaluation.evaluate`), so two audits of the same policy agree.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from zk0lib import data, evaluation, model
from zk0lib.config import ConfigError, resolve_pretrained
from zk0lib.runs import RunRecord, is_run_folder, utc_now, write_json


def stratified_auc(groups: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """P(member score > non-member score) over the pairs within each group (ties count half); a score is
    higher for what the attack takes for a member. NaN when no group has both."""
    wins = pairs = 0.0
    for members, others in groups:
        if len(members) and len(others):
            diff = np.asarray(members, float)[:, None] - np.asarray(others, float)[None, :]
            wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            pairs += diff.size
    return wins / pairs if pairs else float("nan")


def auc_interval(groups: list[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int) -> list[float]:
    """95% percentile bootstrap of `stratified_auc`, members and non-members resampled within each group."""
    rng = np.random.default_rng(seed)
    groups = [(np.asarray(m, float), np.asarray(o, float)) for m, o in groups if len(m) and len(o)]
    if not groups or n_boot == 0:
        return [float("nan"), float("nan")]
    draws = [
        stratified_auc([(m[rng.integers(0, len(m), len(m))], o[rng.integers(0, len(o), len(o))]) for m, o in groups])
        for _ in range(n_boot)
    ]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return [float(lo), float(hi)]


def _episode_losses(
    bundle: model.PolicyBundle, cfg: Any, client: data.ClientData, episodes: list[int], frames_per_episode: int
) -> dict[int, float]:
    """Each episode's seeded flow-matching loss over `frames_per_episode` evenly spaced frames of the set."""
    c = copy.deepcopy(cfg)
    c.eval.max_frames = frames_per_episode * len(episodes)
    ds = data.open_for(c, client, episodes, bundle.config)
    result = evaluation.evaluate(bundle, ds, c, actions=False)
    return {int(k): v for k, v in result["episode_loss"].items()}


_SUMMARY_KEYS = ("auc", "auc_ci", "auc_calibrated", "auc_calibrated_ci", "members", "non_members", "reference")


def audit(
    run_path: str | Path,
    members_per_client: int = 20,
    frames_per_episode: int = 16,
    reference: str | None = "pretrained",
    device: str | None = None,
    n_boot: int = 2000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The loss attack on a run's final policy; written to <run>/membership.json and the run's summary.

    `reference`: "pretrained" (the run's model.pretrained), a saved policy folder, or None for the
    uncalibrated attack only."""
    say = progress or (lambda line: None)
    run_path = Path(run_path)
    if not is_run_folder(run_path):
        raise ConfigError(f"{run_path}: not a run folder (config.json and summary.json); give reports/runs/<run-id>")
    if members_per_client < 1 or frames_per_episode < 1:
        raise ConfigError("membership audit: members_per_client and frames_per_episode must be >= 1")
    run = RunRecord(run_path)
    summary = run.summary()
    if summary.get("kind") == "local-only":
        raise ConfigError(
            f"{run_path}: a local-only run has one model per owner and no shared model to audit; audit a federated "
            "or centralized run"
        )
    final = run.checkpoint("final")
    if not (final / "config.json").is_file():
        raise ConfigError(f"{run_path}: no final policy at {final} (the run did not finish); finish or resume it first")
    cfg = run.config()
    dev = device or cfg.model.device
    bundles = {"policy": model.load_policy(final, device=dev)}
    ref_note = ""
    if reference:
        ref_path = resolve_pretrained(cfg.model.pretrained) if reference == "pretrained" else reference
        if (Path(ref_path) / "config.json").is_file():
            bundles["reference"] = model.load_policy(ref_path, device=dev)
        else:
            ref_note = (
                f"no reference: {ref_path!r} is not a saved policy folder (model.pretrained={cfg.model.pretrained!r})"
            )
            say(ref_note)
    rng = np.random.default_rng(cfg.eval.seed)
    clients: dict[str, Any] = {}
    loss_groups, calibrated_groups = [], []
    for index, spec in enumerate(cfg.data.clients):
        client = data.open_client(cfg, index)
        members = sorted(
            int(e)
            for e in rng.choice(client.train_episodes, min(members_per_client, len(client.train_episodes)), False)
        )
        others = sorted(client.heldout_episodes + client.val_episodes)
        say(f"{spec.name}: {len(members)} members, {len(others)} non-members, {frames_per_episode} frames each")
        losses = {
            name: {
                "members": _episode_losses(b, cfg, client, members, frames_per_episode),
                "non_members": _episode_losses(b, cfg, client, others, frames_per_episode),
            }
            for name, b in bundles.items()
        }
        own = losses["policy"]
        m, o = np.array(list(own["members"].values())), np.array(list(own["non_members"].values()))
        row: dict[str, Any] = {
            "members": members,
            "non_members": others,
            "member_loss": float(m.mean()),
            "non_member_loss": float(o.mean()),
            "auc": stratified_auc([(-m, -o)]),
            "episode_loss": {k: {str(e): v for e, v in d.items()} for k, d in own.items()},
        }
        loss_groups.append((-m, -o))
        if "reference" in losses:
            ref = losses["reference"]
            cm = np.array([ref["members"][e] - own["members"][e] for e in members])
            co = np.array([ref["non_members"][e] - own["non_members"][e] for e in others])
            row["auc_calibrated"] = stratified_auc([(cm, co)])
            row["reference_episode_loss"] = {k: {str(e): v for e, v in d.items()} for k, d in ref.items()}
            calibrated_groups.append((cm, co))
        clients[spec.name] = row
    result: dict[str, Any] = {
        "run": str(run_path),
        "policy": str(final),
        "attack": "loss (Yeom et al. 2018), members against non-members of the same client",
        "auc": stratified_auc(loss_groups),
        "auc_ci": auc_interval(loss_groups, n_boot, cfg.eval.seed),
        "members": sum(len(m) for m, _ in loss_groups),
        "non_members": sum(len(o) for _, o in loss_groups),
        "frames_per_episode": frames_per_episode,
        "privacy": _privacy_of(summary, cfg),
        "clients": clients,
        "created_at": utc_now(),
    }
    if calibrated_groups:
        result |= {
            "reference": str(ref_path),
            "auc_calibrated": stratified_auc(calibrated_groups),
            "auc_calibrated_ci": auc_interval(calibrated_groups, n_boot, cfg.eval.seed + 1),
        }
    elif ref_note:
        result["reference_note"] = ref_note
    write_json(run_path / "membership.json", result)
    run.update_summary(membership={k: result[k] for k in _SUMMARY_KEYS if k in result})
    return result


def _privacy_of(summary: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """The run's differential privacy as its summary recorded it (mode off when it had none)."""
    recorded = summary.get("privacy") or {}
    keys = ("epsilon", "delta", "noise_multiplier", "noise_std")
    return {"mode": cfg.privacy.mode, **{k: recorded[k] for k in keys if k in recorded}}


def describe(result: dict[str, Any]) -> list[str]:
    """Lines for the terminal."""
    lines = [
        f"membership inference on {result['policy']}: {result['members']} member and {result['non_members']} "
        f"non-member episodes, {result['frames_per_episode']} frames each",
        f"  loss attack: AUC {result['auc']:.3f} [{result['auc_ci'][0]:.3f}, {result['auc_ci'][1]:.3f}] (0.5 is chance)",
    ]
    if "auc_calibrated" in result:
        lo, hi = result["auc_calibrated_ci"]
        lines.append(f"  calibrated by {result['reference']}: AUC {result['auc_calibrated']:.3f} [{lo:.3f}, {hi:.3f}]")
    for name, row in result["clients"].items():
        extra = f", calibrated {row['auc_calibrated']:.2f}" if "auc_calibrated" in row else ""
        lines.append(
            f"  {name}: loss {row['member_loss']:.4f} members / {row['non_member_loss']:.4f} non-members, "
            f"AUC {row['auc']:.2f}{extra}"
        )
    p = result["privacy"]
    if p.get("mode", "off") != "off":
        lines.append(f"  privacy: {p['mode']}, epsilon {p.get('epsilon', float('nan')):.2f} at delta {p.get('delta')}")
    return lines
