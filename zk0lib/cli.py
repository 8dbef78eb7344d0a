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


def cmd_train(args: argparse.Namespace) -> int:
    from zk0lib.simulation import run_federated

    cfg = _config(args)
    t0 = time.perf_counter()
    print(
        f"zk0 train: preset {cfg.preset}, {len(cfg.data.clients)} clients, {cfg.fl.strategy}, "
        f"{cfg.fl.num_rounds} rounds x {cfg.train.local_steps} steps",
        flush=True,
    )
    result = run_federated(cfg, progress=lambda line: print(f"  {line}", flush=True))
    final = result.summary.get("final") or {}
    print(
        f"done in {time.perf_counter() - t0:.0f}s: eval loss {final.get('loss', float('nan')):.4f}, "
        f"action MAE {final.get('action_mae', float('nan')):.3f}"
    )
    print(f"run directory: {result.path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.flat:
        for key, value in flat_items(cfg).items():
            print(f"{key} = {value}")
    else:
        print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from zk0lib.model import smolvla_base_sizes

    print(json.dumps(smolvla_base_sizes(), indent=2))
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
    p.set_defaults(func=cmd_train)

    p = with_config(sub.add_parser("config", help="print the resolved config"))
    p.add_argument("--flat", action="store_true", help="one dotted key per line")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("model-info", help="parameter counts and bytes per round of smolvla_base (built offline)")
    p.set_defaults(func=cmd_model_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"zk0: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zk0: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI reports any failure as one clear line, not a traceback
        from zk0lib.data import DatasetNotAvailableError
        from zk0lib.model import ModelNotAvailableError
        from zk0lib.simulation import FederatedRunError

        if isinstance(e, (FederatedRunError, ModelNotAvailableError, DatasetNotAvailableError, FileExistsError)):
            print(f"zk0: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
