import os
import sys
from pathlib import Path

import pytest
import torch

import dgan  # noqa: F401 - sets the offline environment (HF hub, albumentations) for every test

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # the tests' MLflow stores phone nowhere

# Under pytest-xdist (pyproject's addopts) two workers share the two cores: one torch thread each,
# since OpenMP threads spinning across processes cost more than they gain (the CLIs the tests start
# run with one thread for the same reason, cli_helpers.cli_env).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_NPZ = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"


@pytest.fixture
def tiny_overrides():
    """The one tiny configuration (cli_helpers.TINY), for tests that build the model in-process."""
    from cli_helpers import TINY_QUIET

    return list(TINY_QUIET)


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's one tiny trained run (cli_helpers.tiny_run): read it, never write into it."""
    from cli_helpers import tiny_run

    return tiny_run(tmp_path_factory.getbasetemp() / "dgan-tiny-run")
