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


# The embedded default model is built once into the repository's ignored .cache/ (its folder name is a hash of the
# corpus and recipe, so a changed recipe builds a new one); subprocesses of the tests inherit the variable.
os.environ.setdefault("NOVELKIT_HOME", str(ROOT / ".cache" / "novelkit"))


@pytest.fixture(scope="session")
def novelkit_home():
    return Path(os.environ["NOVELKIT_HOME"])


@pytest.fixture(scope="session")
def default_model_dir(novelkit_home):
    from novelkit.models.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from novelkit.models.loading import load_tokenizer

    return load_tokenizer(str(default_model_dir))
