"""Installed versions against the supported ranges (`requirements.txt`) and the lock (`constraints.txt`: the exact
versions CI tested), and the start-up check novelkit runs at import.

`check_startup()`: a transformers, peft or accelerate older than `requirements.txt` allows stops the program with one
line naming both versions (their APIs are followed closely: an older one would fail deep inside); a newer one than the
range gets one warning line; dependency warnings that are not the user's business (deprecations inside a dependency's
own calls, a CPU kernel bitsandbytes looks for at import) are silenced. `python -m novelkit.env` prints the report.
Only the standard library and `packaging` (a transformers dependency) here: this runs at every import of novelkit.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = (ROOT / "requirements.txt", ROOT / "requirements-test.txt")
LOCK = ROOT / "constraints.txt"
# Followed closely (model classes, cache API, Trainer, adapters): refused at start-up when older than supported.
CHECKED_AT_STARTUP = ("transformers", "peft", "accelerate")
# Heavy packages pulled in by the direct ones, whose versions matter in a bug report.
TRANSITIVE = ("tokenizers", "huggingface-hub", "safetensors", "gradio-client", "pydantic", "starlette", "triton",
              "liger-kernel")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(*paths: Path) -> dict:
    """{canonical name: packaging Requirement} of requirement / constraint files (comments and -r/-c lines skipped)."""
    from packaging.requirements import Requirement

    found = {}
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                requirement = Requirement(line)
                found[canonical(requirement.name)] = requirement
    return found


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def range_problem(requirement, version: str) -> str | None:
    """'older' or 'newer' when `version` is outside the requirement's range, None inside it."""
    from packaging.version import Version

    v = Version(version)
    for spec in requirement.specifier:
        if not spec.contains(v, prereleases=True):
            if spec.operator in ("==", "!=", "==="):
                return "older" if v < Version(spec.version.rstrip(".*")) else "newer"
            return "newer" if spec.operator in ("<", "<=") else "older"
    return None


def startup_problems() -> tuple[list[str], list[str]]:
    """(errors, warnings): one line each for a closely followed package outside its supported range."""
    errors, notes = [], []
    requirements = read_requirements(*REQUIREMENTS)
    for name in CHECKED_AT_STARTUP:
        requirement, version = requirements.get(name), installed_version(name)
        if requirement is None or version is None:
            continue
        problem = range_problem(requirement, version)
        if problem == "older":
            errors.append(f"{name} {version} is installed; novelkit needs {requirement} "
                          f"(pip install -r requirements.txt -c constraints.txt installs the tested versions)")
        elif problem == "newer":
            notes.append(f"{name} {version} is newer than novelkit supports ({requirement}); untested, "
                         f"`python -m novelkit.env` lists the tested versions")
    return errors, notes


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record):
        return not str(record.msg).startswith(self.starts)


def quiet_dependency_noise() -> None:
    """Silence what dependencies print on every run that a user can do nothing about."""
    # peft reads model.is_gradient_checkpointing, which transformers deprecated
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # the Trainer asks for pinned memory by default; on a machine without a GPU torch says it will not pin
    warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator is found")
    # inductor, when it compiles the generation engine's decode step (once per model shape)
    warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled on the fly", category=UserWarning)
    # jieba imports pkg_resources, which recent setuptools deprecates
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    # bitsandbytes looks for an optional CPU kernel package at import (LoRA and full fine-tuning never use it)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("Failed to load CPU gemm_4bit_forward"))
    # DeepSpeed, imported by the Trainer, on a machine without a GPU
    logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))


def check_startup() -> None:
    """Refuse unsupported versions with one line (exit status 2), warn about untested newer ones, quiet the rest."""
    quiet_dependency_noise()
    if os.environ.get("NOVELKIT_SKIP_VERSION_CHECK") == "1":
        return
    errors, notes = startup_problems()
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        raise SystemExit(2)
