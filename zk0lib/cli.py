"""`zk0 ...`: thin commands over zk0lib."""

from __future__ import annotations

import argparse
import json
import sys
import time

from zk0lib.config import PRESETS, ConfigError, flat_items, load_config


def _config(args: argparse.Namespace):
    overrides = list(args.set or [])
    if getattr(args, "run_id", None):
        overrides.append(f"output.run_id={args.run_id}")
    return load_config(args.preset, overrides)


def _indented(line: str) -> None:
    print(f"  {line}", flush=True)


def _report(result, t0: float, how: str = "") -> int:
    """The last lines of a finished run: its final evaluation and where its record is."""
    final = result.summary.get("final") or {}
    print(
        f"done in {time.perf_counter() - t0:.0f}s{how}: eval loss {final.get('loss', float('nan')):.4f}, "
        f"action MAE {final.get('action_mae', float('nan')):.3f}"
    )
    print(f"run directory: {result.path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from zk0lib.fl.simulation import resume_federated, run_federated

    t0 = time.perf_counter()
    if args.resume:
        if args.set or args.run_id:
            raise ConfigError("--resume continues a run with its own config: leave out --set and --run-id")
        return _report(resume_federated(args.resume, progress=_indented), t0)
    cfg = _config(args)
    print(
        f"zk0 train: preset {cfg.preset}, {len(cfg.data.clients)} clients, {cfg.fl.strategy}, "
        f"{cfg.fl.num_rounds} rounds x {cfg.train.local_steps} steps",
        flush=True,
    )
    return _report(run_federated(cfg, progress=_indented), t0)


def cmd_baseline(args: argparse.Namespace) -> int:
    from zk0lib.baselines import budget, run_baseline

    cfg = _config(args)
    b = budget(cfg)
    print(f"zk0 baseline {args.kind}: preset {cfg.preset}, {b['total_samples']} samples ({b['total_steps']} steps)")
    t0 = time.perf_counter()
    return _report(run_baseline(args.kind, cfg, progress=_indented), t0)


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zk0lib.compare import compare, table_markdown

    t0 = time.perf_counter()
    record = compare(
        args.preset,
        [s.strip() for s in args.strategies.split(",") if s.strip()],
        [b.strip() for b in args.baselines.split(",") if b.strip()],
        args.seeds,
        list(args.set or []),
        args.compare_id or "",
        progress=lambda line: print(line, flush=True),
    )
    import pandas as pd

    print()
    print(table_markdown(pd.DataFrame(record["table"])))
    failed = [r for r in record["runs"] if r["status"] != "completed"]
    print(f"\n{len(record['runs'])} runs in {(time.perf_counter() - t0) / 60:.1f} min, {len(failed)} failed")
    print(f"  {Path(record['out']) / 'table.md'}, compare.json, runs/")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from zk0lib import bench
    from zk0lib.env import quiet

    quiet()
    name = args.bench_command
    if name == "comms":
        result = bench.bench_comms(args.run)
        text = bench.comms_markdown(result)
    elif name == "overhead":
        result = bench.bench_overhead(args.preset, list(args.set or []), args.repeats, progress=_indented)
        text = bench.overhead_markdown(result)
    elif name == "dataloader":
        result = bench.bench_dataloader(args.preset, list(args.set or []), args.batches)
        text = bench.dataloader_markdown(result)
    elif name == "train":
        sizes = tuple(int(x) for x in args.batch_sizes.split(","))
        caches = tuple(args.caches.split(","))
        result = bench.bench_train(args.preset, list(args.set or []), sizes, caches, args.steps, _indented)
        text = bench.train_markdown(result)
    else:
        sizes = tuple(int(x) for x in args.batch_sizes.split(","))
        result = bench.bench_gpu_step(sizes, args.steps)
        text = bench.gpu_step_markdown(result)
    path = bench.save(name, result)
    print(text)
    print(f"\n{path}")
    return 1 if name == "comms" and result.get("run") and not result["run"]["matches"] else 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from zk0lib.fl.deploy import check_refusals, deploy_local

    cfg = _config(args)
    t0 = time.perf_counter()
    if args.check_refusals:
        outcome = check_refusals(cfg)
        print(json.dumps(outcome, indent=2))
        joined = [n for n in outcome["superlink_nodes"] if str(n.get("status", "")).lower() == "online"]
        return 1 if joined else 0
    return _report(deploy_local(cfg, progress=_indented), t0, " over TLS with authenticated SuperNodes")


def cmd_rehearse(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zk0lib import rehearse
    from zk0lib.config import load_config as _load
    from zk0lib.config import zk0_home
    from zk0lib.env import quiet

    quiet()
    folder = Path(args.folder) if args.folder else _load("smoke").cache_dir / "rehearsal"
    engines = tuple(e for e in args.engines.split(",") if e)
    unknown = set(engines) - {"simulation", "deploy-local"}
    if unknown:
        raise SystemExit(f"--engines: unknown {sorted(unknown)}; choose simulation, deploy-local or both")
    report = rehearse.rehearse(folder, args.pretrained, args.device, engines, list(args.set or []), _indented)
    out = Path(args.out) if args.out else zk0_home() / "reports" / "rehearsal"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rehearsal.json").write_text(json.dumps(report, indent=2, default=str))
    text = rehearse.markdown(report)
    (out / "rehearsal.md").write_text(text)
    print(text)
    print(f"{out / 'rehearsal.md'}")
    return 0 if report["ready"] else 1


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.flat:
        for key, value in flat_items(cfg).items():
            print(f"{key} = {value}")
    else:
        print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def cmd_base(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zk0lib.base import BaseSpec, make_base
    from zk0lib.config import SHIPPED_BASE

    spec = BaseSpec.from_overrides(list(args.set or []))
    out = Path(args.out) if args.out else SHIPPED_BASE
    record = make_base(
        spec, out, log=_indented, part_minutes=args.part_minutes, part_steps=args.part_steps, fresh=args.fresh
    )
    if record is None:
        print(f"zk0 base: this part is done, the base is not; run the same command again to continue ({out})")
        return 3
    g, a = record["grounding"]["errors"]["heldout_lab"], record["aim"]
    print(f"zk0 base: {out} ({record['seconds']['total'] / 60:.1f} min)")
    print(
        f"  grounding on a held-out lab: cube {g['cube_cm']:.1f} cm (guessing the mean {g['cube_cm_if_mean']:.1f} cm)"
    )
    for where, v in a.items():
        print(f"  aim, {where}: pan {v['pan_error_deg']:.1f} deg (mean trajectory {v['pan_error_if_mean_deg']:.1f})")
    return 0


def cmd_estimator(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zk0lib.config import SHIPPED_BASE
    from zk0lib.estimator import EstimatorSpec, pretrain_estimator

    if args.evaluate:
        return _evaluate_estimator(args)
    if not args.out:
        raise ConfigError("zk0 estimator: --out FOLDER (where the base with its estimator goes), or --evaluate FOLDER")
    spec = EstimatorSpec.from_overrides(list(args.set or []))
    base = Path(args.base) if args.base else SHIPPED_BASE
    if not (base / "config.json").exists():
        print(f"zk0 estimator: --base {base} is not a policy folder (no config.json)", file=sys.stderr)
        return 2
    record = pretrain_estimator(spec, base, Path(args.out), log=_indented)
    print(
        f"zk0 estimator: {args.out} ({record['seconds']['total'] / 60:.1f} min, "
        f"{record['samples_per_s']:.0f} samples/s in training); use it with --set model.pretrained={args.out} "
        "--set model.estimate_environment_state=pixels [--set model.freeze_estimator=true]"
    )
    return 0


def _evaluate_estimator(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zk0lib.env import quiet, set_hub_offline
    from zk0lib.estimator import evaluate_estimator
    from zk0lib.runs import write_json

    quiet()
    set_hub_offline()  # the tokenizer and the recordings are local: no Hub lookups (and retries) offline
    cfg = load_config(args.preset)
    folder = _saved_policy(args.evaluate)
    errors = evaluate_estimator(folder, cfg)
    print(
        "| lab | cube, all frames (cm) | guessing the mean | cube, first frames | guessing the mean | target, first frames "
        "| first frames: the cube's estimate from the target |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, e in errors.items():
        a, f = e["all_frames"], e["first_frames"]
        print(
            f"| {name} | {a['cube_error_cm']:.1f} | {a['cube_error_if_mean_cm']:.1f} | {f['cube_error_cm']:.1f} | "
            f"{f['cube_error_if_mean_cm']:.1f} | {f['target_error_cm']:.1f} | {f['cube_estimate_to_target_cm']:.1f} |"
        )
    from zk0lib.estimator import ESTIMATOR_RECORD, colour_roles, roles_line

    pairs = [(e["cube_colour"], e["target_colour"]) for e in errors.values() if e["role"] == "client"]
    print(f"the preset's client labs: {roles_line(colour_roles(pairs))}")
    record = Path(folder) / ESTIMATOR_RECORD
    roles = json.loads(record.read_text()).get("colour_roles") if record.exists() else None
    if roles:  # the pretraining labs that give each client lab's colours the other role
        for name, e in errors.items():
            cube, target = roles.get(e["cube_colour"], {}), roles.get(e["target_colour"], {})
            print(
                f"  {name}: its {e['cube_colour']} cube is the target in {cube.get('target', 0)} pretraining labs, "
                f"its {e['target_colour']} target the cube in {target.get('cube', 0)}"
            )
    out = Path(folder) / "zk0_estimator_check.json" if args.check_out is None else Path(args.check_out)
    write_json(out, {"command": "zk0 " + " ".join(args.argv), "preset": args.preset, "labs": errors})
    print(f"zk0 estimator: {folder} on the preset {args.preset}'s recordings -> {out}")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from zk0lib.model import smolvla_base_sizes

    print(json.dumps(smolvla_base_sizes(), indent=2))
    return 0


def cmd_sim_record(args: argparse.Namespace) -> int:
    from zk0lib.config import zk0_home
    from zk0lib.sim.labs import LABS
    from zk0lib.sim.record import record_lab

    labs = list(LABS) if args.lab == "all" else [args.lab]
    for lab in labs:
        t0 = time.perf_counter()
        rec = record_lab(
            lab,
            args.episodes,
            zk0_home() / "data_cache",
            args.image_size,
            args.seed,
            args.workers,
            progress=lambda done, total, lab=lab: print(f"\r{lab}: {done}/{total} episodes", end="", flush=True),
        )
        print(
            f"\r{lab}: {rec.episodes} episodes ({rec.failed} failed expert attempts not saved), {rec.frames} frames, "
            f"{rec.frames_per_second:.1f} frames/s when recorded, {time.perf_counter() - t0:.1f} s now -> {rec.root}"
        )
    return 0


def cmd_sim_check(args: argparse.Namespace) -> int:
    from zk0lib.sim.labs import LABS
    from zk0lib.sim.record import check_expert
    from zk0lib.sim.rollout import wilson_interval

    labs = list(LABS) if args.lab == "all" else [args.lab]
    print(f"{'lab':<12} {'expert':>22} {'replay of its successes':>24} {'seconds':>8}")
    for lab in labs:
        t0 = time.perf_counter()
        result = check_expert(lab, args.episodes, args.seed)
        cells = []
        for key in ("expert", "replay"):
            wins, n = sum(result[key]), len(result[key])
            lo, hi = wilson_interval(wins, n)
            cells.append(f"{wins}/{n} [{lo:.2f}, {hi:.2f}]")
        print(f"{lab:<12} {cells[0]:>22} {cells[1]:>24} {time.perf_counter() - t0:8.1f}")
    return 0


def cmd_sim_rollout(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zk0lib.sim.rollout import HoldStillPolicy, ScriptedExpertPolicy, rollout

    if args.policy == "expert":
        policy, processors = ScriptedExpertPolicy(), None
    elif args.policy == "still":
        policy, processors = HoldStillPolicy(), None
    else:
        from zk0lib.model import load_policy

        bundle = load_policy(args.policy, args.device)
        policy, processors = bundle.policy, (bundle.preprocessor, bundle.postprocessor)
    result = rollout(
        policy,
        processors,
        args.lab,
        args.episodes,
        seed=args.seed,
        image_size=args.image_size,
        max_frames=args.max_frames,
        video_dir=Path(args.videos) if args.videos else None,
        device=args.device,
    )
    print(json.dumps(result["summary"], indent=2))
    return 0


def _int_list(text: str, flag: str) -> list[int | None]:
    """'10,5' -> [10, 5]; '' -> [None] (keep the saved value)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()] or [None]
    except ValueError as e:
        raise ConfigError(f"{flag} {text!r}: give whole numbers separated by commas, e.g. {flag} 10,5") from e


def _saved_policy(path: str):
    """A --policy folder, refused with the fix unless a saved policy is there."""
    from pathlib import Path

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--policy {folder}: no saved policy there (a folder with config.json and model.safetensors)"
        )
    return folder


def cmd_sim_variants(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zk0lib.env import quiet
    from zk0lib.sim.reference import inference_variants

    quiet()
    cfg = _config(args)
    folder = _saved_policy(args.policy)
    variants = [
        {"n_action_steps": n, "denoise_steps": k}
        for n in _int_list(args.n_action_steps, "--n-action-steps")
        for k in _int_list(args.denoise_steps, "--denoise-steps")
    ]
    out = Path(args.out) if args.out else folder.parent / "closed-loop-variants"
    episodes = args.episodes or cfg.eval.rollout_episodes
    if episodes < 1:
        raise ConfigError("--episodes: at least one closed-loop episode per lab")
    t0 = time.perf_counter()
    command = "zk0 " + " ".join(args.argv)
    inference_variants(cfg, folder, variants, episodes, out, args.device, command, _indented)
    print((out / "variants.md").read_text())
    print(f"zk0 sim variants: {(time.perf_counter() - t0) / 60:.1f} min -> {out}/variants.json, variants.md")
    return 0


def cmd_sim_aim(args: argparse.Namespace) -> int:
    """Does a saved policy aim at the cube from images? Its first chunk's shoulder_pan at held-out cube
    positions against the expert's, per policy, in the preset's client labs and lab-unseen."""
    from pathlib import Path

    from zk0lib.config import zk0_home
    from zk0lib.env import quiet
    from zk0lib.evaluation import sim_labs
    from zk0lib.model import load_policy
    from zk0lib.runs import write_json
    from zk0lib.sim.labs import get_lab
    from zk0lib.sim.rollout import aim_error

    quiet()
    cfg = _config(args)
    if args.episodes < 1:
        raise ConfigError("--episodes: at least one held-out cube position per lab")
    folders = [_saved_policy(x) for x in args.policy]
    labs = [get_lab(spec.lab) for spec, _ in sim_labs(cfg).values()]
    if not labs:
        raise ConfigError(f"preset {args.preset}: no simulated lab among its datasets; aim is measured in the labs")
    rows = []
    names = " / ".join(lab.name for lab in labs)
    print(
        f"| policy | pan error (deg) | mean-trajectory bar | pan correlation | pan spread / expert's | per lab: {names} |"
    )
    print("|---|---|---|---|---|---|")
    for folder in folders:
        a = aim_error(load_policy(folder, device=args.device), labs, args.episodes, cfg.seed, cfg.data.sim_image_size)
        rows.append({"policy": str(folder), **a})
        per_lab = " / ".join(f"{v['pan_error_deg']:.1f}" for v in a["labs"].values())
        print(
            f"| {folder} | {a['pan_error_deg']:.1f} | {a['pan_error_if_mean_deg']:.1f} | {a['pan_correlation']:.2f} "
            f"| {a['pan_spread_deg']:.1f} / {a['expert_pan_spread_deg']:.1f} | {per_lab} |",
            flush=True,
        )
        if "cube_error_cm" in a:  # a policy with a state estimator: how well it locates the cube and target
            per_lab = " / ".join(f"{v['cube_error_cm']:.1f}" for v in a["labs"].values())
            print(
                f"|   its state estimator: cube {a['cube_error_cm']:.1f} cm (guessing the mean "
                f"{a['cube_error_if_mean_cm']:.1f}), target {a['target_error_cm']:.1f} cm "
                f"({a['target_error_if_mean_cm']:.1f}) | | | | cube per lab: {per_lab} |",
                flush=True,
            )
    out = Path(args.out) if args.out else zk0_home() / "reports" / "aim" / f"{args.preset}.json"
    write_json(out, {"command": "zk0 " + " ".join(args.argv), "episodes_per_lab": args.episodes, "rows": rows})
    print(f"zk0 sim aim: {args.episodes} held-out cube positions per lab -> {out}")
    return 0


def cmd_sim_reference(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zk0lib.env import quiet
    from zk0lib.sim.reference import ReferenceSpec, calibrate

    quiet()
    cfg = _config(args)
    try:
        specs = [
            ReferenceSpec(
                head=head,
                environment=args.environment,
                chunk=args.chunk,
                n_action_steps=args.n_action_steps or args.chunk,
                samples=int(float(samples)),
                batch_size=args.batch_size,
                denoise_steps=args.denoise_steps,
                seed=cfg.seed,
            )
            for head in args.heads.split(",")
            for samples in args.samples.split(",")
        ]
    except ValueError as e:
        raise ConfigError(str(e)) from e
    out = Path(args.out or f"reports/reference/{cfg.preset}")
    t0 = time.perf_counter()
    command = "zk0 " + " ".join(args.argv)
    record = calibrate(cfg, specs, args.episodes, out, not args.no_baselines, args.max_frames, command, _indented)
    print((out / "reference.md").read_text())
    proxy = record.get("proxy", {})
    if proxy.get("spearman") is not None:
        print(
            f"held-out chunk error vs closed-loop success over {proxy['rows']} rows: Spearman {proxy['spearman']:.2f}"
        )
    print(f"zk0 sim reference: {(time.perf_counter() - t0) / 60:.1f} min -> {out}/reference.json, reference.md")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from zk0lib.env import quiet, use_offline_hub_if_possible
    from zk0lib.validate import check_before_training, config_for_datasets, validate_clients

    quiet()
    cfg = _config(args)
    if args.datasets:
        try:
            cfg = config_for_datasets(cfg, args.datasets)
        except ValueError as e:
            print(f"zk0 validate: {e}", file=sys.stderr)
            return 2
    use_offline_hub_if_possible(cfg)
    t0 = time.perf_counter()
    decode = {"off": "none"}.get(args.decode, args.decode)
    report = validate_clients(cfg, decode=decode, fraction=args.fraction, sources=True)
    print(report.table(max_rows=args.max_rows))
    _print_decode_speed(report)
    name = args.name or ("datasets" if args.datasets else cfg.preset)
    csv_path, _ = report.save(cfg.home / "reports" / "validation", name)
    print(f"findings: {csv_path} (and .json); {time.perf_counter() - t0:.1f} s")
    if args.repair and report.errors:
        cfg.data.repair, cfg.data.allow_invalid, cfg.data.validate = True, True, decode
        repaired = check_before_training(cfg, progress=lambda line: print(line, flush=True))
        print(f"after repair: {len(repaired.errors)} errors, {len(repaired.warnings)} warnings")
        repaired.save(cfg.home / "reports" / "validation", f"{name}-repaired")
        return 1 if repaired.errors else 0
    return 1 if report.errors else 0


def _print_decode_speed(report) -> None:
    for c in report.checked:
        if c["decoded_frames"]:
            per_1000 = c["decode_seconds"] / (c["decoded_frames"] / 1000)
            print(
                f"  {c['client']}: decoded {c['decoded_frames']} frames x camera ({c['decode']}) in "
                f"{c['decode_seconds']:.1f} s = {per_1000:.2f} s per 1000 frames per camera"
            )


def cmd_workbook(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zk0lib.batch import run_workbook
    from zk0lib.config import parse_overrides, zk0_home
    from zk0lib.workbook import NOTEBOOKS

    load_config(args.preset, list(args.set or []))  # refuse a bad config before starting any notebook
    out = Path(args.out) if args.out else zk0_home() / "reports" / args.preset
    chosen = tuple(n for n in NOTEBOOKS if not args.only or any(n.startswith(o) for o in args.only))
    t0 = time.perf_counter()
    result = run_workbook(
        args.preset, out, parse_overrides(list(args.set or [])), chosen, progress=lambda line: print(line, flush=True)
    )
    print(f"\nworkbook done in {(time.perf_counter() - t0) / 60:.1f} min")
    print(f"  executed notebooks: {result['out']}")
    print(f"  run record:         {result['run']}")
    print(f"  results table:      {Path(result['out']) / 'results' / 'runs.md'}")
    print(f"  report (offline):   {result['report']}  <- open this in a browser")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zk0lib.page import write_report
    from zk0lib.runs import find_runs

    root = Path(args.folder)
    page = write_report(root, Path(args.out) if args.out else None, args.title or "")
    print(f"zk0 report: {len(find_runs(root))} runs under {root} -> {page}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from zk0lib.batch import sweep
    from zk0lib.config import parse_overrides

    record = sweep(
        args.preset,
        args.grid or [],
        parse_overrides(list(args.set or [])),
        args.sweep_id or "",
        videos=args.videos,
        progress=lambda line: print(line, flush=True),
    )
    failed = [p for p in record["points"] if p["status"] != "completed"]
    print(f"\nsweep {record['sweep_id']}: {len(record['points']) - len(failed)} completed, {len(failed)} failed")
    print(f"  {record['out']}/sweep.json, runs.md, 04_results_tables.ipynb")
    return 1 if failed else 0


def cmd_app_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zk0lib.appcheck import check_app
    from zk0lib.config import zk0_home
    from zk0lib.runs import find_runs

    runs_dir = Path(args.runs_dir) if args.runs_dir else zk0_home() / "reports"
    found = find_runs(runs_dir)
    if not found:
        print(f"zk0: no runs under {runs_dir}; run `make demo` or `zk0 train --preset smoke` first", file=sys.stderr)
        return 1
    newest = max(found, key=lambda r: r.summary().get("started_at", ""))
    shot = Path(args.screenshot) if args.screenshot else zk0_home() / "reports" / "app-check.png"
    result = check_app(runs_dir, shot, expect=newest.run_id)
    print(
        f"the results app found {len(found)} runs under {runs_dir} and listed the newest, {newest.run_id} "
        f"({newest.path}), in {result['seconds']:.0f} s; screenshot: {result['screenshot']}"
    )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from zk0lib.hub import PublishError, publish

    try:
        result = publish(
            args.run_dir,
            args.repo_id,
            dry_run=args.dry_run,
            checkpoint=args.checkpoint,
            private=args.private,
            out=args.out,
        )
    except PublishError as e:
        print(f"zk0: {e}", file=sys.stderr)
        return 1
    if result["uploaded"]:
        print(f"uploaded {result['folder']} -> {result['url']}")
    else:
        print(f"dry run: the folder to upload is {result['folder']} (README.md is the model card)")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from zk0lib.env import quiet
    from zk0lib.membership import audit, describe

    quiet()
    reference = None if args.reference == "none" else args.reference
    for run_dir in args.run_dir:
        result = audit(
            run_dir,
            members_per_client=args.members,
            frames_per_episode=args.frames,
            reference=reference,
            device=args.device,
            progress=_indented,
        )
        for line in describe(result):
            print(line, flush=True)
        print(f"  -> {run_dir}/membership.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zk0", description="Federated fine-tuning of SmolVLA with Flower")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--preset", default="demo", help=f"one of {', '.join(PRESETS)} (default: demo)")
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config value by its dotted key, e.g. --set fl.num_rounds=3 (repeatable)",
        )
        return p

    p = with_config(sub.add_parser("train", help="run a federated fine-tuning (Flower simulation)"))
    p.add_argument("--run-id", help="name of the run folder under output.runs_dir (default: time-preset-xxxx)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run after its last complete round")
    p.set_defaults(func=cmd_train)

    p = with_config(sub.add_parser("baseline", help="a centralized or local-only run on the federated budget"))
    p.add_argument("kind", choices=("centralized", "local-only"))
    p.add_argument("--run-id", help="name of the run folder under output.runs_dir")
    p.set_defaults(func=cmd_baseline)

    p = with_config(sub.add_parser("compare", help="federated strategies vs centralized and local-only, same seeds"))
    p.add_argument("--strategies", default="fedavg,fedprox,fedadam", help="comma-separated (default: %(default)s)")
    p.add_argument("--baselines", default="centralized,local-only", help="comma-separated; empty for none")
    p.add_argument("--seeds", type=int, default=1, help="seeds per row: seed, seed+1, ... (default: 1)")
    p.add_argument("--compare-id", help="folder name under reports/compare")
    p.set_defaults(func=cmd_compare)

    bench = sub.add_parser("bench", help="measure zk0's costs (results in reports/bench/)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("comms", help="bytes per client per round: smolvla_base, the tiny model, a real run")
    p.add_argument("--run", help="a federated run folder (default: the latest completed one)")
    p.set_defaults(func=cmd_bench)
    p = with_config(bench_sub.add_parser("overhead", help="federated vs centralized samples/s, federated time split"))
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs, alternating which goes first; the median")
    p.set_defaults(func=cmd_bench)
    p = with_config(bench_sub.add_parser("dataloader", help="decoded samples/s vs samples/s training consumes"))
    p.add_argument("--batches", type=int, default=30)
    p.set_defaults(func=cmd_bench)
    p = with_config(bench_sub.add_parser("train", help="training samples/s per cache and batch size, a step's parts"))
    p.add_argument("--batch-sizes", default="8,32,64")
    p.add_argument("--caches", default="none,frames,features", help="none, frames, features (comma-separated)")
    p.add_argument("--steps", type=int, default=10)
    p.set_defaults(func=cmd_bench)
    p = bench_sub.add_parser("gpu-step", help="smolvla_base-sized bf16 training step (CUDA; skipped without)")
    p.add_argument("--batch-sizes", default="8,32,64")
    p.add_argument("--steps", type=int, default=10)
    p.set_defaults(func=cmd_bench)

    p = with_config(
        sub.add_parser(
            "deploy-local", help="run on Flower's Deployment Engine on 127.0.0.1 with TLS and SuperNode auth"
        )
    )
    p.add_argument("--run-id", help="name of the run folder under output.runs_dir")
    p.add_argument(
        "--check-refusals", action="store_true", help="show that unauthorized and plaintext nodes are refused"
    )
    p.set_defaults(func=cmd_deploy_local)

    p = with_config(sub.add_parser("config", help="print the resolved config"))
    p.add_argument("--flat", action="store_true", help="one dotted key per line")
    p.set_defaults(func=cmd_config)

    p = with_config(sub.add_parser("validate", help="check the config's datasets (and repair them)"))
    p.add_argument(
        "--decode",
        choices=("full", "sample", "off"),
        default="full",
        help="decode every video frame (full, default), a share of them (sample) or none",
    )
    p.add_argument(
        "datasets",
        nargs="*",
        metavar="PATH_OR_REPO_ID",
        help="check these datasets (folders, or Hub ids in the local cache) instead of the preset's clients",
    )
    p.add_argument("--fraction", type=float, default=0.1, help="share of frames decoded in sample mode")
    p.add_argument("--repair", action="store_true", help="write repaired copies under data_cache/repaired")
    p.add_argument("--name", help="report name under reports/validation (default: the preset)")
    p.add_argument("--max-rows", type=int, default=40)
    p.set_defaults(func=cmd_validate)

    p = with_config(sub.add_parser("workbook", help="run notebooks 01 -> 04 with papermill into one folder"))
    p.add_argument("--out", help="folder for the executed notebooks and results (default: reports/<preset>)")
    p.add_argument("--only", action="append", help="run only the notebooks starting with this (e.g. 01), repeatable")
    p.set_defaults(func=cmd_workbook)

    p = with_config(sub.add_parser("sweep", help="notebook 02 per grid point (papermill), then 04 over them"))
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="a config key and its values (repeatable)")
    p.add_argument("--sweep-id", help="folder name under reports/sweeps")
    p.add_argument("--videos", action="store_true", help="also run notebook 03 for every point")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="one offline HTML page of every run (and notebook 01's checks) under a folder")
    p.add_argument("folder", help="a reports folder, e.g. reports/demo or reports")
    p.add_argument("--out", help="where to write the page (default FOLDER/index.html)")
    p.add_argument("--title", help="the page's title")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("app-check", help="serve the marimo results app headless and load it in headless Chromium")
    p.add_argument("--runs-dir", help="a folder searched for runs at any depth (default: reports)")
    p.add_argument("--screenshot", help="default: reports/app-check.png")
    p.set_defaults(func=cmd_app_check)

    p = sub.add_parser("publish", help="a run's policy + model card + metrics, uploaded to the Hub")
    p.add_argument("run_dir")
    p.add_argument("--repo-id", required=True, help="user/name on the Hugging Face Hub")
    p.add_argument("--dry-run", action="store_true", help="only write the folder")
    p.add_argument("--checkpoint", choices=("final", "best"), default="final")
    p.add_argument("--private", action="store_true")
    p.add_argument("--out", help="folder to write (default: <run>/publish/<repo>)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "audit", help="membership inference on a run's final policy: does it leak its training episodes?"
    )
    p.add_argument("run_dir", nargs="+", help="run folders (reports/runs/<run-id>)")
    p.add_argument("--members", type=int, default=20, help="training episodes scored per client (seeded sample)")
    p.add_argument("--frames", type=int, default=16, help="evenly spaced frames scored per episode")
    p.add_argument(
        "--reference",
        default="pretrained",
        help="policy that calibrates each episode's difficulty: pretrained (the run's model.pretrained), a saved "
        "policy folder, or none",
    )
    p.add_argument("--device", help="default: the run's model.device")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("base", help="pretrain the tiny SmolVLA base on simulated community labs")
    p.add_argument("--out", help="policy folder to write (default: the shipped zk0lib/assets/tiny-base)")
    p.add_argument(
        "--part-minutes",
        type=float,
        help="end this part after the chunk of action steps that passes M minutes (exit code 3); the same "
        "command again continues from the last chunk, e.g. until zk0 base --part-minutes 40 ...; do :; done",
    )
    p.add_argument("--part-steps", type=int, help="end this part after N more action steps (whole chunks)")
    p.add_argument("--fresh", action="store_true", help="start over, discarding this base's saved progress")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a BaseSpec field, e.g. --set action_steps=3000")
    p.set_defaults(func=cmd_base)

    p = sub.add_parser(
        "estimator", help="pretrain a pixel state estimator on the community labs, into a copy of a base folder"
    )
    p.add_argument("--base", help="policy folder to copy (default: the shipped zk0lib/assets/tiny-base)")
    p.add_argument("--out", help="folder to write: the base with the estimator beside it")
    p.add_argument(
        "--evaluate",
        metavar="FOLDER",
        help="instead of training: a saved estimator's errors (all frames, first frames) on a preset's recordings",
    )
    p.add_argument("--preset", default="study", help="with --evaluate: whose simulated labs (default: study)")
    p.add_argument("--check-out", help="with --evaluate: the JSON to write (default: FOLDER/zk0_estimator_check.json)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="an EstimatorSpec field, e.g. --set steps=3000")
    p.set_defaults(func=cmd_estimator)

    p = sub.add_parser(
        "rehearse", help="the real loading path at full size (smolvla_base-shaped, offline) through both engines"
    )
    p.add_argument("--pretrained", help="a real policy (lerobot/smolvla_base, downloaded) instead of the stand-ins")
    p.add_argument("--device", default="cpu", help="cpu or cuda (a GPU machine's readiness check)")
    p.add_argument("--engines", default="simulation,deploy-local", help="simulation, deploy-local or both")
    p.add_argument("--folder", help="where the stand-ins are built (default: data_cache/rehearsal)")
    p.add_argument("--out", help="report folder (default: reports/rehearsal)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a config override of the rehearsal's runs")
    p.set_defaults(func=cmd_rehearse)

    p = sub.add_parser("model-info", help="parameter counts and bytes per round of smolvla_base (built offline)")
    p.set_defaults(func=cmd_model_info)

    sim = sub.add_parser("sim", help="simulated SO-101 labs").add_subparsers(dest="sim_command", required=True)
    p = sim.add_parser("record", help="record a lab's expert demonstrations as a LeRobot dataset (cached)")
    p.add_argument("--lab", required=True, help="a lab name, or all")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0, help="simulating processes; 0 (default): as many as pay")
    p.set_defaults(func=cmd_sim_record)
    p = sim.add_parser("check", help="expert success and open-loop replay success over seeded episodes")
    p.add_argument("--lab", default="all")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sim_check)
    p = sim.add_parser("rollout", help="closed-loop evaluation of a policy folder (or expert/still) in a lab")
    p.add_argument("--lab", required=True)
    p.add_argument("--policy", required=True, help="a lerobot policy folder, or 'expert', or 'still'")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--max-frames", type=int, default=450)
    p.add_argument("--videos", help="folder for an mp4 per episode")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sim_rollout)
    p = with_config(
        sim.add_parser(
            "reference",
            help="calibrate the benchmark: an MLP told the cube's and target's positions, trained on the preset's "
            "client datasets and rolled out in every client lab and lab-unseen, next to the expert and hold-still",
        )
    )
    p.add_argument("--heads", default="mse,flow", help="mse, flow or both (comma-separated)")
    p.add_argument("--samples", default="24000,384000", help="training budgets in samples seen (comma-separated)")
    p.add_argument("--environment", default="start", choices=("start", "live", "none"))
    p.add_argument("--chunk", type=int, default=12, help="frames predicted per call")
    p.add_argument("--n-action-steps", type=int, help="frames played before predicting again (default: chunk)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--denoise-steps", type=int, default=5)
    p.add_argument("--episodes", type=int, default=20, help="closed-loop episodes per lab")
    p.add_argument("--max-frames", type=int, help="frames per closed-loop episode (default: eval.rollout_max_frames)")
    p.add_argument("--no-baselines", action="store_true", help="leave out the expert and hold-still rows")
    p.add_argument("--out", help="default: reports/reference/<preset>")
    p.set_defaults(func=cmd_sim_reference)
    p = with_config(
        sim.add_parser(
            "aim",
            help="does a saved policy aim at the cube? its first chunk's pan at held-out cube positions against "
            "the expert's, next to the mean trajectory's error, in the preset's labs",
        )
    )
    p.add_argument("--policy", nargs="+", required=True, help="saved policy folders (a run's checkpoints/final)")
    p.add_argument("--episodes", type=int, default=10, help="held-out cube positions per lab")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="default: reports/aim/<preset>.json")
    p.set_defaults(func=cmd_sim_aim)
    p = with_config(
        sim.add_parser(
            "variants",
            help="a saved policy in every client lab and lab-unseen of the preset, once per inference setting "
            "(frames played per chunk, denoising steps), on the runs' own rollout seeds",
        )
    )
    p.add_argument(
        "--policy", required=True, help="a saved policy folder, e.g. reports/runs/<run-id>/checkpoints/final"
    )
    p.add_argument("--n-action-steps", default="", help="frames of a chunk played before predicting again, e.g. 10,5")
    p.add_argument("--denoise-steps", default="", help="Euler steps from noise, e.g. 5,10 (default: the saved value)")
    p.add_argument("--episodes", type=int, help="closed-loop episodes per lab (default: eval.rollout_episodes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="default: the policy folder's sibling closed-loop-variants/")
    p.set_defaults(func=cmd_sim_variants)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a record says produced it
    from zk0lib import env

    env.stop_cleanly_on_signals()
    if hasattr(sys.stdout, "reconfigure"):  # progress shows line by line through `| tee log` or a file too
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"zk0: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`zk0 config | head`): stop quietly, as Unix tools do on SIGPIPE
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (KeyboardInterrupt, env.Stopped) as e:
        how = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
        print(
            f"zk0: {how}; everything it started was stopped (a federated run continues after its last complete "
            "round with zk0 train --resume RUN_DIR)",
            file=sys.stderr,
        )
        return 130 if isinstance(e, KeyboardInterrupt) else 128 + e.signum
    except Exception as e:  # noqa: BLE001 - the CLI reports any failure as one clear line, not a traceback
        from zk0lib.data import DatasetNotAvailableError
        from zk0lib.launch import FederatedRunError
        from zk0lib.model import ModelNotAvailableError
        from zk0lib.validate import DatasetInvalidError

        if isinstance(
            e,
            (
                FederatedRunError,
                ModelNotAvailableError,
                DatasetNotAvailableError,
                FileExistsError,
                FileNotFoundError,
                DatasetInvalidError,
            ),
        ):
            print(f"zk0: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
