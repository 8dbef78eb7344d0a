"""zk0's own lerobot processor steps, registered by name so that a saved policy folder reloads with them.

`model.environment_state` (the closed-loop ladder's rung 1, "SmolVLA told the answer"): SmolVLA reads
the robot state and the cameras only, so the sim recording's privileged `observation.environment_state`
(the cube's and the target's positions) reaches it through the state. The preprocessor normalizes it with
the federation's stats like any input, then this step appends it after the joints; SmolVLA pads the state
to `max_state_dim` as always, so the state projection simply sees more non-zero inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lerobot.configs.types import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.processor import ObservationProcessorStep, ProcessorStepRegistry
from lerobot.utils.constants import OBS_ENV_STATE, OBS_STATE

ENV_INTO_STATE = "zk0_environment_state_into_state"


@dataclass
@ProcessorStepRegistry.register(name=ENV_INTO_STATE)
class EnvironmentStateIntoState(ObservationProcessorStep):
    """The (normalized) environment state appended to `observation.state`, then dropped as a key."""

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        if OBS_ENV_STATE not in observation:
            raise ValueError(
                f"this policy reads {OBS_ENV_STATE} (trained with model.environment_state=true) but the "
                f"observation has only {sorted(observation)}: give it a sim observation (the rollout passes "
                "it) or use a policy trained without model.environment_state"
            )
        env = observation.pop(OBS_ENV_STATE)
        state = observation[OBS_STATE]
        env = torch.as_tensor(env, device=state.device, dtype=state.dtype)
        if state.dim() == 3 and env.dim() == 2:  # (B, steps, D) states with one environment state per item
            env = env[:, None].expand(-1, state.shape[1], -1)
        observation[OBS_STATE] = torch.cat([state, env], dim=-1)
        return observation

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        obs = dict(features.get(PipelineFeatureType.OBSERVATION, {}))
        env = obs.pop(OBS_ENV_STATE, None)
        if env is not None and OBS_STATE in obs:
            obs[OBS_STATE] = PolicyFeature(FeatureType.STATE, (obs[OBS_STATE].shape[0] + env.shape[0],))
        return {**features, PipelineFeatureType.OBSERVATION: obs}
