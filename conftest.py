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
# recording, a sweep or the fault run are built once), and the files that read the session's smoke run
# go to the same worker, so that run happens once.
SMOKE_RUN_FILES = {"test_baselines.py", "test_deploy.py", "test_federation.py", "test_page.py"}


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class ByFileAndSmokeRun(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return "smoke-run" if Path(file).name in SMOKE_RUN_FILES else file

    return ByFileAndSmokeRun(config, log)
