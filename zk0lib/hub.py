"""Publishing a run's policy: a folder lerobot loads, a model card with the run's real numbers, and the
metrics; uploaded with huggingface_hub unless it is a dry run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from zk0lib.config import BASE, TINY
from zk0lib.runs import RunRecord

RECORD_FILES = ("config.json", "summary.json", "metrics.jsonl", "validation.csv")


class PublishError(RuntimeError):
    """The run cannot be published (no checkpoint, no token, no network...), with what to do."""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ci(ci: list[float] | None, digits: int = 4) -> str:
    return "" if not ci or ci[0] is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _count(summary: dict[str, Any], key: str) -> str:
    value = (summary.get("parameters") or {}).get(key)
    return f"{value:,}" if isinstance(value, int) else "n/a"


def model_card(run: RunRecord, repo_id: str, checkpoint: str) -> Any:
    """A huggingface_hub ModelCard stating the run's configuration and its measured results."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg, summary, rounds = run.config(), run.summary(), run.rounds()
    env = json.loads((run.path / "config.json").read_text())["environment"]
    datasets = [c.repo_id if c.source != "sim" else f"zk0 simulated lab {c.lab}" for c in cfg.data.clients]
    hub_datasets = [c.repo_id for c in cfg.data.clients if c.source == "hub"]
    offline = {
        TINY: "a tiny SmolVLA with random weights (zk0 offline model)",
        BASE: "the zk0 tiny SmolVLA base, pretrained on simulated community labs (`zk0 base`)",
    }
    tiny = cfg.model.pretrained in offline  # no Hub model to name as the card's base_model
    base = offline.get(cfg.model.pretrained, cfg.model.pretrained)
    data = ModelCardData(
        license="apache-2.0",
        library_name="lerobot",
        pipeline_tag="robotics",
        tags=["lerobot", "smolvla", "robotics", "federated-learning", "flower", "zk0"]
        + (["lora", "peft"] if cfg.model.peft.method == "lora" else []),
        datasets=hub_datasets or None,
        base_model=None if tiny else cfg.model.pretrained,
        model_name=repo_id,
    )
    final, best = summary.get("final") or {}, summary.get("best") or {}
    f, t = cfg.fl, cfg.train
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_id}",
        "",
        f"SmolVLA fine-tuned with federated learning (Flower, {f.strategy}) across {len(cfg.data.clients)} robot "
        f"owners' datasets that were never pooled, with zk0, run `{run.run_id}`.",
        "",
        f"- Base model: {base}",
        f"- Datasets (one client each): {', '.join(datasets)}",
        f"- Evaluation-only datasets: {', '.join(c.name for c in cfg.data.eval_only) or 'none'}",
        f"- Checkpoint: `{checkpoint}`"
        + (
            f" (round {best.get('round')}, lowest mean {best.get('selected_on', 'test')} loss)"
            if checkpoint == "best"
            else ""
        ),
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| strategy | {f.strategy} (proximal mu {f.applied_mu}) |",
        f"| rounds x local optimizer steps | {f.num_rounds} x {t.local_steps} |",
        f"| batch size, learning rate | {t.batch_size}, {t.lr if t.lr is not None else 'policy preset'} |",
        f"| trainable / total parameters | {_count(summary, 'trainable')} / {_count(summary, 'total')} |",
        f"| weights exchanged | trainable only, {f.transport_dtype} |",
        f"| seed | {cfg.seed} |",
        f"| software | lerobot {env['packages'].get('lerobot')}, flwr {env['packages'].get('flwr')}, "
        f"torch {env['packages'].get('torch')}; zk0 commit {env['git'].get('commit') or 'n/a'} |",
        "",
        "## Results",
        "",
        "Held-out episodes of every client, evaluated by the server each round; round 0 is the model before "
        "training. Loss: flow-matching loss with noise and time fixed per frame. Action error: mean absolute "
        "error of sampled action chunks, in dataset units. Intervals: bootstrap 95% over episodes.",
        "",
        "| round | mean train loss | held-out loss [95% CI] | action MAE [95% CI] |",
        "|---|---|---|---|",
    ]
    for r in rounds:
        mean = r.get("eval", {}).get("mean", {})
        train_loss = r.get("train", {}).get("aggregate", {}).get("train_loss")
        lines.append(
            f"| {r['round']} | {_fmt(train_loss)} | {_fmt(mean.get('loss'))}{_ci(mean.get('loss_ci'))} | "
            f"{_fmt(mean.get('action_mae'), 3)}{_ci(mean.get('action_mae_ci'), 3)} |"
        )
    lines += [
        "",
        f"Final (round {final.get('round', 'n/a')}): held-out loss {_fmt(final.get('loss'))}"
        f"{_ci(final.get('loss_ci'))}, action MAE {_fmt(final.get('action_mae'), 3)}"
        f"{_ci(final.get('action_mae_ci'), 3)}.",
    ]
    rollout = summary.get("final_rollout")
    if rollout:
        lines += [
            "",
            "Closed loop in the simulated labs (Wilson 95% intervals):",
            "",
            "| lab | episodes | success [95% CI] | furthest stage |",
            "|---|---|---|---|",
        ]
        for lab, s in rollout["labs"].items():
            lines.append(
                f"| {lab} | {s['episodes']} | {s['success_rate']:.2f}{_ci(s['success_ci'], 2)} | "
                f"{s['furthest_stage']} |"
            )
    lines += [
        "",
        "## How to load it",
        "",
        "```python",
        *(
            [
                "from zk0lib.model import ensure_tiny_vlm",
                "ensure_tiny_vlm()  # its VLM config lives in the local cache",
                "",
            ]
            if tiny
            else []
        ),
        "from lerobot.policies.factory import make_pre_post_processors",
        "from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy",
        "",
        f'policy = SmolVLAPolicy.from_pretrained("{repo_id}")',
        f'preprocessor, postprocessor = make_pre_post_processors(policy.config, pretrained_path="{repo_id}")',
        "```",
        "",
        "The normalization stats in the processors are the federation's: lerobot's count-weighted merge of the "
        "clients' dataset stats.",
        "",
        *_adapter_section(cfg, summary, repo_id, base, tiny),
        "## Limitations",
        "",
        "Numbers above are what this run measured, on the clients' own held-out episodes (and simulated labs when "
        "listed); they say nothing about other robots, cameras or tasks."
        + (" This is a tiny demonstration model trained on CPU, not a usable policy." if tiny else ""),
        "",
        "## License",
        "",
        "Apache-2.0 (the model card and weights produced by this run); see the base model and datasets for theirs.",
        "",
        "`zk0_run/` holds the run's config (with package versions and commit), per-round metrics and summary.",
    ]
    return ModelCard("\n".join(lines))


