import os
import sys
from pathlib import Path

import pytest

# Offline by construction: no test may reach a hub or an update server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_NPZ = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"


@pytest.fixture
def tiny_overrides():
    """The smallest model that is still the real architecture (UNet++ + PatchGAN)."""
    return ["model.encoder=resnet18", "model.decoder_channels=[32,16,16,8]", "model.time_dim=32",
            "model.d_channels=16", "model.image_size=32", "train.batch_size=4", "log.progress=false"]


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's one tiny trained run (cli_helpers.tiny_run): read it, never write into it."""
    from cli_helpers import tiny_run

    return tiny_run(tmp_path_factory.getbasetemp() / "dgan-tiny-run")
