"""Running a folder's entry script inside the test process: no interpreter start-up, which costs seconds per run."""

import runpy
import sys


def run_script(script, *argv) -> int:
    """Run `script` as `python script argv...` would; its exit code (0 when it returns)."""
    saved = sys.argv
    sys.argv = [str(script), *map(str, argv)]
    try:
        runpy.run_path(str(script), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = saved
