"""A lab's SO-101 pick-and-place environment with the interface of real SO-100/101 datasets.

`observation.state` is the 6 joint positions and `action` the 6 joint position targets
(shoulder_pan, shoulder_lift, elbow_flex, wrist_flex, wrist_roll in degrees; gripper 0 = closed to
100 = open), stepped at 30 frames per second. The scripted expert of lerobot-env-so101 decides at
10 Hz in end-effector space; its joint targets (the IK solution it commands) are held for 3 frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from zk0lib.sim.labs import LabSpec
from zk0lib.sim.scene import FRONT_CAMERA, GOAL_MARKER, WRIST_CAMERA, ensure_gl, scene_path

ensure_gl()

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
from lerobot_env_so101.gripper import ctrl_to_normalized, normalized_to_ctrl  # noqa: E402
from lerobot_env_so101.mujoco_env import GymRenderingSpec, SO101GymEnv  # noqa: E402
from lerobot_env_so101.pick_place_env import SO101PickPlaceGymEnv  # noqa: E402
from lerobot_env_so101.policy import DEFAULT_ACTION_SCALE  # noqa: E402
from lerobot_env_so101.scripted.pick_place import PickPlaceController, phase_target  # noqa: E402

FPS = 30
FRAMES_PER_DECISION = 3  # the expert decides at 10 Hz
PHYSICS_DT = 1 / 600  # 20 physics steps per frame
SUBSTEPS_PER_FRAME = 20
JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
JOINT_NAMES = [f"{j}.pos" for j in JOINTS]
CAMERAS = (FRONT_CAMERA, WRIST_CAMERA)
# observation.environment_state: what the simulator knows and a camera policy must see for itself
ENVIRONMENT_NAMES = ["cube.x", "cube.y", "cube.z", "target.x", "target.y", "target.z"]  # metres, world frame
MIN_CUBE_TARGET_DISTANCE = 0.08
STAGES = ("none", "reached", "grasped", "lifted", "placed")
REACH_DISTANCE = 0.03


class _LabSceneBase(SO101GymEnv):
    """Slots the lab's MJCF into lerobot-env-so101's class chain (which otherwise loads its own scene)."""

    def __init__(self, **kwargs: Any):
        super().__init__(xml_path=self._lab_xml, **kwargs)


class LabEnv(SO101PickPlaceGymEnv, _LabSceneBase):
    """The package's pick-and-place task (physics, IK, success test) in a lab's scene."""

    def __init__(self, lab: LabSpec, image_size: int = 128, cache_dir: Path | None = None):
        from zk0lib.config import zk0_home

        self.lab = lab
        self.image_size = image_size
        self._lab_xml = scene_path(lab, image_size, cache_dir or zk0_home() / "data_cache")
        super().__init__(
            seed=lab.seed,
            control_dt=FRAMES_PER_DECISION / FPS,
            physics_dt=PHYSICS_DT,
            render_spec=GymRenderingSpec(height=image_size, width=image_size, camera_id=FRONT_CAMERA),
            random_block_position=True,
            action_scale=DEFAULT_ACTION_SCALE,
            top_down_ik=True,
            jaw_pads=True,
        )
        self._n_substeps = 0  # apply_action only sets the actuator targets; frames are stepped here
        self._marker = self._model.body(GOAL_MARKER).mocapid[0]
        self._arm_qpos = np.asarray([self._model.joint(j).qposadr[0] for j in JOINTS[:5]])
        self._gripper_range = self._model.actuator("gripper").ctrlrange.copy()
        self._arm_range = self._model.actuator_ctrlrange[self._arm_ctrl_ids].copy()
        self._pads = {self._model.geom(n).id for n in ("fixed_jaw_pad", "moving_jaw_pad")}
        self._block_geom = self._model.geom("block").id
        self._renderer: mujoco.Renderer | None = None
        self.expert = PickPlaceController(DEFAULT_ACTION_SCALE)
        self.stage = 0

    # -- episode
    def reset(self, seed: int | None = None, **kwargs: Any) -> tuple[dict, dict]:
        """A new episode: cube and target drawn from the lab's regions with the episode's seed."""
        gym.Env.reset(self, seed=seed)
        mujoco.mj_resetData(self._model, self._data)
        self.reset_robot()
        rng = self.np_random
        cube = rng.uniform(*np.asarray(self.lab.cube_region))
        goal = rng.uniform(*np.asarray(self.lab.target_region))
        while np.linalg.norm(goal - cube) < MIN_CUBE_TARGET_DISTANCE:
            goal = rng.uniform(*np.asarray(self.lab.target_region))
        self._data.jnt("block").qpos[:3] = (*cube, self._block_z)
        self._goal_pos = np.asarray([*goal, self._block_z])
        self._data.mocap_pos[self._marker] = (*goal, 0.0008)
        mujoco.mj_forward(self._model, self._data)
        self._z_init = self._data.sensor("block_pos").data[2]
        self._was_carried = False
        self.expert.reset()
        self.stage = 0
        return {"observation.state": self.joint_state()}, {}

    # -- the dataset's units
    def joint_state(self) -> np.ndarray:
        arm = np.rad2deg(self._data.qpos[self._arm_qpos])
        grip = 100 * ctrl_to_normalized(self._data.qpos[self._gripper_qpos_adr], self._gripper_range)
        return np.asarray([*arm, grip], dtype=np.float32)

    def environment_state(self) -> np.ndarray:
        """The cube's position now and the target's, in metres (ENVIRONMENT_NAMES): privileged state, recorded
        as LeRobot's `observation.environment_state` for reference policies and probes."""
        return np.asarray([*self._data.sensor("block_pos").data, *self._goal_pos], dtype=np.float32)

    def joint_targets(self) -> np.ndarray:
        """The actuators' current targets in dataset units: what a policy's action sets."""
        arm = np.rad2deg(self._data.ctrl[self._arm_ctrl_ids])
        grip = 100 * ctrl_to_normalized(self._data.ctrl[self._gripper_ctrl_id], self._gripper_range)
        return np.asarray([*arm, grip], dtype=np.float32)

    def set_joint_targets(self, action: np.ndarray) -> None:
        action = np.asarray(action, dtype=np.float64).reshape(6)
        arm = np.clip(np.deg2rad(action[:5]), self._arm_range[:, 0], self._arm_range[:, 1])
        self._data.ctrl[self._arm_ctrl_ids] = arm
        self._data.ctrl[self._gripper_ctrl_id] = normalized_to_ctrl(action[5] / 100, self._gripper_range)

    # -- stepping
    def step_frame(self, action: np.ndarray | None = None) -> tuple[bool, bool]:
        """Advance one frame (1/30 s) toward `action` (or the held targets); returns (success, failed)."""
        if action is not None:
            self.set_joint_targets(action)
        for _ in range(SUBSTEPS_PER_FRAME):
            mujoco.mj_step(self._model, self._data)
        block = self._data.sensor("block_pos").data
        self._was_carried = self._was_carried or bool(block[2] - self._z_init > 0.03)
        success = self._is_success()
        self.stage = max(self.stage, self._current_stage(success))
        low, high = np.asarray([[0.08, -0.2], [0.4, 0.2]])
        out_of_bounds = bool(np.any(block[:2] < low) or np.any(block[:2] > high))
        return success, out_of_bounds

    def expert_targets(self) -> np.ndarray:
        """The scripted expert's next 10 Hz decision, as joint targets (set on the actuators too)."""
        command = self.expert.act(self.ik_point_pos, self._data.sensor("block_pos").data, self._goal_pos)
        self.apply_action(command)  # IK -> actuator targets; no physics step (_n_substeps = 0)
        return self.joint_targets()

    def _current_stage(self, success: bool) -> int:
        if success:
            return 4
        if self._was_carried:
            return 3
        touching = {
            c.geom1 if c.geom2 == self._block_geom else c.geom2
            for c in self._data.contact[: self._data.ncon]
            if self._block_geom in (c.geom1, c.geom2)
        }
        if self._pads <= touching:
            return 2
        if np.linalg.norm(self.ik_point_pos - self._data.sensor("block_pos").data) < REACH_DISTANCE:
            return 1
        return 0

    @property
    def stage_name(self) -> str:
        return STAGES[self.stage]

    # -- cameras
    def render_cameras(self, cameras: tuple[str, ...] = CAMERAS) -> dict[str, np.ndarray]:
        if not cameras:
            return {}
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self._model, self.image_size, self.image_size)
        out = {}
        for cam in cameras:
            self._renderer.update_scene(self._data, camera=cam)
            out[cam] = self._renderer.render().copy()
        return out

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        super().close()


