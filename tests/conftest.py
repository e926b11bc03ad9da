import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NOVELKIT_SHARED", ROOT.parent / "shared"))
SHARED_DATA = SHARED / "data"
SHARED_ASSETS = SHARED / "assets"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_assets():
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"{SHARED_ASSETS} not found")
    return SHARED_ASSETS
