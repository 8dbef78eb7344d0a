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

# With `pytest -n 2` (machines with cores to spare; `make test` is serial), each worker takes whole files (module fixtures such as a
# recording or the fault run are built once), and the files that read one of the session's shared runs go
# to the same worker, so that run happens once: the smoke run, and the two-point sweep (deploy-local is
# compared to its FedProx point).
SHARED_RUN_FILES = {
    "test_baselines.py": "smoke-run",
    "test_federation.py": "smoke-run",
    "test_page.py": "smoke-run",
    "test_membership.py": "smoke-run",
    "test_deploy.py": "sweep",
    "test_notebooks.py": "sweep",
}


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class ByFileAndSharedRun(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return SHARED_RUN_FILES.get(Path(file).name, file)

    return ByFileAndSharedRun(config, log)