NOISY_PHASES = ("HOVER", "TRAVERSE")  # the free-space moves that aim at the cube and at the target
NOISE_CORRELATION = 0.7  # of the execution offset from one 10 Hz decision to the next
NOISE_FADE_DISTANCE = 0.05  # metres: the offset fades out as the gripper nears its phase target


class ExpertFrame(NamedTuple):
    state: np.ndarray  # joint positions (observation.state)
    action: np.ndarray  # the expert's joint targets (action)
    images: dict[str, np.ndarray]  # camera -> HxWx3 uint8 (empty when not rendered)
    environment_state: np.ndarray  # cube and target positions (observation.environment_state)


def run_expert_episode(env: LabEnv, seed: int, max_decisions: int = 120, render: bool = True, noise_deg: float = 0.0):
    """One scripted-expert episode, as an ExpertFrame (state, action, camera images, environment state) per
    30 fps frame.

    The episode ends at success, when the cube leaves the workspace, or after `max_decisions`;
    afterwards `env.stage` tells how far it got (4 = placed).

    With `noise_deg` > 0 the arm *executes* the expert's joint targets plus a slowly varying offset
    (std `noise_deg` on shoulder_pan, shoulder_lift, elbow_flex and wrist_flex, correlated over ~0.3 s)
    while it moves toward the cube and toward the target, fading out near each; the recorded action stays
    the expert's own target, which corrects from wherever the arm really is. Demonstrations then show the
    way back to the cube from off-path states, so the state alone no longer says where to go and a policy
    has to look (noise injection as in DART: off-path states are where a learned policy ends up).
    """
    env.reset(seed=seed)
    rng = np.random.default_rng([seed, 9001])
    offset = np.zeros(4)
    keep = NOISE_CORRELATION
    for _ in range(max_decisions):
        targets = env.expert_targets()
        if noise_deg > 0:
            offset = keep * offset + np.sqrt(1 - keep * keep) * rng.normal(0.0, noise_deg, 4)
            phase = env.expert.phase.name
            if phase in NOISY_PHASES:
                block = env._data.sensor("block_pos").data
                goal = phase_target(env.expert.phase, env.ik_point_pos, block, env._goal_pos, env.expert._table_z)
                fade = min(1.0, float(np.linalg.norm(goal - env.ik_point_pos)) / NOISE_FADE_DISTANCE)
                executed = targets.copy()
                executed[:4] += fade * offset
                env.set_joint_targets(executed)
        for _ in range(FRAMES_PER_DECISION):
            state = env.joint_state()
            images = env.render_cameras() if render else {}
            yield ExpertFrame(state, targets, images, env.environment_state())
            success, failed = env.step_frame()
            if success or failed:
                return
