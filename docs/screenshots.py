"""Screenshots of web_demo.py's tabs (docs/web_demo_<tab>.png) with headless Chromium (Debian's `chromium`).

    python docs/screenshots.py [--chromium /usr/bin/chromium] [-- <web_demo.py flags>]

Starts the demo on a free loopback port (the tiny default model unless flags say otherwise), opens each tab through
its ?tab= link, and stops the demo. Chinese text needs a CJK font (e.g. Debian's fonts-wqy-microhei).
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABS = ("chat", "novel", "eval")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1280,900", "--virtual-time-budget=15000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, demo: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if demo.poll() is not None:
            sys.exit(f"error: web_demo.py exited with {demo.returncode}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    sys.exit(f"error: web_demo.py did not answer at {url} within {timeout:.0f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--out_dir", default=str(ROOT / "docs"))
    p.add_argument("demo_args", nargs="*", help="flags for web_demo.py (after --)")
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory() as tmp:
        demo = subprocess.Popen([sys.executable, str(ROOT / "web_demo.py"), "--port", str(port), "--ratings_db",
                                 str(Path(tmp) / "ratings.sqlite"), *args.demo_args], cwd=ROOT,
                                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
        try:
            wait_until_up(url, demo)
            for tab in TABS:
                out = Path(args.out_dir) / f"web_demo_{tab}.png"
                profile = tempfile.mkdtemp(dir=tmp)  # a fresh profile: nothing from an earlier run leaks in
                subprocess.run([args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                f"--screenshot={out}", f"{url}?tab={tab}"], check=True, timeout=120,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                print(f"{out} ({out.stat().st_size // 1024} KB)")
        finally:
            demo.terminate()
            demo.wait(timeout=30)


if __name__ == "__main__":
    main()
