"""Does a policy's first chunk depend on the image? The same home state, 12 new cube positions in one
community lab: the chunk's last shoulder_pan, predicted against the scripted expert's, their spread
and correlation.

    python probes/aim/image_sensitivity.py POLICY_FOLDER [COMMUNITY_LAB_INDEX]
"""

import sys

import numpy as np
import torch

from zk0lib.config import zk0_home
from zk0lib.env import quiet, set_hub_offline
from zk0lib.model import load_policy
from zk0lib.sim.env import CAMERAS, FRAMES_PER_DECISION, LabEnv
from zk0lib.sim.labs import community_labs
from zk0lib.sim.rollout import _observation

if __name__ == "__main__":
    quiet()
    set_hub_offline()
    b = load_policy(sys.argv[1])
    lab = community_labs(24, 0)[int(sys.argv[2]) if len(sys.argv) > 2 else 0]
    env = LabEnv(lab, 128, zk0_home() / "data_cache")
    preds, experts, cubes, states = [], [], [], []
    for k in range(12):
        env.reset(seed=1000 + k)
        states.append(env.joint_state())
        cubes.append(env._data.sensor("block_pos").data[:2].copy())
        batch = b.preprocessor(_observation(env, env.render_cameras(CAMERAS), lab.task, b.device))
        b.policy.reset()
        torch.manual_seed(0)
        with torch.no_grad():
            chunk = b.postprocessor(b.policy.predict_action_chunk(batch)).float().numpy()[0]
        preds.append(chunk[:, 0])
        t = []
        for f in range(len(chunk)):
            if f % FRAMES_PER_DECISION == 0:
                held = env.expert_targets()
            t.append(held[0])
            env.step_frame()
        experts.append(np.asarray(t))
    P, E, C = np.asarray(preds), np.asarray(experts), np.asarray(cubes)
    print("state spread across episodes:", np.asarray(states).std(0).round(3))
    print("cube y:", C[:, 1].round(3))
    print("expert pan at chunk end:", E[:, -1].round(1))
    print("pred   pan at chunk end:", P[:, -1].round(1))
    print("pred pan std across episodes", P[:, -1].std().round(2), "expert", E[:, -1].std().round(2))
    print("corr", np.corrcoef(P[:, -1], E[:, -1])[0, 1].round(3))
    env.close()
