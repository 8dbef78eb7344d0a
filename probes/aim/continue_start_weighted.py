"""Continue a base with the first frames of each recorded episode drawn more often (weight 1 + K e^(-t/2))
and optional Gaussian noise on the normalized state.

    python probes/aim/continue_start_weighted.py BASE_FOLDER OUT_FOLDER STEPS K STATE_NOISE
"""

import sys
from pathlib import Path

import loop
import numpy as np
import torch

from zk0lib import data, model
from zk0lib.base import BaseSpec, experiment_config
from zk0lib.config import zk0_home
from zk0lib.env import quiet, set_hub_offline
from zk0lib.sim.labs import community_labs
from zk0lib.sim.record import record_lab

if __name__ == "__main__":
    quiet()
    set_hub_offline()
    src, out, steps, K, noise = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    cache = zk0_home() / "data_cache"
    b = model.load_policy(src)
    spec = BaseSpec()
    spec.chunk_size = 50
    cfg = experiment_config(spec, cache)
    sets, weights = [], []
    for i, lab in enumerate(community_labs(24, 0)):
        rec = record_lab(lab, 10, cache, 128, 0, 1)
        meta = data.load_metadata(f"zk0/{lab.name}", rec.root)
        c = data.ClientData(i, lab.name, f"zk0/{lab.name}", rec.root, meta, list(range(9)), [9])
        ds = data.open_dataset(c, c.train_episodes, b.config, None)
        fi = torch.as_tensor(np.asarray(ds.hf_dataset["frame_index"]), dtype=torch.float32)
        sets.append(ds)
        weights.append(1 + K * torch.exp(-fi / 2))
    w = torch.cat(weights)
    print(
        "share of draws on frames 0-2:",
        float(
            w[torch.cat([torch.as_tensor(np.asarray(s.hf_dataset["frame_index"])) for s in sets]) < 3].sum() / w.sum()
        ),
    )
    stream = data.batch_stream(torch.utils.data.ConcatDataset(sets), 32, 1, 11, weights=w)
    print("trainable", sum(p.numel() for _, p in model.trainable_parameters(b.policy)))

    def loss_of(step):
        batch = b.preprocessor(next(stream))
        if noise > 0:
            st = batch["observation.state"]
            batch["observation.state"] = st + noise * torch.randn_like(st)
        return {"loss": b.policy.forward(batch)[0]}

    loop.run(b.policy, steps, loss_of)
    model.save_policy(b, Path(out))
    print("saved", out)
