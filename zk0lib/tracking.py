"""Optional Weights & Biases logging (output.wandb=true): one W&B run per experiment, metrics prefixed
by client; offline mode writes under the run folder and syncs later with `wandb sync`."""

from __future__ import annotations

from typing import Any

from zk0lib.config import ExperimentConfig
from zk0lib.runs import RunRecord


def flatten_round(record: dict[str, Any]) -> dict[str, float]:
    """A round record as flat W&B metrics: train/<client>/<metric>, eval/<client>/<metric>, ..."""
    out: dict[str, float] = {}
    for client, metrics in record.get("train", {}).get("clients", {}).items():
        out |= {f"train/{client}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    for k, v in record.get("train", {}).get("aggregate", {}).items():
        out[f"train/all/{k}"] = v
    ev = record.get("eval", {})
    from zk0lib.runs import eval_only_of

    for group in (ev.get("clients", {}), eval_only_of(ev)):
        for name, metrics in group.items():
            out |= {f"eval/{name}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    out |= {f"eval/mean/{k}": v for k, v in ev.get("mean", {}).items() if isinstance(v, (int, float))}
    for lab, result in record.get("rollout", {}).get("labs", {}).items():
        out[f"rollout/{lab}/success_rate"] = result["summary"]["success_rate"]
    for key in ("bytes_sent", "bytes_received"):
        if key in record:
            out[f"comms/{key}"] = record[key]
    if "failures" in record:
        out["faults/failed_clients"] = len(record["failures"])
    out |= {f"seconds/{k}": v for k, v in record.get("seconds", {}).items() if isinstance(v, (int, float))}
    return out


class WandbLogger:
    def __init__(self, cfg: ExperimentConfig, run: RunRecord):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.output.wandb_project,
            name=run.run_id,
            config=cfg.to_dict(),
            dir=str(run.path),
            mode=cfg.output.wandb_mode,
            job_type=run.summary().get("kind", "federated"),  # federated, centralized or local-only
        )

    def log_round(self, record: dict[str, Any]) -> None:
        self.run.log(flatten_round(record), step=int(record["round"]))

    def finish(self, summary: dict[str, Any]) -> None:
        final = summary.get("final") or {}
        self.run.summary.update({f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))})
        self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)
