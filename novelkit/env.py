"""`python -m novelkit.env`: Python, torch (CUDA, GPUs) and each dependency's installed version beside the lock
(`constraints.txt`: the exact versions CI tested) and the supported range (`requirements.txt`), marking what differs.
Paste its output into a bug report.
"""

from __future__ import annotations

import platform
import subprocess
import sys

from .versions import LOCK, REQUIREMENTS, ROOT, TRANSITIVE, installed_version, range_problem, read_requirements


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + (" (modified)" if dirty else "") if out.returncode == 0 else "not a git checkout"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _torch_lines() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["torch: not installed"]
    if not torch.cuda.is_available():
        return [f"torch {torch.__version__}, CUDA: not available (CPU only)"]
    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s), "
             f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        lines.append(f"  GPU {index}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                     f"compute capability {props.major}.{props.minor}")
    return lines


def package_rows() -> list[tuple[str, str, str, str, str]]:
    """(package, installed, lock, supported range, status) for the direct dependencies and the heavy transitive ones.
    status: "ok" (the locked version), "untested" (another version inside the range), "UNSUPPORTED" (outside it),
    "missing", or "-" for an optional package that is not installed."""
    from packaging.version import Version

    requirements = read_requirements(*REQUIREMENTS)
    lock = read_requirements(LOCK)
    names = list(requirements) + [n for n in TRANSITIVE if n not in requirements]
    rows = []
    for name in names:
        version = installed_version(name)
        requirement = requirements.get(name)
        pinned = lock.get(name)
        locked = next((s.version for s in pinned.specifier if s.operator == "=="), "") if pinned else ""
        supported = ",".join(sorted(map(str, requirement.specifier), key=lambda s: s[0] != ">")) if requirement else ""
        if version is None:
            status = "missing" if requirement else "-"
        elif requirement and range_problem(requirement, version):
            status = "UNSUPPORTED"
        elif locked and Version(version).base_version == Version(locked).base_version:
            status = "ok"
        else:
            status = "untested" if locked else ""
        rows.append((name, version or "", locked, supported, status))
    return rows


def report() -> str:
    from . import __version__

    lines = [f"novelkit {__version__} (git {_git_commit()}) at {ROOT}",
             f"Python {platform.python_version()} ({sys.executable}), {platform.platform()}",
             *_torch_lines(), ""]
    rows = [("package", "installed", "lock (tested)", "supported", "status"), *package_rows()]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    off = [row[0] for row in rows[1:] if row[4] in ("untested", "UNSUPPORTED", "missing")]
    lines.append("")
    if off:
        lines.append(f"{len(off)} differ from the tested stack: {', '.join(off)}. "
                     f"`pip install -r requirements.txt -c constraints.txt` installs the tested versions.")
    else:
        lines.append("every package is at the tested (locked) version")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
