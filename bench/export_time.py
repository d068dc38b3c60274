"""Export the brief's 123M model and print wall time and peak RSS (target: < 60 s, RSS < 2x the f32 weights).

Usage: python bench/export_time.py [--shape 123m] [--workdir /tmp/llamac-bench]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from models import make_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="123m")
    ap.add_argument("--workdir", default="/tmp/llamac-bench")
    a = ap.parse_args()
    ckpt = make_checkpoint(Path(a.workdir) / f"hf-{a.shape}", a.shape)
    weights = (ckpt / "model.safetensors").stat().st_size
    out = Path(a.workdir) / f"onnx-{a.shape}"
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llamac", "export", str(ckpt), "-o", str(out)], check=True)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"shape {a.shape}: f32 weights {weights / 2**20:.0f} MiB, export {wall:.1f} s, "
          f"peak RSS {rss / 2**20:.0f} MiB ({rss / weights:.2f}x weights), load avg before {load:.2f}")


if __name__ == "__main__":
    main()
