"""Tables and charts from run records (never from re-running anything), and evaluation videos.

Notebooks and the marimo app draw what these functions return; everything they show is data in the
run folders or written next to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from zk0lib.runs import RunRecord, atomic_write_text, eval_only_of, find_runs, list_runs, run_source

# ----------------------------------------------------------------------------- per-run tables


def train_frame(run: RunRecord) -> pd.DataFrame:
    """One row per (round, client): the client's local-training metrics."""
    rows = [
        {"round": r["round"], "client": client, **metrics}
        for r in run.rounds()
        if "train" in r
        for client, metrics in r["train"]["clients"].items()
    ]
    return pd.DataFrame(rows)


def eval_frame(run: RunRecord) -> pd.DataFrame:
    """One row per (round, dataset): held-out loss and action error with 95% intervals.

    `role` is client, mean (over clients, each weighing the same) or eval_only."""
    rows = []
    for r in run.rounds():
        ev = r.get("eval", {})
        groups = [("client", ev.get("clients", {})), ("eval_only", eval_only_of(ev))]
        if ev.get("mean"):
            groups.append(("mean", {"mean": ev["mean"]}))
        for role, entries in groups:
            for name, m in entries.items():
                row = {"round": r["round"], "dataset": name, "role": role}
                for key in ("loss", "action_mae"):
                    if key in m:
                        row[key] = m[key]
                        row[f"{key}_lo"], row[f"{key}_hi"] = m.get(f"{key}_ci", [np.nan, np.nan])
                rows.append(row)
    return pd.DataFrame(rows)


def rollout_frame(run: RunRecord) -> pd.DataFrame:
    """One row per (round, lab) of closed-loop evaluation: success with its Wilson interval, stages."""
    rows = []
    for r in run.rounds():
        for lab, v in r.get("rollout", {}).get("labs", {}).items():
            s = v["summary"]
            rows.append(
                {
                    "round": r["round"],
                    "lab": lab,
                    "role": v.get("role", ""),
                    "episodes": s["episodes"],
                    "success_rate": s["success_rate"],
                    "success_lo": s["success_ci"][0],
                    "success_hi": s["success_ci"][1],
                    "furthest_stage": s["furthest_stage"],
                    **{f"reached_{k}": share for k, share in s.get("stage_reached", {}).items()},
                    "mean_frames": s["mean_frames"],
                }
            )
    return pd.DataFrame(rows)


def closed_loop_change(df: pd.DataFrame) -> pd.DataFrame:
    """Per lab: closed-loop success of the starting model (round 0) and of the last evaluated round, as
    successes/episodes with the Wilson 95% interval. Round 0 is missing when eval.rollout_round0 was off."""
    if df.empty:
        return df
    first, last = int(df["round"].min()), int(df["round"].max())

    def cell(r: pd.Series) -> str:
        wins = round(r["success_rate"] * r["episodes"])
        return f"{wins}/{r['episodes']} [{r['success_lo']:.0%}, {r['success_hi']:.0%}]"

    out = pd.DataFrame({"lab": df["lab"].unique()})
    for rnd in dict.fromkeys((first, last)):
        at = df[df["round"] == rnd].set_index("lab")
        out[f"round {rnd}"] = out["lab"].map(lambda lab, at=at: cell(at.loc[lab]) if lab in at.index else "-")
    return out


def round_frame(run: RunRecord) -> pd.DataFrame:
    """One row per round: bytes exchanged, failures and time per phase."""
    rows = []
    for r in run.rounds():
        row = {
            "round": r["round"],
            "bytes_sent": r.get("bytes_sent", 0),
            "bytes_received": r.get("bytes_received", 0),
            "failures": len(r.get("failures", [])),
            "clients_trained": r.get("num_train_clients", 0),
        }
        row |= {f"seconds_{k}": v for k, v in r.get("seconds", {}).items()}
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- across runs


