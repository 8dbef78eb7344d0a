"""Continue a base with batches of recorded frames plus batches of decision frames (starts.py).

    python probes/aim/continue_with_starts.py BASE_FOLDER OUT_FOLDER STEPS STARTS_PER_LAB STARTS_PER_BATCH
(STARTS_PER_BATCH of each batch of 32; 32 trains on decision frames only)
"""

import sys
import time
from pathlib import Path

import loop
import numpy as np
import torch
from starts import start_batch, start_set

from zk0lib import data, model
from zk0lib.config import zk0_home
from zk0lib.env import quiet, set_hub_offline
from zk0lib.sim.labs import community_labs
from zk0lib.sim.record import record_lab

if __name__ == "__main__":
    quiet()
    set_hub_offline()
    src, out, steps, per_lab, bs_start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    cache = zk0_home() / "data_cache"
    labs = community_labs(24, 0)
    t = time.perf_counter()
    starts = start_set(labs, per_lab, 50, cache, 128, 0, 2)
    print(f"start set: {len(starts['front'])} frames, {time.perf_counter() - t:.0f} s", flush=True)
    tasks = [lab.task for lab in labs]
    b = model.load_policy(src)
    sets = []
    for i, lab in enumerate(labs):
        rec = record_lab(lab, 10, cache, 128, 0, 1)
        meta = data.load_metadata(f"zk0/{lab.name}", rec.root)
        c = data.ClientData(i, lab.name, f"zk0/{lab.name}", rec.root, meta, list(range(9)), [9])
        sets.append(data.open_dataset(c, c.train_episodes, b.config, None))
    stream = data.batch_stream(torch.utils.data.ConcatDataset(sets), 32 - bs_start, 1, 11) if bs_start < 32 else None
    g = np.random.default_rng(3)
    n_ds = 32 - bs_start

    def loss_of(step):
        loss = b.policy.forward(b.preprocessor(next(stream)))[0] if stream is not None else torch.zeros(())
        sb = b.preprocessor(start_batch(starts, tasks, g.integers(len(starts["front"]), size=bs_start)))
        ls, _ = b.policy.forward(sb)
        return {"loss": (n_ds * loss + bs_start * ls) / 32, "recorded": loss, "start": ls}

    loop.run(b.policy, steps, loss_of)
    model.save_policy(b, Path(out))
    print("saved", out)
