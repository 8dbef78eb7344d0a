"""Centralized and local-only baselines: the federated run's budget, its records' format, and `zk0 compare`."""

import json

import pytest

from zk0lib import baselines, bench, report
from zk0lib.compare import compare, compare_table, table_markdown
from zk0lib.config import ConfigError, load_config
from zk0lib.launch import RunResult
from zk0lib.runs import RunRecord


@pytest.fixture(scope="module")
def three_kinds(home, smoke_run):
    """The session's federated smoke run and both baselines of the same config; the baselines read their
    frames from the training caches (centralized trains on cached image features, local-only on cached
    frames), the federated run decodes its videos: the records must agree all the same."""
    out, _, _ = smoke_run
    assert out.returncode == 0, out.stderr[-3000:]
    results = {"federated": RunRecord(home / "reports" / "runs" / "e2e-smoke")}
    caches = {"centralized": "features", "local-only": "frames"}
    for kind in baselines.KINDS:
        cfg = load_config("smoke", {"output.run_id": f"baseline-{kind}", "data.cache": caches[kind]})
        results[kind] = baselines.run_baseline(kind, cfg, progress=None).record
    return results


def test_baselines_train_on_exactly_the_federated_samples(three_kinds):
    cfg = load_config("smoke")
    b = baselines.budget(cfg)
    assert b["total_samples"] == cfg.fl.num_rounds * 2 * cfg.train.local_steps * cfg.train.batch_size
    fed = three_kinds["federated"].summary()["totals"]
    for kind in baselines.KINDS:
        run = three_kinds[kind]
        totals = run.summary()["totals"]
        assert totals["train_samples"] == fed["train_samples"] == b["total_samples"]
        assert totals["train_steps"] == fed["train_steps"] == b["total_steps"]
        for r in run.rounds()[1:]:
            clients = r["train"]["clients"]
            if kind == "centralized":  # one model, all clients' steps of a round
                assert list(clients) == ["centralized"]
                assert clients["centralized"]["steps"] == 2 * cfg.train.local_steps
            else:  # each client its own steps, as in a federated round
                assert set(clients) == {"synth-0", "synth-1"}
                assert {m["samples"] for m in clients.values()} == {cfg.train.local_steps * cfg.train.batch_size}


def test_baselines_write_the_federated_record_format(three_kinds, home):
    stores = {p.parent.name for p in (home / "data_cache" / "features").glob("*/store.json")}
    assert any(name.startswith("zk0__synthetic-0") for name in stores), stores  # centralized trained on features
    fed_rounds = three_kinds["federated"].rounds()
    for kind in baselines.KINDS:
        run = three_kinds[kind]
        assert json.loads((run.path / "config.json").read_text())["kind"] == kind
        summary = run.summary()
        assert summary["status"] == "completed" and summary["kind"] == kind and summary["final"]["round"] == 2
        rounds = run.rounds()
        assert [r["round"] for r in rounds] == [r["round"] for r in fed_rounds]
        for mine, theirs in zip(rounds, fed_rounds, strict=True):
            assert set(mine["eval"]["clients"]) == set(theirs["eval"]["clients"])
            assert set(mine["eval"]["eval_only"]) == set(theirs["eval"]["eval_only"])
            assert {"loss", "loss_ci", "action_mae", "action_mae_ci"} <= set(mine["eval"]["mean"])
        # the same initial weights judged the same way: round 0 is identical in every kind of run
        assert rounds[0]["eval"]["mean"]["loss"] == pytest.approx(fed_rounds[0]["eval"]["mean"]["loss"], rel=1e-6)
    local = three_kinds["local-only"].rounds()[-1]["eval"]
    assert set(local["models"]) == {"synth-0", "synth-1"}
    assert {"loss", "loss_ci"} <= set(local["own"])
    for model_eval in local["models"].values():  # every local model on every client's held-out episodes
        assert set(model_eval["clients"]) == {"synth-0", "synth-1"} and "unseen" in model_eval["eval_only"]
    assert (three_kinds["local-only"].path / "checkpoints" / "final-synth-1" / "model.safetensors").exists()

    table = report.runs_table(three_kinds["federated"].path.parent)
    kinds = set(table[table.run_id.isin([r.run_id for r in three_kinds.values()])].kind)
    assert kinds == {"federated", "centralized", "local-only"}


def test_compare_table_rows_and_markdown(three_kinds):
    entries = [
        {
            "label": kind if kind != "federated" else "federated fedprox",
            "run_id": run.run_id,
            "status": "completed",
            "seconds": 60.0,
        }
        for kind, run in three_kinds.items()
    ]
    table = compare_table(three_kinds["federated"].path.parent, entries)
    assert list(table["row"]) == ["federated fedprox", "centralized", "local-only"]
    fed = table.iloc[0]
    assert fed["mb_per_round"] > 0 and table.iloc[1]["mb_per_round"] == 0
    assert table.iloc[2]["own_loss"] != table.iloc[2]["loss"]  # local models on their own data vs everyone's
    text = table_markdown(table)
    assert text.count("\n") == 4 and "[" in text  # header, rule, 3 rows; one seed: a 95% interval


