import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full", app_title="zk0 results")


@app.cell
def _():
    import os
    from pathlib import Path

    import marimo as mo
    import pandas as pd

    from zk0lib import report, runs
    from zk0lib.config import flat_items, zk0_home

    return Path, flat_items, mo, os, pd, report, runs, zk0_home


@app.cell
def _(mo):
    mo.md("""
    # zk0 results

    Every run recorded anywhere under the reports folder (the demo, compare, sweeps, `zk0 train`),
    federated, centralized and local-only side by side; `source` says which folder each came from.
    Pick runs in the table to compare their configs, their per-round curves and their videos. Nothing
    is re-run: everything comes from the run folders.
    """)
    return


@app.cell
def _(mo, os, zk0_home):
    runs_dir = mo.ui.text(
        value=os.environ.get("ZK0_RUNS_DIR", str(zk0_home() / "reports")),
        label="reports folder (searched for runs at any depth)",
        full_width=True,
    )
    runs_dir
    return (runs_dir,)


@app.cell
def _(Path, mo, report, runs_dir):
    table = report.runs_table(Path(runs_dir.value), recursive=True)
    if not table.empty:  # grouped by where they came from, oldest first within a group
        table = table.sort_values(["source", "started_at"], na_position="last", kind="stable").reset_index(drop=True)
    sources = ", ".join(f"{k} ({v})" for k, v in table["source"].value_counts(sort=False).items()) if len(table) else ""
    picker = (
        mo.ui.table(table, selection="multi", label=f"{len(table)} runs: {sources}", page_size=15)
        if not table.empty
        else None
    )
    picker if picker is not None else mo.md(f"No runs under `{runs_dir.value}` yet: `make demo` or `zk0 train`.")
    return picker, table


@app.cell
def _(Path, picker, runs, runs_dir, table):
    if picker is not None and len(picker.value):
        chosen_paths = list(picker.value["path"])
    else:  # nothing picked yet: the two newest runs
        chosen_paths = list(table.sort_values("started_at").path[-2:]) if len(table) else []
    chosen = [runs.RunRecord(Path(p)) for p in chosen_paths]

    def label(run):  # run ids repeat across sources (two compares both hold fedprox-s0): name by folder
        return runs.run_source(run, Path(runs_dir.value)) + "/" + run.run_id

    return chosen, label


@app.cell
def _(chosen, flat_items, label, mo, pd):
    def _config_diff():
        if len(chosen) < 2:
            return mo.md("Pick two or more runs to see how their configs differ.")
        flat = {label(r): flat_items(r.config()) for r in chosen}
        keys = sorted({k for f in flat.values() for k in f})
        rows = [
            {"key": k, **{rid: f.get(k) for rid, f in flat.items()}}
            for k in keys
            if len({str(f.get(k)) for f in flat.values()}) > 1
        ]
        return mo.vstack([mo.md("## Config differences"), mo.ui.table(pd.DataFrame(rows), selection=None)])

    _config_diff()
    return


@app.cell
def _(chosen, mo, report):
    def _curves():
        df = report.curves(chosen)
        if df.empty:
            return mo.md("No evaluated rounds in the chosen runs.")
        return mo.vstack(
            [
                mo.md("## Per-round curves (mean held-out loss and action error)"),
                mo.hstack(
                    [
                        mo.ui.altair_chart(report.compare_chart(df, "loss")),
                        mo.ui.altair_chart(report.compare_chart(df, "action_mae")),
                    ],
                    wrap=True,
                ),
            ]
        )

    _curves()
    return


@app.cell
def _(chosen, mo, report):
    def _privacy():
        df = report.privacy_frame(chosen)
        if df.empty or not df[["success_rate", "membership_auc"]].notna().any().any():
            return mo.md("")
        return mo.vstack(
            [
                mo.md(
                    "## Privacy: closed-loop success and membership-inference AUC against epsilon "
                    "(`zk0 audit` measures the AUC; 0.5 is chance)"
                ),
                mo.hstack(
                    [
                        mo.ui.altair_chart(report.privacy_chart(df, "success_rate")),
                        mo.ui.altair_chart(report.privacy_chart(df, "membership_auc")),
                    ],
                    wrap=True,
                ),
                mo.ui.table(df, selection=None),
            ]
        )

    _privacy()
    return


@app.cell
def _(chosen, label, mo, report):
    def _per_run():
        items = {}
        for run in chosen:
            parts = []
            ev = report.eval_frame(run)
            if not ev.empty:
                parts.append(report.eval_chart(ev, "loss"))
            tr = report.train_frame(run)
            if not tr.empty:
                parts.append(report.train_chart(tr))
            ro = report.rollout_frame(run)
            widgets = [mo.ui.altair_chart(c) for c in parts]
            if not ro.empty:
                widgets += [mo.ui.altair_chart(report.rollout_chart(ro)), mo.ui.table(ro, selection=None)]
            widgets.append(mo.ui.table(report.round_frame(run), selection=None, label="per round"))
            items[label(run)] = mo.vstack(widgets)
        return mo.vstack([mo.md("## Each run"), mo.accordion(items)]) if items else mo.md("")

    _per_run()
    return


@app.cell
def _(chosen, label, mo):
    def _videos():
        found = {label(run): sorted((run.path / "videos").rglob("*.mp4")) for run in chosen}
        found = {k: v for k, v in found.items() if v}
        if not found:
            return mo.md("No videos in the chosen runs (notebook 03 or `eval.rollout_videos=true` make them).")
        return mo.vstack(
            [
                mo.md("## Videos"),
                mo.accordion(
                    {
                        rid: mo.vstack(
                            [
                                mo.vstack([mo.md(f"`{p.relative_to(p.parents[2])}`"), mo.video(src=str(p), width=520)])
                                for p in paths[:12]
                            ]
                        )
                        for rid, paths in found.items()
                    }
                ),
            ]
        )

    _videos()
    return


if __name__ == "__main__":
    app.run()
