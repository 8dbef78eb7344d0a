"""Grounding through an attention readout (it cannot use which slot a token sits in, as the flattening
head of zk0lib.base can) from a fresh tiny model, then action training on decision frames only.

    python probes/aim/attention_grounding.py OUT_FOLDER GROUNDING_STEPS ACTION_STEPS
"""

import sys
from pathlib import Path

import loop
import numpy as np
import torch
from starts import start_batch, start_set

from zk0lib import base, data, model
from zk0lib.base import BaseSpec, experiment_config, pretrain_grounding
from zk0lib.config import zk0_home
from zk0lib.env import quiet, set_hub_offline
from zk0lib.sim.grounding import grounding_set
from zk0lib.sim.labs import community_labs
from zk0lib.sim.record import record_lab


class AttentionReadout(torch.nn.Module):
    """A few learned queries pool the tokens by content; an MLP maps the pooled values to the labels."""

    def __init__(self, width: int, out: int, queries: int = 4, dim: int = 64):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(queries, dim) / dim**0.5)
        self.key, self.value = torch.nn.Linear(width, dim), torch.nn.Linear(width, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(queries * dim, 256), torch.nn.GELU(), torch.nn.Linear(256, out))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.key(tokens) @ self.queries.T / self.queries.shape[1] ** 0.5, dim=1)
        return self.mlp((weights.transpose(1, 2) @ self.value(tokens)).flatten(1))


class AttentionHeads(torch.nn.Module):
    def __init__(self, tokens: int, width: int, front: int, wrist: int):
        super().__init__()
        self.front, self.wrist = AttentionReadout(width, front), AttentionReadout(width, wrist)


base.GroundingHeads = AttentionHeads


def main():
    quiet()
    set_hub_offline()
    out, gsteps, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cache = zk0_home() / "data_cache"
    spec = BaseSpec()
    spec.chunk_size = 50
    spec.grounding_steps = gsteps
    labs = community_labs(24, 0)
    clients = []
    for i, lab in enumerate(labs):
        rec = record_lab(lab, 10, cache, 128, 0, 1)
        meta = data.load_metadata(f"zk0/{lab.name}", rec.root)
        clients.append(data.ClientData(i, lab.name, f"zk0/{lab.name}", rec.root, meta, list(range(9)), [9]))
    cfg = experiment_config(spec, cache)
    b = model.build_policy(cfg, clients[0].meta, data.pooled_train_stats(clients))
    frames = grounding_set(labs, 10, 10, cache, 128, 0, 2)
    g = pretrain_grounding(b.policy, frames, spec, print)
    print("grounding errors", g["errors"], flush=True)
    starts = start_set(labs, 200, 50, cache, 128, 0, 2)
    tasks = [lab.task for lab in labs]
    rng = np.random.default_rng(3)

    def loss_of(step):
        sb = b.preprocessor(start_batch(starts, tasks, rng.integers(len(starts["front"]), size=32)))
        return {"loss": b.policy.forward(sb)[0]}

    loop.run(b.policy, steps, loss_of, lr=1e-3, warmup=50)
    model.save_policy(b, Path(out))
    print("saved", out)


if __name__ == "__main__":
    main()
