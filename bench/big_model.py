"""Compile a full Llama-3.2-1B-shaped model (random weights, 1.24B parameters) and benchmark it once.

    python bench/big_model.py [--quant q4] [--target native] [--threads 2] [-p 512] [-n 128]

The checkpoint (5 GB of f32 safetensors, `bench/models.py`) and the artifact are cached in $LLAMAC_BENCH_CACHE
(~/.cache/llamac-bench). Prints the compile time and peak RSS, the artifact size, and `llamac bench`'s figures
(one repetition: it is the size that is the point here) with the load average; record them in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import models  # noqa: E402
import peers  # noqa: E402

REPO = HERE.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="q4")
    ap.add_argument("--target", default="native")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    a = ap.parse_args()
    target = peers.native_target() if a.target == "native" else a.target
    cache = peers.cache_dir()
    hf = cache / "hf-1b"
    if not (hf / "config.json").is_file():
        peers.log("writing the 1B checkpoint (random weights)")
        models.make_checkpoint(hf, "1b")
    art = cache / f"llamac-1b-{target}" / a.quant
    llamac = REPO / ".venv" / "bin" / "llamac"
    t0 = time.perf_counter()
    r = subprocess.run([str(llamac), "compile", str(hf), "--target", target, "--quant", a.quant, "-o", str(art),
                        "--force", "--max-seq-len", str(max(a.p + a.n, 1024))], text=True)
    compile_s = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"llamac compile failed (exit {r.returncode})")
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    manifest = json.loads((art / "manifest.json").read_text())
    cfg = manifest["model"]
    params = sum(int(t["quant"]["k"]) * int(t["quant"]["n"]) for t in manifest["weights"]["tensors"]
                 if t["quant"] and t["key"] in ("q", "w"))
    params += sum(int(t["nbytes"]) // 4 for t in manifest["weights"]["tensors"] if not t["quant"])
    size = sum(f.stat().st_size for f in art.iterdir() if f.is_file())
    b = subprocess.run([str(llamac), "bench", str(art), "-p", str(a.p), "-n", str(a.n), "-r", "1",
                        "--threads", str(a.threads), "--json"], capture_output=True, text=True)
    if b.returncode:
        sys.exit(f"llamac bench failed: {b.stderr.strip().splitlines()[-1:]}")
    res = json.loads(b.stdout.strip().splitlines()[-1])
    print(json.dumps({"params": params, "hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"],
                      "vocab": cfg["vocab_size"], "target": target, "quant": a.quant,
                      "compile_s": round(compile_s, 1), "compile_peak_rss_mib": round(peak_mib),
                      "artifact_mib": round(size / 2**20), "cores": os.cpu_count(), **res}, indent=1))


if __name__ == "__main__":
    main()
