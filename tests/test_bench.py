"""`zk0 bench` pieces that the end-to-end tests do not reach: the training-step and loader benchmarks."""

import math

import torch

from zk0lib import bench


def test_gpu_step_skips_without_cuda_and_measures_both_paths_on_cpu(fresh_bundle):
    if not torch.cuda.is_available():
        assert bench.bench_gpu_step() == {"skipped": "no CUDA device visible to torch"}
    result = bench.bench_gpu_step((2,), steps=1, warmup=1, policy=fresh_bundle.policy, device="cpu")
    (row,) = result["rows"]
    assert "error" not in row, row
    for path in ("zk0", "lerobot"):  # zk0's FedProx step and lerobot's update_policy on the same batch
        assert row[f"{path}_step_seconds"] > 0
        assert math.isclose(row[f"{path}_samples_per_second"], 2 / row[f"{path}_step_seconds"])
    assert result["parameters"]["trainable"] < result["parameters"]["total"]
    assert "| 2 |" in bench.gpu_step_markdown(result)


def test_dataloader_decodes_and_consumes_real_batches():
    result = bench.bench_dataloader("smoke", batches=3, steps=2)
    assert result["client"] == "synth-0" and result["decoded_samples_per_second"] > 0
    assert set(result["consumed_samples_per_second"]) == {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    assert all(rate > 0 for rate in result["consumed_samples_per_second"].values())
    assert "| cpu |" in bench.dataloader_markdown(result)


def test_train_bench_times_a_steps_parts_per_cache_and_batch_size():
    result = bench.bench_train("smoke", batch_sizes=(2, 4), caches=("none", "features"), steps=2)
    rows = result["rows"]
    assert [(r["cache"], r["batch_size"]) for r in rows] == [("none", 2), ("none", 4), ("features", 2), ("features", 4)]
    for r in rows:
        assert r["samples_per_second"] > 0 and 0 <= r["waiting_for_data_fraction"] <= 1
        parts = ("item", "collate", "processor", "forward", "backward", "optimizer")
        assert all(r[f"{p}_ms"] > 0 for p in parts), r
        assert math.isclose(r["compute_ms"], sum(r[f"{p}_ms"] for p in parts[2:]))
    assert result["best"]["samples_per_second"] == max(r["samples_per_second"] for r in rows)
    table = bench.train_markdown(result)
    assert "| features | 4 |" in table and "best: cache" in table