def run_row(run: RunRecord) -> dict[str, Any]:
    """The results-table row of one run (federated, centralized or local-only)."""
    summary = run.summary()
    raw = json.loads((run.path / "config.json").read_text())
    cfg = raw["config"]
    final = summary.get("final") or {}
    best = summary.get("best") or {}
    rollout = (summary.get("final_rollout") or {}).get("clients") or {}
    start = (summary.get("start_rollout") or {}).get("clients") or {}
    per_round = bytes_per_round(run.rounds())
    kind = raw.get("kind", "federated")
    membership = summary.get("membership") or {}  # `zk0 audit`
    privacy = summary.get("privacy") or {}
    federated = kind == "federated"  # strategy, mu and transport mean nothing for the baselines: left empty
    return {
        "run_id": run.run_id,
        "kind": kind,
        "status": summary.get("status", "unknown"),
        "preset": cfg["preset"],
        "strategy": cfg["fl"]["strategy"] if federated else None,
        "clients": len(cfg["data"]["clients"]),
        "rounds": f"{summary.get('rounds_completed', 0)}/{cfg['fl']['num_rounds']}",
        "local_steps": cfg["train"]["local_steps"],
        "mu": (cfg["fl"]["proximal_mu"] if cfg["fl"]["strategy"] == "fedprox" else 0.0) if federated else None,
        "lr": cfg["train"]["lr"],
        "batch": cfg["train"]["batch_size"],
        "transport": cfg["fl"]["transport_dtype"] if federated else None,
        "seed": cfg["seed"],
        "final_loss": final.get("loss"),
        "final_loss_ci": _ci(final.get("loss_ci")),
        "best_loss": best.get("loss"),
        "best_round": best.get("round"),
        "action_mae": final.get("action_mae"),
        "action_mae_ci": _ci(final.get("action_mae_ci")),
        "success_rate": rollout.get("success_rate"),
        "success_ci": _ci(rollout.get("success_ci")),
        "round0_success_rate": start.get("success_rate"),
        "round0_success_ci": _ci(start.get("success_ci")),
        "epsilon": privacy.get("epsilon"),
        "secagg": (cfg.get("privacy", {}).get("secure_aggregation", "off") != "off") if federated else None,
        "membership_auc": membership.get("auc"),
        "membership_auc_ci": _ci(membership.get("auc_ci")),
        "mb_per_round": per_round / 2**20,
        "wall_min": (summary.get("wall_seconds") or 0) / 60,
        "started_at": summary.get("started_at"),
        "error": summary.get("error", ""),
    }


def bytes_per_round(rounds: list[dict[str, Any]]) -> float:
    """Mean bytes sent plus received per trained round (0 for runs that exchange nothing)."""
    trained = [r.get("bytes_sent", 0) + r.get("bytes_received", 0) for r in rounds if r["round"] > 0]
    return float(np.mean(trained)) if trained else 0.0


def _ci(ci: list[float] | None) -> str:
    return "" if not ci or ci[0] is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def runs_table(runs_dir: str | Path, recursive: bool = False, runs: list[RunRecord] | None = None) -> pd.DataFrame:
    """One row per run in `runs_dir` (or, `recursive`, anywhere under it: then with the `source` folder
    each came from and its `path`), oldest first. `runs`: those already found under `runs_dir`."""
    if runs is None:
        runs = find_runs(runs_dir) if recursive else list_runs(runs_dir)
    if recursive:
        rows = [{"source": run_source(r, runs_dir), **run_row(r), "path": str(r.path)} for r in runs]
    else:
        rows = [run_row(r) for r in runs]
    return (
        pd.DataFrame(rows).sort_values("started_at", na_position="last").reset_index(drop=True)
        if rows
        else pd.DataFrame()
    )


def curves(runs: list[RunRecord]) -> pd.DataFrame:
    """Mean held-out loss and action error per round of several runs, for comparisons."""
    frames = []
    for run in runs:
        df = eval_frame(run)
        if not df.empty:
            df = df[df.role == "mean"].assign(run_id=run.run_id, kind=run_row(run)["kind"])
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub-style Markdown table (no extra dependency)."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        return format(v, floatfmt) if isinstance(v, float) else str(v).replace("|", "/")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def write_table(df: pd.DataFrame, directory: Path, name: str) -> tuple[Path, Path]:
    directory = Path(directory)
    csv_path, md_path = directory / f"{name}.csv", directory / f"{name}.md"
    atomic_write_text(csv_path, df.to_csv(index=False))
    atomic_write_text(md_path, markdown_table(df))
    return csv_path, md_path


