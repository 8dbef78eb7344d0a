"""Is aiming the only thing missing? The demo's fine-tuning (shipped base, VLM frozen, expert trained,
centralized on the four client labs) with the cube's and the target's starting positions written into
the state: four extra numbers in the padding SmolVLA gives every state (max_state_dim 32), normalized
here. If that policy succeeds in closed loop, the action side (chunking, flow matching, the budget)
works and the images are the one thing a policy cannot read; if it fails, vision is not the only gap.

    python probes/aim/oracle_state.py STEPS EPISODES_PER_LAB [oracle|none] [KEY=VALUE ...]

KEY=VALUE are config overrides of the demo preset, e.g. model.chunk_size=50 model.n_action_steps=50.
"""

import json
import sys

import loop
import numpy as np
import torch

from zk0lib import data, model, train
from zk0lib.config import load_config
from zk0lib.env import quiet, set_hub_offline
from zk0lib.sim.env import LabEnv
from zk0lib.sim.labs import CLIENT_LABS, get_lab
from zk0lib.sim.record import RECORD_INFO, record_lab
from zk0lib.sim.rollout import rollout


def start_positions(env: LabEnv, seed: int) -> np.ndarray:
    """Cube (x, y) and target (x, y) of the episode `seed`, in metres."""
    env.reset(seed=seed)
    return np.asarray([*env._data.sensor("block_pos").data[:2], *env._goal_pos[:2]], dtype=np.float32)


def with_extra(state: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """The state (B, 6) or (B, steps, 6) with the extra numbers after its joints."""
    if state.dim() == 3:
        extra = extra[:, None].expand(-1, state.shape[1], -1)
    return torch.cat([state, extra.to(state.dtype)], dim=-1)


class OraclePolicy:
    """The policy, its preprocessed state extended with the live episode's start positions."""

    def __init__(self, policy, extra_of, use: bool):
        self.policy, self.extra_of, self.use = policy, extra_of, use
        self.env, self.extra = None, None

    def bind_env(self, env):
        self.env = env

    @property
    def _queues(self):  # the rollout renders only the frames the policy looks at
        return self.policy._queues

    def eval(self):
        self.policy.eval()

    def reset(self):
        self.policy.reset()
        pos = np.asarray([*self.env._data.sensor("block_pos").data[:2], *self.env._goal_pos[:2]], dtype=np.float32)
        self.extra = self.extra_of(torch.from_numpy(pos)[None])

    def select_action(self, batch):
        batch = dict(batch)
        batch["observation.state"] = with_extra(batch["observation.state"], self.extra * self.use)
        return self.policy.select_action(batch)


def main():
    quiet()
    set_hub_offline()
    steps, episodes, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    use = 1.0 if mode == "oracle" else 0.0
    cfg = load_config("demo", sys.argv[4:])
    cache = cfg.cache_dir
    clients = [data.open_client(cfg, i) for i in range(len(cfg.data.clients))]
    bundle = model.build_policy(cfg, clients[0].meta, data.pooled_train_stats(clients))
    pc = bundle.config

    # per lab and episode: the start positions, from the recording's seeds
    starts = []
    for c in clients:
        info = json.loads(
            (record_lab(c.name, cfg.data.sim_episodes, cache, 128, cfg.seed).root / RECORD_INFO).read_text()
        )
        env = LabEnv(get_lab(c.name), 64, cache)
        starts.append(np.stack([start_positions(env, s) for s in info["episode_seeds"]]))
        env.close()
    flat = np.concatenate(starts)
    mean, std = torch.from_numpy(flat.mean(0)), torch.from_numpy(flat.std(0) + 1e-6)

    def extra_of(pos: torch.Tensor) -> torch.Tensor:
        return (pos - mean) / std

    sets = [data.open_dataset(c, c.train_episodes, pc, None) for c in clients]
    lab_of = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sets)])
    pool = torch.utils.data.ConcatDataset(sets)

    class Tagged(torch.utils.data.Dataset):
        def __len__(self):
            return len(pool)

        def __getitem__(self, i):
            return pool[i] | {"lab": lab_of[i]}

    stream = data.batch_stream(Tagged(), cfg.train.batch_size, 1, 3)
    optimizer, scheduler = train.make_optimizer(bundle.policy, steps, 0, 0)
    table = [torch.from_numpy(s) for s in starts]
    policy = bundle.policy

    def loss_of(step):
        raw = next(stream)
        pos = torch.stack([table[int(lab)][int(ep)] for lab, ep in zip(raw["lab"], raw["episode_index"], strict=True)])
        batch = bundle.preprocessor({k: v for k, v in raw.items() if k != "lab"})
        batch["observation.state"] = with_extra(batch["observation.state"], extra_of(pos) * use)
        return {"loss": policy.forward(batch)[0]}

    loop.run(policy, steps, loss_of, seed=0, log_every=250, optimizer=optimizer, scheduler=scheduler)
    wrapped = OraclePolicy(policy, extra_of, use)
    total = 0
    for lab in CLIENT_LABS:
        r = rollout(
            wrapped,
            (bundle.preprocessor, bundle.postprocessor),
            lab,
            episodes,
            seed=0,
            cache_dir=cache,
            max_frames=cfg.eval.rollout_max_frames,
        )
        s = r["summary"]
        total += round(s["success_rate"] * s["episodes"])
        print(lab, f"{s['success_rate']:.0%}", s["success_ci"], s["stage_counts"], flush=True)
    print(f"{mode}: pooled {total}/{episodes * len(CLIENT_LABS)} after {steps} steps", flush=True)


if __name__ == "__main__":
    main()