def test_compare_runs_seeds_and_refuses_bad_input(home, tmp_path):
    with pytest.raises(ConfigError, match="unknown fedsgd"):
        compare("smoke", ["fedsgd"], [], out_root=tmp_path)
    with pytest.raises(ConfigError, match="--seeds must be >= 1"):
        compare("smoke", [], ["centralized"], seeds=0, out_root=tmp_path)
    assert not any(tmp_path.iterdir())
    record = compare(
        "smoke",
        [],
        ["centralized"],
        seeds=2,
        overrides=["fl.num_rounds=1"],
        compare_id="c",
        out_root=tmp_path,
        progress=lambda _: None,
    )
    assert [r["run_id"] for r in record["runs"]] == ["centralized-s0", "centralized-s1"]
    assert all(r["status"] == "completed" for r in record["runs"])
    row = record["table"][0]
    assert row["seeds"] == "2/2" and row["loss_sd"] is not None and row["loss_sd"] > 0  # seeds differ
    assert "±" in (tmp_path / "c" / "table.md").read_text()


def test_overhead_numbers_from_a_federated_and_a_centralized_record(three_kinds):
    """`zk0 bench overhead`'s arithmetic on the real records: training-phase rates, ratio, time split."""
    fed, cen = (three_kinds[k] for k in ("federated", "centralized"))
    fed_r, cen_r = (RunResult.of(r, r.summary()["wall_seconds"] + 5.0) for r in (fed, cen))
    pair = bench.overhead_pair(fed_r, cen_r)
    phase = {
        k: sum(r["seconds"]["train"] for r in run.rounds() if r["round"] > 0) for k, run in (("f", fed), ("c", cen))
    }
    samples = fed.summary()["totals"]["train_samples"]
    assert pair["samples"] == {"federated": samples, "centralized": samples}
    assert pair["samples_per_second"]["federated"] == pytest.approx(samples / phase["f"])
    assert pair["ratio_excluding_startup"] == pytest.approx(phase["c"] / phase["f"])
    split = pair["federated_time_split"]
    assert split["before_serverapp"] == pytest.approx(5.0)  # what the ServerApp's own clock cannot see
    clients = [m for r in fed.rounds() if r["round"] > 0 for m in r["train"]["clients"].values()]
    assert split["training"] == pytest.approx(sum(m["seconds"] for m in clients))
    busy = sum(m["seconds"] - m["data_seconds"] for m in clients) / sum(m["steps"] for m in clients)
    assert pair["step_ms_without_waiting"]["federated"] == pytest.approx(1000 * busy)
    assert pair["step_ms_without_waiting"]["centralized"] > 0
    assert 0 < split["waiting_for_batches"] < split["training"] < split["train_phase"] == pytest.approx(phase["f"])
    assert all(v >= 0 for v in split.values())
    assert "| samples/s (training phase) |" in bench.overhead_markdown(
        pair | {"pairs": [pair | {"first": "federated"}] * 2}
    )
    with pytest.raises(ConfigError, match="--repeats must be >= 1"):
        bench.bench_overhead("smoke", repeats=0)


def test_budgets_count_only_the_clients_sampled_each_round():
    from zk0lib import train

    cfg = load_config("smoke", {"fl.fraction_train": 0.5, "fl.num_rounds": 6})
    b = baselines.budget(cfg)
    assert b["sampled"] == [train.sampled_clients(cfg, r) for r in range(1, 7)]
    assert all(len(s) == 1 for s in b["sampled"]) and b["clients_per_round"] == 1
    steps = cfg.train.local_steps
    assert b["centralized_steps_per_round"] == [steps] * 6 and b["total_steps"] == 6 * steps
    assert b["steps_per_client"] == [steps * sum(i in s for s in b["sampled"]) for i in (0, 1)]
    assert sum(b["samples_per_client"]) == b["total_samples"] == 6 * steps * cfg.train.batch_size


def test_weighted_draws_follow_their_weights():
    """The centralized baseline's draws under fl.weighting=uniform: frames in proportion to the weights given."""
    import torch

    from zk0lib import data

    frames = [{"index": torch.tensor(i)} for i in range(30)]
    weights = torch.tensor([1.0] * 10 + [0.0] * 10 + [3.0] * 10, dtype=torch.float64)
    stream = data.batch_stream(frames, 10, 0, seed=4, weights=weights)
    drawn = torch.cat([next(stream)["index"] for _ in range(200)])
    assert not ((drawn >= 10) & (drawn < 20)).any()
    share = float((drawn >= 20).float().mean())
    assert 0.72 < share < 0.78  # 3/4 of the weight
    again = data.batch_stream(frames, 10, 0, seed=4, weights=weights)
    assert torch.equal(next(again)["index"], torch.cat([next(data.batch_stream(frames, 10, 0, 4, weights))["index"]]))
    with pytest.raises(ValueError, match="3 sampling weights for a dataset of 30 frames"):
        data.batch_stream(frames, 10, 0, seed=4, weights=weights[:3])
