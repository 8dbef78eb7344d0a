"""`zk0 compare`: federated strategies next to the centralized and local-only baselines, same seeds.

Every run lands in reports/compare/<id>/runs/ in the common run format (04 and the app read that folder
like any other); the table is written to table.md / table.csv and compare.json lists every run,
including failed ones with their reason.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from zk0lib.config import STRATEGIES, ConfigError, ExperimentConfig, load_config, parse_overrides, zk0_home
from zk0lib.report import bytes_per_round
from zk0lib.runs import RunRecord, atomic_write_text, eval_only_of, utc_now

BASELINES = ("centralized", "local-only")


def plan(
    preset: str, strategies: list[str], baselines: list[str], seeds: int, overrides: dict[str, Any], runs_dir: Path
) -> list[tuple[str, str, ExperimentConfig]]:
    """(row label, kind, config) of every run, checked before any starts (only fedprox applies
    fl.proximal_mu; the baselines have no proximal term)."""
    unknown = [s for s in strategies if s not in STRATEGIES] + [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(
            f"compare: unknown {', '.join(unknown)} (strategies: {', '.join(STRATEGIES)}; "
            f"baselines: {', '.join(BASELINES)})"
        )
    if seeds < 1:
        raise ConfigError(f"compare: --seeds must be >= 1 (got {seeds})")
    first = load_config(preset, overrides)
    runs = []
    for k in range(seeds):
        seed = first.seed + k
        common = {**overrides, "seed": seed, "output.runs_dir": str(runs_dir)}
        for strategy in strategies:
            cfg = load_config(preset, {**common, "fl.strategy": strategy, "output.run_id": f"{strategy}-s{seed}"})
            runs.append((f"federated {strategy}", "federated", cfg))
        for kind in baselines:
            cfg = load_config(preset, {**common, "output.run_id": f"{kind}-s{seed}"})
            runs.append((kind, kind, cfg))
    return runs


def compare(
    preset: str,
    strategies: list[str],
    baselines: list[str] | None = None,
    seeds: int = 1,
    overrides: dict[str, Any] | list[str] | None = None,
    compare_id: str = "",
    out_root: Path | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every strategy and baseline for each seed, one after the other; a failed run is recorded and
    the others go on. Returns the record written to compare.json (with the table)."""
    from zk0lib.baselines import run_baseline
    from zk0lib.fl.simulation import run_federated

    overrides = parse_overrides(overrides)
    baselines = list(BASELINES if baselines is None else baselines)
    compare_id = compare_id or f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{preset}"
    out = Path(out_root or zk0_home() / "reports" / "compare") / compare_id
    runs = plan(preset, strategies, baselines, seeds, overrides, out / "runs")
    record: dict[str, Any] = {
        "compare_id": compare_id,
        "preset": preset,
        "strategies": strategies,
        "baselines": baselines,
        "seeds": seeds,
        "overrides": overrides,
        "started_at": utc_now(),
        "runs": [],
    }
    for i, (label, kind, cfg) in enumerate(runs):
        entry = {"label": label, "kind": kind, "seed": cfg.seed, "run_id": cfg.output.run_id, "status": "running"}
        record["runs"].append(entry)
        atomic_write_text(out / "compare.json", json.dumps(record, indent=2))
        progress(f"[{i + 1}/{len(runs)}] {label}, seed {cfg.seed}")
        t0 = time.perf_counter()
        try:
            inner = lambda line: progress(f"  {line}")  # noqa: E731
            if kind == "federated":
                result = run_federated(cfg, progress=inner)
            else:
                result = run_baseline(kind, cfg, progress=inner)
            entry["status"] = result.status
        except Exception as e:  # noqa: BLE001 - one failed run is a row with its reason, not a lost comparison
            entry["status"], entry["error"] = "failed", f"{type(e).__name__}: {e}".splitlines()[0]
            entry["traceback"] = traceback.format_exc()[-4000:]
            progress(f"  failed: {entry['error']}")
        entry["seconds"] = time.perf_counter() - t0
        atomic_write_text(out / "compare.json", json.dumps(record, indent=2))
    table = compare_table(out / "runs", record["runs"])
    atomic_write_text(out / "table.md", table_markdown(table) + "\n")
    table.to_csv(out / "table.csv", index=False)
    record |= {"finished_at": utc_now(), "table": table.to_dict(orient="records"), "out": str(out)}
    atomic_write_text(out / "compare.json", json.dumps(record, indent=2, default=str))
    return record


def run_numbers(run: RunRecord) -> dict[str, Any]:
    """The numbers a comparison row needs from one run's records (its last evaluated round, its summary)."""
    rounds, summary = run.rounds(), run.summary()
    ev = next((r["eval"] for r in reversed(rounds) if "eval" in r), {})
    mean = ev.get("mean", {})
    own = ev.get("own", mean)  # a shared model is judged on each owner's data: its own == its mean
    extra = next(iter(eval_only_of(ev).values()), {})
    final = summary.get("final_rollout") or {}
    success = final.get("clients") or {}
    return {
        "loss": mean.get("loss"),
        "loss_ci": mean.get("loss_ci"),
        "own_loss": own.get("loss"),
        "action_mae": mean.get("action_mae"),
        "action_mae_ci": mean.get("action_mae_ci"),
        "unseen_loss": extra.get("loss"),
        "success_wins": round(success["success_rate"] * success["episodes"]) if success else None,
        "success_n": success.get("episodes"),
        "lab_summaries": final.get("labs") or {},
        "bytes_per_round": bytes_per_round(rounds),
        "train_samples": (summary.get("totals") or {}).get("train_samples"),
    }


