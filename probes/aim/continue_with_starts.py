"""Continue a base with batches of recorded frames plus batches of decision frames (starts.py).

    python probes/aim/continue_with_starts.py BASE_FOLDER OUT_FOLDER STEPS STARTS_PER_LAB STARTS_PER_BATCH
(STARTS_PER_BATCH of each batch of 32; 32 trains on decision frames only)
"""

import math
import sys
import time
from pathlib import Path

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
    params = [p for _, p in model.trainable_parameters(b.policy)]
    opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.95), weight_decay=1e-10)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    b.policy.train()
    torch.manual_seed(5)
    g = np.random.default_rng(3)
    t0 = time.perf_counter()
    losses = []
    sl = []
    n_ds = 32 - bs_start
    for s in range(steps):
        if stream is not None:
            batch = b.preprocessor(next(stream))
            loss, _ = b.policy.forward(batch)
        else:
            loss = torch.zeros(())
        sb = b.preprocessor(start_batch(starts, tasks, g.integers(len(starts["front"]), size=bs_start)))
        ls, _ = b.policy.forward(sb)
        ((n_ds * loss + bs_start * ls) / 32).backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        sch.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        sl.append(ls.item())
        if (s + 1) % 200 == 0:
            print(
                f"step {s + 1}: loss {np.mean(losses[-200:]):.4f} start loss {np.mean(sl[-200:]):.4f} ({1000 * (time.perf_counter() - t0) / (s + 1):.0f} ms/step)",
                flush=True,
            )
    model.save_policy(b, Path(out))
    print("saved", out)