# ----------------------------------------------------------------------------- charts


def _alt():
    import altair as alt

    alt.data_transformers.disable_max_rows()
    if "zk0" not in alt.renderers.names():
        alt.renderers.register("zk0", _offline_renderer)
    alt.renderers.enable("zk0")
    return alt


def _offline_renderer(spec: dict, **_: Any) -> dict[str, Any]:
    """How charts show in notebooks: drawn to SVG by vl-convert, so an executed notebook shows them in
    JupyterLab and converted to HTML with no network (Altair's default HTML output loads vega from a
    CDN). The spec itself is saved beside each chart (`save_chart`); Altair 6's Vega-Lite mimetype
    (application/vnd.vegalite.v6.json) is not one nbformat accepts a JSON object under."""
    import vl_convert

    return {"image/svg+xml": vl_convert.vegalite_to_svg(spec), "text/plain": "<chart: SVG>"}


def train_chart(df: pd.DataFrame):
    """Per-client train loss, proximal term and update norm per round."""
    alt = _alt()
    metrics = [m for m in ("train_loss", "prox_term", "update_norm", "grad_norm") if m in df]
    long = df.melt(id_vars=["round", "client"], value_vars=metrics, var_name="metric")
    return (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("round:Q", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("value:Q", title=None),
            color="client:N",
            tooltip=["round", "client", "metric", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(width=220, height=160)
        .facet(facet=alt.Facet("metric:N", title=None), columns=2)
        .resolve_scale(y="independent")
    )


def eval_chart(df: pd.DataFrame, metric: str = "loss"):
    """Held-out `metric` per dataset per round; the mean over clients with its 95% band."""
    alt = _alt()
    df = df.dropna(subset=[metric])
    base = alt.Chart(df).encode(x=alt.X("round:Q", axis=alt.Axis(tickMinStep=1)))
    band = (
        base.transform_filter(alt.datum.role == "mean")
        .mark_area(opacity=0.2)
        .encode(y=alt.Y(f"{metric}_lo:Q", title=metric), y2=f"{metric}_hi:Q")
    )
    lines = base.mark_line(point=True).encode(
        y=f"{metric}:Q",
        color="dataset:N",
        strokeDash=alt.StrokeDash("role:N", sort=["mean", "client", "eval_only"]),
        tooltip=[
            "round",
            "dataset",
            "role",
            alt.Tooltip(f"{metric}:Q", format=".4g"),
            alt.Tooltip(f"{metric}_lo:Q", format=".4g"),
            alt.Tooltip(f"{metric}_hi:Q", format=".4g"),
        ],
    )
    return (band + lines).properties(width=420, height=260, title=f"held-out {metric}")


def rollout_chart(df: pd.DataFrame):
    """Closed-loop success per lab (Wilson 95% interval): the starting model (round 0, when it was
    evaluated) against the last evaluated round, side by side."""
    alt = _alt()
    rounds = sorted({int(df["round"].min()), int(df["round"].max())})
    shown = df[df["round"].isin(rounds)].assign(when=lambda d: d["round"].map(lambda r: f"round {r}"))
    base = alt.Chart(shown).encode(y=alt.Y("lab:N", title=None), yOffset="when:N")
    bars = base.mark_bar().encode(
        x=alt.X("success_rate:Q", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("when:N", title=None),
        tooltip=["lab", "when", alt.Tooltip("success_rate:Q", format=".0%"), "episodes"],
    )
    rules = base.mark_rule().encode(x="success_lo:Q", x2="success_hi:Q")
    labs = shown["lab"].nunique()
    return (bars + rules).properties(width=360, height=22 * len(rounds) * max(1, labs), title="closed-loop success")


def compare_chart(df: pd.DataFrame, metric: str = "loss"):
    """Per-round mean held-out `metric` of several runs (federated vs centralized vs local-only)."""
    alt = _alt()
    return (
        alt.Chart(df.dropna(subset=[metric]))
        .mark_line(point=True)
        .encode(
            x=alt.X("round:Q", axis=alt.Axis(tickMinStep=1)),
            y=f"{metric}:Q",
            color="run_id:N",
            strokeDash="kind:N",
            tooltip=["run_id", "kind", "round", alt.Tooltip(f"{metric}:Q", format=".4g")],
        )
        .properties(width=480, height=280, title=f"mean held-out {metric} per round")
    )


def privacy_frame(runs: list[RunRecord]) -> pd.DataFrame:
    """What a privacy budget costs and what it hides, one row per run: epsilon (None without DP), the final
    held-out loss, closed-loop success and the membership-inference AUC (`zk0 audit`), with their intervals."""
    rows = []
    for run in runs:
        s = run.summary()
        rollout = (s.get("final_rollout") or {}).get("clients") or {}
        member = s.get("membership") or {}
        eps = (s.get("privacy") or {}).get("epsilon")
        lo, hi = rollout.get("success_ci") or (None, None)
        auc_lo, auc_hi = member.get("auc_ci") or (None, None)
        rows.append(
            {
                "run_id": run.run_id,
                "budget": "no DP" if eps is None else f"epsilon {eps:.3g}",
                "epsilon": eps,
                "final_loss": (s.get("final") or {}).get("loss"),
                "success_rate": rollout.get("success_rate"),
                "success_lo": lo,
                "success_hi": hi,
                "membership_auc": member.get("auc"),
                "membership_lo": auc_lo,
                "membership_hi": auc_hi,
            }
        )
    df = pd.DataFrame(rows)
    return df.sort_values("epsilon", na_position="last").reset_index(drop=True) if rows else df


def privacy_chart(df: pd.DataFrame, metric: str = "success_rate"):
    """Closed-loop success (`success_rate`) or the membership-inference AUC (`membership_auc`) against the
    privacy budget (smaller epsilon: more private), each run a point with its 95% interval; runs without DP on
    the right."""
    alt = _alt()
    lo, hi, title = {
        "success_rate": ("success_lo", "success_hi", "closed-loop success"),
        "membership_auc": ("membership_lo", "membership_hi", "membership-inference AUC (0.5: chance)"),
    }[metric]
    shown = df.dropna(subset=[metric])
    base = alt.Chart(shown).encode(x=alt.X("budget:N", sort=list(dict.fromkeys(df["budget"])), title=None))
    points = base.mark_point(filled=True, size=60).encode(
        y=alt.Y(f"{metric}:Q", scale=alt.Scale(domain=[0, 1]), title=title),
        color="run_id:N",
        tooltip=["run_id", "budget", alt.Tooltip(f"{metric}:Q", format=".3f")],
    )
    return (base.mark_rule().encode(y=f"{lo}:Q", y2=f"{hi}:Q", color="run_id:N") + points).properties(
        width=300, height=220
    )


def save_chart(chart: Any, directory: Path, name: str) -> Path:
    """The chart's Vega-Lite spec (data included) as JSON, beside the run it comes from."""
    path = Path(directory) / f"{name}.vl.json"
    atomic_write_text(path, chart.to_json())
    return path


# ----------------------------------------------------------------------------- datasets


def client_summary(cfg: Any) -> pd.DataFrame:
    """One row per client (and evaluation-only) dataset: what it holds."""
    from zk0lib import data

    rows = []
    entries = [(i, c, "client") for i, c in enumerate(cfg.data.clients)]
    entries += [(i, c, "eval_only") for i, c in enumerate(cfg.data.eval_only)]
    for i, spec, role in entries:
        client = data.open_client(cfg, i) if role == "client" else data.open_eval_only(cfg, i)
        meta = client.meta
        feats = meta.features
        rows.append(
            {
                "client": spec.name,
                "role": role,
                "source": spec.source,
                "dataset": client.repo_id,
                "episodes": meta.total_episodes,
                "frames": meta.total_frames,
                "fps": meta.fps,
                "train_episodes": len(client.train_episodes),
                "val_episodes": len(client.val_episodes),
                "heldout_episodes": len(client.heldout_episodes),
                "tasks": "; ".join(sorted(set(meta.tasks.index))) if meta.tasks is not None else "",
                "cameras": ", ".join(k.split(".")[-1] for k in meta.camera_keys),
                "image_shape": "x".join(map(str, feats[meta.camera_keys[0]]["shape"])) if meta.camera_keys else "",
                "state_dim": feats.get("observation.state", {}).get("shape", [None])[0],
                "action_dim": feats.get("action", {}).get("shape", [None])[0],
                "robot_type": meta.robot_type,
                "root": str(client.root),
            }
        )
    return pd.DataFrame(rows)


def episode_frame(root: Path, episode: int) -> pd.DataFrame:
    """Per-frame joint states and actions of one episode, long format (frame, time, joint, kind, value)."""
    from zk0lib.validate import DatasetFiles

    files = DatasetFiles.read(root)
    sel = files.table[files.table["episode_index"] == episode]
    names = files.info["features"]["observation.state"].get("names") or [f"j{i}" for i in range(6)]
    rows = []
    for kind, key in (("state", "observation.state"), ("action", "action")):
        values = np.stack(sel[key].to_numpy())
        for j, name in enumerate(names):
            rows.append(
                pd.DataFrame(
                    {
                        "frame": sel["frame_index"].to_numpy(),
                        "time": sel["timestamp"].to_numpy(),
                        "joint": name,
                        "kind": kind,
                        "value": values[:, j],
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)


def joint_chart(df: pd.DataFrame, title: str = ""):
    """Six small charts, one per joint: recorded state and action (or predicted action) over time."""
    alt = _alt()
    return (
        alt.Chart(df)
        .mark_line()
        .encode(
            x=alt.X("time:Q", title="s"),
            y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
            color=alt.Color("kind:N"),
            tooltip=["frame", "joint", "kind", alt.Tooltip("value:Q", format=".3f")],
        )
        .properties(width=200, height=110)
        .facet(facet=alt.Facet("joint:N", title=None), columns=3, title=title)
        .resolve_scale(y="independent")
    )


def episode_images(repo_id: str, root: Path, episode: int, frames: list[int]) -> dict[str, list[np.ndarray]]:
    """Camera images (HxWx3 uint8) of some frames of an episode, decoded with lerobot."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(repo_id, root=root, episodes=[episode])
    out: dict[str, list[np.ndarray]] = {k: [] for k in ds.meta.camera_keys}
    for f in frames:
        item = ds[min(f, len(ds) - 1)]
        for k in out:
            out[k].append((item[k].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return out


def episode_browser(cfg: Any):
    """ipywidgets: pick a client and an episode -> camera frames and the 6 joints over time."""
    import ipywidgets as widgets
    from IPython.display import display
    from PIL import Image

    summary = client_summary(cfg)
    by_name = {row.client: row for row in summary.itertuples()}
    client_w = widgets.Dropdown(options=list(by_name), description="client")
    episode_w = widgets.Dropdown(description="episode")
    images_w = widgets.HBox()
    chart_w = widgets.Output()

    def show(*_: Any) -> None:
        row = by_name[client_w.value]
        if episode_w.value is None:
            return
        ep = int(episode_w.value)
        df = episode_frame(Path(row.root), ep)
        n = int(df.frame.max()) + 1
        pics = episode_images(row.dataset, Path(row.root), ep, [0, n // 2, n - 1])
        tiles = []
        for cam, imgs in pics.items():
            for img in imgs:
                buf = _png(Image.fromarray(img).resize((160, 160)))
                tiles.append(widgets.VBox([widgets.Label(cam.split(".")[-1]), widgets.Image(value=buf)]))
        images_w.children = tiles
        with chart_w:
            chart_w.clear_output()
            display(joint_chart(df, f"{row.client} episode {ep}"))

    def episodes(*_: Any) -> None:
        episode_w.options = list(range(int(by_name[client_w.value].episodes)))

    client_w.observe(episodes, "value")
    episode_w.observe(show, "value")
    episodes()
    return widgets.VBox([widgets.HBox([client_w, episode_w]), images_w, chart_w])


def _png(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