def _adapter_section(cfg: Any, summary: dict[str, Any], repo_id: str, base: str, tiny: bool) -> list[str]:
    """For a LoRA run: what the adapter is, that it alone travelled, and how to apply it to its base."""
    peft = cfg.model.peft
    if peft.method != "lora":
        return []
    targets = peft.target_modules or "SmolVLA's default PEFT targets (lerobot)"
    load = (
        "the same base (its folder, as `zk0 base` writes it)"
        if tiny
        else f'`SmolVLAPolicy.from_pretrained("{cfg.model.pretrained}")`'
    )
    return [
        "## LoRA adapter",
        "",
        f"This policy is {base} with LoRA adapters (rank {peft.r}, alpha {peft.alpha or 'peft default, 8'}, "
        f"targets: {targets}"
        + (f"; trained in full: {peft.full_training_modules}" if peft.full_training_modules else "")
        + f"), {_count(summary, 'trainable')} trainable parameters: the only weights the owners trained and "
        "exchanged. The folder's weights are the base with the adapters merged in (loaded as above); `adapter/` "
        "holds the adapter alone, in PEFT's format, to apply to the base:",
        "",
        "```python",
        "from peft import PeftModel",
        "from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy",
        "",
        f"base = ...  # {load}",
        f'policy = PeftModel.from_pretrained(base, "{repo_id}", subfolder="adapter")',
        "```",
        "",
    ]


def prepare_folder(run_dir: str | Path, repo_id: str, out: str | Path | None = None, checkpoint: str = "final") -> Path:
    """The folder to upload: the lerobot policy (weights, config, processors), README.md, zk0_run/."""
    run = RunRecord(run_dir)
    if not (run.path / "config.json").exists():
        raise PublishError(f"no run record at {run.path}")
    if run.summary().get("status") != "completed":
        raise PublishError(f"run {run.run_id} is {run.summary().get('status')!r}, not completed: nothing to publish")
    ckpt = run.checkpoint(checkpoint)
    if not (ckpt / "model.safetensors").exists():
        raise PublishError(f"no checkpoint at {ckpt} (output.save_checkpoints was off?)")
    if "/" not in repo_id:
        raise PublishError(f"--repo-id must be 'user/name' (got {repo_id!r})")
    out = Path(out) if out else run.path / "publish" / repo_id.replace("/", "__")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp)
    (tmp / "zk0_run").mkdir()
    for name in RECORD_FILES:
        if (run.path / name).exists():
            shutil.copy2(run.path / name, tmp / "zk0_run" / name)
    model_card(run, repo_id, checkpoint).save(tmp / "README.md")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def publish(
    run_dir: str | Path,
    repo_id: str,
    dry_run: bool = False,
    checkpoint: str = "final",
    private: bool = False,
    out: str | Path | None = None,
) -> dict[str, Any]:
    folder = prepare_folder(run_dir, repo_id, out, checkpoint)
    if dry_run:
        return {"folder": str(folder), "uploaded": False}
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PublishError(
            f"HF_HUB_OFFLINE is set: not uploading. The folder is ready at {folder}; unset "
            "HF_HUB_OFFLINE on a machine with network to upload it."
        )
    if not get_token():
        raise PublishError(
            f"no Hugging Face token: run `huggingface-cli login` or set HF_TOKEN. The folder is ready at {folder}."
        )
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message=f"zk0 run {RunRecord(run_dir).run_id}"
        )
    except Exception as e:  # noqa: BLE001 - network and permission failures all end here, explained
        raise PublishError(
            f"upload to {repo_id} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"is the Hub reachable and may this token write there? The folder is at {folder}."
        ) from e
    return {"folder": str(folder), "uploaded": True, "url": str(commit.commit_url) if commit else None}
