"""torch.compile's on-disk caches (inductor's compiled graphs, Triton kernels, autotuning) kept under
`$NOVELKIT_HOME/compile-cache`, so a second start on the same model shape loads the kernels instead of compiling them
again, after a reboot too (inductor's own default is a folder under /tmp). A TORCHINDUCTOR_CACHE_DIR set by the user
wins. Call `use_compile_cache()` before the first compilation.

The generation engine also notes there which decode steps it has compiled (`remember_compiled`), so that a job can
tell a compilation of seconds (kernels cached) from one of minutes (`compiled_before`) when it decides whether
compiling pays.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .home import cache_home


def use_compile_cache() -> str:
    """The cache folder in use (set for this process and the processes it starts)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_home() / "compile-cache")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


# the code the compiled decode step is traced from: a change to it compiles anew, whatever the marker says
STEP_SOURCES = ("generation/engine_model.py", "generation/sampling.py")


def step_key(config, dtype, device, frozen: bool) -> str:
    """What the compiled decode step depends on: the model's sizes, dtype, GPU, torch version, frozen weights and the
    step's own code."""
    import torch

    fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
    described = {name: getattr(config, name, None) for name in fields}
    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    code = hashlib.sha256(b"".join((Path(__file__).parent / name).read_bytes() for name in STEP_SOURCES))
    described.update(dtype=str(dtype), gpu=gpu, torch=torch.__version__, frozen=frozen, code=code.hexdigest()[:16])
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _marker(key: str) -> Path:
    return Path(use_compile_cache()) / "novelkit-compiled" / key


def compiled_before(key: str) -> bool:
    return _marker(key).exists()


def remember_compiled(key: str) -> None:
    marker = _marker(key)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
