"""Do a policy's frozen image features say where the cube is, in labs its vision path never saw?

A ridge regression from the first frame's image embeddings (front and wrist cameras, every token,
flattened: a reader that knows which slot each token fills) to the cube's table position, recorded in
`observation.environment_state`. Two splits of the demo's four client labs: within the labs (the first
two thirds of each lab's episodes train, the rest test) and leave one lab out (train on three labs,
test on the fourth). Against guessing the training mean. Needs the labs recorded:
`zk0 validate --preset demo --set data.sim_episodes=60`.

    .venv/bin/python probes/aim/feature_probe.py [POLICY_FOLDER] [EPISODES_PER_LAB]
"""

import sys
import time

import numpy as np
import torch

from zk0lib import data, model
from zk0lib.cache import _embed
from zk0lib.config import SHIPPED_BASE, load_config

policy_dir = sys.argv[1] if len(sys.argv) > 1 else str(SHIPPED_BASE)
episodes = int(sys.argv[2]) if len(sys.argv) > 2 else 60
torch.set_num_threads(2)
t0 = time.perf_counter()
cfg = load_config("demo", {"data.sim_episodes": str(episodes)})
bundle = model.load_policy(policy_dir)
X, Y, lab_of = [], [], []
for i in range(len(cfg.data.clients)):
    client = data.open_client(cfg, i)
    ds = data.open_dataset(client, list(range(client.meta.total_episodes)), bundle.config, None)
    starts = [int(s) for s in client.meta.episodes["dataset_from_index"]]
    for s in starts:
        item = ds[s - starts[0]]
        feats = []
        for cam in bundle.policy.config.image_features:
            frames = item[cam][None] if item[cam].ndim == 3 else item[cam][:1]
            feats.append(_embed(bundle.policy, frames).flatten().numpy())
        X.append(np.concatenate(feats))
        Y.append(item["observation.environment_state"].reshape(-1)[:2].numpy())
        lab_of.append(i)
X, Y, lab_of = np.asarray(X), np.asarray(Y), np.asarray(lab_of)
print(f"{policy_dir}: {len(X)} episode starts, {X.shape[1]} features")


def ridge(xtr, ytr, xte, alpha):
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xte - mu) / sd
    ym = ytr.mean(0)
    k = a @ a.T  # dual form: fewer samples than features
    w = np.linalg.solve(k + alpha * np.eye(len(a)), ytr - ym)
    return b @ a.T @ w + ym


def cm(pred, y):
    return 100 * float(np.linalg.norm(pred - y, axis=1).mean())


labs = range(len(cfg.data.clients))
rows = [np.where(lab_of == i)[0] for i in labs]
for name, splits in {
    "within the labs (2/3 train, 1/3 test)": [
        (np.concatenate([r[: 2 * len(r) // 3] for r in rows]), np.concatenate([r[2 * len(r) // 3 :] for r in rows]))
    ],
    "leave one lab out": [(np.where(lab_of != i)[0], rows[i]) for i in labs],
}.items():
    for alpha in (4.0, 40.0, 400.0, 4000.0):  # ~1, 10, 100, 1000 per thousand standardized features
        errs, means = [], []
        for tr, te in splits:
            errs.append(cm(ridge(X[tr], Y[tr], X[te], alpha), Y[te]))
            means.append(cm(np.repeat(Y[tr].mean(0, keepdims=True), len(te), 0), Y[te]))
        print(
            f"  {name}, alpha {alpha:g}: cube xy error {np.mean(errs):.1f} cm (guessing the mean: {np.mean(means):.1f} cm)"
        )
print(f"{time.perf_counter() - t0:.0f} s")
