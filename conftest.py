"""Every test session (tests/ and the notebooks run by nbmake) gets its own zk0 and Hugging Face homes,
offline and on the CPU; the notebooks' kernels inherit this environment."""

import os
import tempfile
from pathlib import Path

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="zk0-tests-"))
os.environ["ZK0_HOME"] = str(_SESSION_HOME)
os.environ["HF_HOME"] = str(_SESSION_HOME / "hf")
os.environ["HF_LEROBOT_HOME"] = str(_SESSION_HOME / "hf" / "lerobot")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
