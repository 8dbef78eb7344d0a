"""Client-level differential privacy: Flower's own strategy wrappers around the configured strategy, and
the budget Flower's RDP accountant (Google's dp-accounting, through `flwr[dp]`) counts.

privacy.mode=server-clipping is central DP with a trusted server (McMahan et al. 2018): the server clips
every client's update (its trainable weights minus the global weights it was sent) to
`privacy.clipping_norm`, takes the mean of equally weighted updates and adds Gaussian noise of standard
deviation noise_multiplier x clipping_norm / (clients sampled). privacy.mode=client-clipping moves the
clipping to the clients (Flower's fixedclipping_mod, run by zk0's ClientApp on train messages), so no
unclipped update leaves an owner; the server checks that each update it gets is within the norm. One
round is one release to the accountant; a round that would take epsilon past `privacy.max_epsilon` is
never started.
privacy.mode=adaptive learns the clipping norm towards a quantile of the update norms (Andrew et al. 2021);
Flower's accountant does not count it, so no epsilon is reported for it.

Under server-clipping zk0's transport is unchanged: the wrapper sees the screened replies as fp32 weights
in the global weights' key order, whatever travelled (fp32 weights or bf16 deltas). Under client-clipping
train messages carry what Flower's mod reads: one ArrayRecord of fp32 numpy weights, and one ConfigRecord
(with the normalization stats inside it, as bytes).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

from zk0lib.config import ExperimentConfig

__all__ = ["PrivacyBudgetExhausted", "with_privacy", "inner_strategy", "privacy_record", "plan"]


def accountant(cfg: ExperimentConfig) -> Any:
    """Flower's RDP accountant for this federation: client-level (add or remove one client's data), every
    sampled round counted in full (no amplification by sampling), epsilon reported at privacy.target_delta."""
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    v = cfg.privacy
    config = PrivacyConfig(
        target_delta=v.target_delta,
        population_size=len(cfg.data.clients),
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=v.max_epsilon,
    )
    try:
        return RdpAccountant(config)
    except ImportError as e:  # flwr[dp] is in pyproject; a hand-made environment may lack it
        raise ImportError(f"privacy.mode=server-clipping counts epsilon with dp-accounting: {e}") from e


def with_privacy(cfg: ExperimentConfig, strategy: Any) -> Any:
    """The strategy as privacy.mode asks: unchanged (off), or inside Flower's DP wrapper."""
    v = cfg.privacy
    if not v.on:
        return strategy
    sampled = cfg.fl.sample_size(len(cfg.data.clients))
    wrapper = {
        "server-clipping": DifferentialPrivacyServerSideFixedClipping,
        "client-clipping": DifferentialPrivacyClientSideFixedClipping,
    }[v.mode]
    return wrapper(strategy, v.noise_multiplier, v.clipping_norm, sampled, accountant=accountant(cfg))


def clients_clip(cfg: ExperimentConfig) -> bool:
    return cfg.privacy.mode == "client-clipping"


def inner_strategy(strategy: Any) -> Any:
    """The aggregation strategy itself (FedAvg, FedProx, FedAdam, ...), inside a DP wrapper or not."""
    return getattr(strategy, "strategy", strategy)


def _round_event(cfg: ExperimentConfig) -> GaussianPrivacyEvent:
    """One round's release as the DP wrapper reports it to the accountant."""
    n = len(cfg.data.clients)
    return GaussianPrivacyEvent(cfg.privacy.noise_multiplier, cfg.fl.sample_size(n), n)


def epsilon_after(cfg: ExperimentConfig, rounds: int) -> float:
    """The epsilon `rounds` rounds of DP spend, at privacy.target_delta."""
    count = accountant(cfg)
    if rounds > 0:
        count.compose(_round_event(cfg), rounds)
    return float(count.get_epsilon(cfg.privacy.target_delta))


def rounds_within(cfg: ExperimentConfig, max_epsilon: float) -> int:
    """How many of the run's rounds fit in `max_epsilon` (the accountant's own would_exceed, round by round)."""
    count, event = accountant(cfg), _round_event(cfg)
    rounds = 0
    while rounds < cfg.fl.num_rounds and not count.would_exceed(event, max_epsilon):
        count.compose(event)
        rounds += 1
    return rounds


def last_round(cfg: ExperimentConfig) -> int:
    """The run's last round: fl.num_rounds, or fewer when privacy.max_epsilon stops it earlier (that round is
    then evaluated and rolled out as a last round is)."""
    v = cfg.privacy
    return rounds_within(cfg, v.max_epsilon) if v.on and v.max_epsilon is not None else cfg.fl.num_rounds


def plan(cfg: ExperimentConfig) -> str:
    """One line on what privacy the run will have, for the run's log before round 1."""
    v = cfg.privacy
    if not v.on:
        return "privacy: off"
    sampled = cfg.fl.sample_size(len(cfg.data.clients))
    noise = compute_stdv(v.noise_multiplier, v.clipping_norm, sampled)
    where = "client" if clients_clip(cfg) else "server"
    line = (
        f"privacy: {where}-side clipping at {v.clipping_norm:g}, noise std {noise:.4g} on the mean of {sampled}; "
        f"epsilon after {cfg.fl.num_rounds} rounds {epsilon_after(cfg, cfg.fl.num_rounds):.3g} "
        f"at delta {v.target_delta:g}"
    )
    if v.max_epsilon is not None:
        line += (
            f"; max_epsilon {v.max_epsilon:g} allows {rounds_within(cfg, v.max_epsilon)} of {cfg.fl.num_rounds} rounds"
        )
    return line


def privacy_record(strategy: Any) -> dict[str, Any] | None:
    """What the DP wrapper did this far, for the round's record: its clipping norm and noise std, and the
    budget spent (epsilon at delta, releases)."""
    if strategy is inner_strategy(strategy):
        return None
    spent = strategy.privacy_spent()
    return {
        "mode": "client-clipping"
        if isinstance(strategy, DifferentialPrivacyClientSideFixedClipping)
        else "server-clipping",
        "noise_multiplier": float(strategy.noise_multiplier),
        "clipping_norm": float(strategy.clipping_norm),
        "noise_std": compute_stdv(strategy.noise_multiplier, strategy.clipping_norm, strategy.num_sampled_clients),
        "sampled": int(strategy.num_sampled_clients),
        "epsilon": float(spent.epsilon),
        "delta": float(spent.delta),
        "releases": int(spent.num_releases),
    }


def privacy_state(strategy: Any) -> dict[str, Any]:
    """What a resumed run needs to go on counting: the accountant's ledger (the releases so far)."""
    if strategy is inner_strategy(strategy):
        return {}
    return {"accountant": strategy.accountant.state_dict()}


def restore_privacy(strategy: Any, state: dict[str, Any]) -> None:
    if "accountant" in state:
        strategy.accountant.load_state_dict(state["accountant"])