def compare_table(runs_dir: Path, entries: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per strategy or baseline: the final evaluation, mean +- sd over seeds (or the 95% interval
    of the single seed), closed-loop success pooled over seeds with its Wilson interval."""
    from zk0lib.evaluation import pooled_success
    from zk0lib.sim.rollout import wilson_interval

    rows = []
    for label in dict.fromkeys(e["label"] for e in entries):
        mine = [e for e in entries if e["label"] == label]
        nums = [run_numbers(RunRecord(runs_dir / e["run_id"])) for e in mine if e["status"] == "completed"]
        row: dict[str, Any] = {"row": label, "seeds": f"{len(nums)}/{len(mine)}"}
        for key in ("loss", "own_loss", "unseen_loss", "action_mae"):
            values = [n[key] for n in nums if n[key] is not None]
            row[key] = float(np.mean(values)) if values else None
            row[f"{key}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        if len(nums) == 1:
            row["loss_ci"], row["action_mae_ci"] = nums[0]["loss_ci"], nums[0]["action_mae_ci"]
        wins = [n["success_wins"] for n in nums if n["success_wins"] is not None]
        if wins:
            n_eps = sum(n["success_n"] for n in nums if n["success_n"])
            row["success"] = sum(wins) / n_eps
            row["success_ci"] = list(wilson_interval(sum(wins), n_eps))
            row["success_episodes"] = n_eps
        labs = dict.fromkeys(lab for n in nums for lab in n["lab_summaries"])
        row["lab_success"] = {
            lab: pooled_success([n["lab_summaries"][lab] for n in nums if lab in n["lab_summaries"]]) for lab in labs
        }
        row["mb_per_round"] = float(np.mean([n["bytes_per_round"] for n in nums])) / 2**20 if nums else None
        row["train_samples"] = nums[0]["train_samples"] if nums else None
        row["wall_min"] = float(np.mean([e["seconds"] for e in mine if "seconds" in e])) / 60 if mine else None
        row["failed"] = "; ".join(e.get("error", "") for e in mine if e["status"] != "completed")
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(row: pd.Series, key: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    sd, ci = row.get(f"{key}_sd"), row.get(f"{key}_ci")
    if sd is not None and not (isinstance(sd, float) and np.isnan(sd)):
        return f"{value:.3f} ± {sd:.3f}"
    if isinstance(ci, list) and ci[0] is not None:
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"


def table_markdown(df: pd.DataFrame) -> str:
    """The comparison as Markdown: ± is the sd over seeds, [lo, hi] a 95% interval."""
    header = (
        "| run | seeds | eval loss | own-client loss | unseen-lab loss | action MAE | closed-loop success "
        "| MiB per round (up + down) | samples | wall (min) |"
    )
    lines = [header, "|" + "---|" * 10]
    for _, row in df.iterrows():
        success = "-"
        if isinstance(row.get("success_ci"), list):
            lo, hi = row["success_ci"]
            success = f"{row['success']:.0%} [{lo:.0%}, {hi:.0%}] of {row['success_episodes']}"
        mb = "-" if row.get("mb_per_round") is None else f"{row['mb_per_round']:.2f}"
        wall = "-" if row.get("wall_min") is None else f"{row['wall_min']:.1f}"
        samples = "-" if row.get("train_samples") is None else f"{int(row['train_samples'])}"
        cells = [row["row"], row["seeds"], *(_pm(row, k) for k in ("loss", "own_loss", "unseen_loss", "action_mae"))]
        lines.append("| " + " | ".join([*cells, success, mb, samples, wall]) + " |")
    failed = [f"- {row['row']}: {row['failed']}" for _, row in df.iterrows() if row.get("failed")]
    return "\n".join(lines + ([""] + failed if failed else []) + lab_success_markdown(df))


def _success_cell(pooled: dict[str, Any]) -> str:
    wins, n = round(pooled["success_rate"] * pooled["episodes"]), pooled["episodes"]
    lo, hi = pooled["success_ci"]
    return f"{wins}/{n} [{lo:.0%}, {hi:.0%}]"


def lab_success_markdown(df: pd.DataFrame) -> list[str]:
    """Closed-loop success per lab and row (successes/episodes [Wilson 95%]), under the main table."""
    labs = list(dict.fromkeys(lab for v in df.get("lab_success", []) if isinstance(v, dict) for lab in v))
    if not labs:
        return []
    lines = ["", "| run | " + " | ".join(labs) + " |", "|" + "---|" * (len(labs) + 1)]
    for _, row in df.iterrows():
        per = row.get("lab_success") if isinstance(row.get("lab_success"), dict) else {}
        cells = [_success_cell(per[lab]) if lab in per else "-" for lab in labs]
        lines.append("| " + " | ".join([row["row"], *cells]) + " |")
    return lines
