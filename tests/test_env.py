"""The start-up version check and the environment report (`python -m novelkit.env`), against the real requirements
and lock files; an old transformers is faked with a dist-info folder placed first on the path."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from novelkit import versions
from novelkit.env import package_rows

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path, fake=None):
    """Python with a fake installed `fake = (name, version)` ahead of the real one on the path."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if fake:
        name, version = fake
        info = tmp_path / "fake" / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        env["PYTHONPATH"] = str(tmp_path / "fake")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_an_old_transformers_is_refused_in_one_line(tmp_path):
    result = run(["-c", "import novelkit.data.readers"], tmp_path, fake=("transformers", "4.57.1"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    required = versions.read_requirements(*versions.REQUIREMENTS)["transformers"]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "transformers 4.57.1 is installed" in lines[0] and str(required) in lines[0]


def test_a_newer_peft_than_the_range_only_warns(tmp_path):
    result = run(["-c", "import novelkit.data.readers; print('ran')"], tmp_path, fake=("peft", "9.0.0"))
    assert result.returncode == 0 and result.stdout.strip() == "ran"
    assert result.stderr.startswith("warning: peft 9.0.0 is newer than novelkit supports")


def test_the_report_still_runs_and_marks_the_unsupported_version(tmp_path):
    result = run(["-m", "novelkit.env"], tmp_path, fake=("transformers", "4.57.1"))
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("transformers "))
    assert row.split()[1] == "4.57.1" and row.split()[-1] == "UNSUPPORTED"
    assert "Python " in result.stdout and "torch " in result.stdout


def test_the_report_compares_with_the_lock():
    rows = {row[0]: row for row in package_rows()}
    lock = versions.read_requirements(versions.LOCK)
    for name in ("transformers", "peft", "accelerate", "torch", "gradio", "tokenizers", "huggingface-hub"):
        package, installed, locked, supported, status = rows[name]
        assert locked == str(next(iter(lock[name].specifier)).version)
        assert status == ("ok" if installed.split("+")[0] == locked else "untested"), rows[name]


@pytest.mark.parametrize("version, expected", [("5.16.0", "older"), ("5.17.0", None), ("5.99", None),
                                               ("6.0.0", "newer")])
def test_range_problem(version, expected):
    from packaging.requirements import Requirement

    assert versions.range_problem(Requirement("transformers>=5.17,<6"), version) == expected


def test_every_direct_dependency_is_locked():
    lock = versions.read_requirements(versions.LOCK)
    for name in versions.read_requirements(*versions.REQUIREMENTS):
        assert name in lock and next(iter(lock[name].specifier)).operator == "==", name


@pytest.mark.parametrize("message, category", [
    ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning),
    ("'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be used.",
     UserWarning),
    ("\nOnline softmax is disabled on the fly since Inductor decides to\nsplit the reduction.", UserWarning),
    ("pkg_resources is deprecated as an API.", UserWarning),
])
def test_dependency_warnings_are_quiet(message, category):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        versions.quiet_dependency_noise()
        warnings.warn(message, category)
        warnings.warn("a warning of our own", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning of our own"]


def test_dependency_log_lines_are_quiet(caplog):
    import logging

    caplog.set_level(logging.WARNING)
    versions.quiet_dependency_noise()
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("something else")
    assert [record.getMessage() for record in caplog.records] == ["something else"]
