"""Compile the brief's 123M model at q4 for x86_64 and arm64; print wall time and peak RSS of each compile.

Target: under 3 minutes each on 2 cores. The export (random f32 weights, `bench/models.py`) is made once and reused;
each compile runs in its own process so its peak RSS is its own.

Usage: python bench/compile_time.py [--shape 123m] [--quant q4] [--targets x86_64,arm64] [--workdir /tmp/llamac-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from models import make_checkpoint  # noqa: E402

CHILD = """
import json, resource, sys, time
from llamac.compiler import compile_model
t = time.perf_counter()
compile_model(sys.argv[1], sys.argv[2], quant=sys.argv[3], out=sys.argv[4], force=True, progress=True)
print(json.dumps({"wall": time.perf_counter() - t,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="123m")
    ap.add_argument("--quant", default="q4")
    ap.add_argument("--targets", default="x86_64,arm64")
    ap.add_argument("--workdir", default="/tmp/llamac-bench")
    a = ap.parse_args()
    work = Path(a.workdir)
    ckpt = make_checkpoint(work / f"hf-{a.shape}", a.shape)
    onnx_dir = work / f"onnx-{a.shape}"
    if not (onnx_dir / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "llamac", "export", str(ckpt), "-o", str(onnx_dir), "--force"],
                       check=True)
    for target in a.targets.split(","):
        out = work / f"art-{a.shape}-{target}-{a.quant}"
        load = os.getloadavg()[0]
        r = subprocess.run([sys.executable, "-c", CHILD, str(onnx_dir), target, a.quant, str(out)],
                           check=True, stdout=subprocess.PIPE, text=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{a.shape} {a.quant} {target:14s} compile {res['wall']:6.1f} s  peak RSS {res['rss'] / 2**20:6.0f} MiB"
              f"  artifact {size / 2**20:.0f} MiB  load avg before {load:.2f}", flush=True)


if __name__ == "__main__":
    main()
