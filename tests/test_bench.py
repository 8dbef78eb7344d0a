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
