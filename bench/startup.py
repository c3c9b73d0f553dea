"""Seconds from ``python app.py`` to the first served page (median of N starts), against the floor measured in
the same run: a Python process that only imports gradio (what the studio cannot start without; torch,
diffusers and the tokenizer load after the page is served or on first use).

    python bench/startup.py [--runs 3] [--sample]

Each start gets a fresh workspace and runs ``app.py --no-sample`` (as a restart, which has its datasets
already); ``--sample`` measures a first start instead, with the sample dataset building in the background. The page counts as served when ``GET /`` answers 200 with the
app's HTML. The last line is one JSON object: ``startup_median_s``, ``startup_s`` (every run),
``import_floor_s``, ``goal_s`` (5) and ``ratio_goal_over_median`` (above 1: the goal is met).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_page(sample: bool, timeout_s: float = 120.0) -> float:
    port = _free_port()
    with tempfile.TemporaryDirectory() as ws:
        cmd = [sys.executable, "app.py", "--workspace", ws, "--port", str(port)] + ([] if sample else ["--no-sample"])
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - t0 < timeout_s:
                if proc.poll() is not None:
                    raise RuntimeError(f"app.py exited with {proc.returncode} before serving")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                        if r.status == 200 and b"gradio_config" in r.read():
                            return time.perf_counter() - t0
                except OSError:
                    time.sleep(0.05)
            raise RuntimeError(f"no page within {timeout_s:.0f} s")
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def import_floor() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gradio"], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sample", action="store_true", help="measure a first start (the sample build runs too)")
    args = p.parse_args(argv)
    floors, starts = [], []
    for i in range(args.runs):
        floors.append(import_floor())
        starts.append(time_to_page(args.sample))
        print(f"run {i + 1}: page after {starts[-1]:.2f} s (import floor {floors[-1]:.2f} s)", flush=True)
    med = statistics.median(starts)
    out = {"startup_median_s": round(med, 3), "startup_s": [round(x, 3) for x in starts],
           "import_floor_s": round(statistics.median(floors), 3),
           "ratio_floor_over_median": round(statistics.median(floors) / med, 3), "goal_s": GOAL_S,
           "ratio_goal_over_median": round(GOAL_S / med, 3), "first_start": bool(args.sample),
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
