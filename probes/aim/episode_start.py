"""The first frames of three recorded episodes: from frame 1 on, the joint state already says which way
the arm goes (only frame 0, the home pose, needs the image). Needs the community labs recorded."""

import glob

import numpy as np
import pandas as pd

from zk0lib.config import zk0_home

root = sorted(glob.glob(str(zk0_home() / "data_cache/datasets/sim/community-0-000-*")))[0]
df = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(root + "/data/*/*.parquet"))])
for ep in (0, 1, 2):
    e = df[df.episode_index == ep]
    s = np.stack(e["observation.state"].values)
    a = np.stack(e["action"].values)
    print("episode", ep, "frames", len(e))
    for t in (0, 1, 2, 3, 5, 8, 12, 20, 30, 50):
        print(f"  t={t:3d} state pan {s[t, 0]:7.2f} lift {s[t, 1]:7.2f}  action pan {a[t, 0]:7.2f} lift {a[t, 1]:7.2f}")
