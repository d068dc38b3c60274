"""WebGPU build time and artifact size per model, and (with --run) speed in headless Chromium.

    python bench/webgpu_build.py                      # tiny test config + the brief's 123M shape, f32 and q4
    python bench/webgpu_build.py --models tiny --run  # also generate in Chromium (SwiftShader here: CPU-emulated GPU)

Exports and artifacts go under --work (default /tmp/llamac-bench-webgpu) and are reused. The runtime cache
(TVM's wasm runtime, built once per TVM/emscripten version) is built first and timed separately.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))


def _export(work: Path, model: str) -> Path:
    from llamac.export.exporter import export

    ex = work / f"ex_{model}"
    if (ex / "model.onnx").is_file():
        return ex
    if model == "tiny":
        from hf_models import CONFIGS, make_hf_checkpoint

        make_hf_checkpoint(work / "hf_tiny", **CONFIGS["llama3_gqa_tied"])
        return export(work / "hf_tiny", ex, progress=False)
    from models import make_checkpoint

    return export(make_checkpoint(work / f"hf_{model}", model), ex, progress=False)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,123m")
    ap.add_argument("--quants", default="f32,q4")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamac-bench-webgpu"))
    ap.add_argument("--run", action="store_true", help="also generate --tokens tokens after a --tokens prompt")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for page load, and again for generating")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from llamac.web import jsbundle, wasm_runtime
    from llamac.web.build import compile_webgpu

    t = time.time()
    wasm_runtime.runtime_objects()
    jsbundle.ensure_node_packages()
    print(f"runtime cache ready in {time.time() - t:.1f} s (0 if it was already built)")

    rows = []
    for model in args.models.split(","):
        ex = _export(args.work, model)
        for quant in args.quants.split(","):
            art = args.work / f"art_{model}_{quant}"
            load = os.getloadavg()[0]
            t = time.time()
            compile_webgpu(ex, quant, args.max_seq_len, art, progress=False)
            row = {"model": model, "quant": quant, "build_s": round(time.time() - t, 1), "load": round(load, 1),
                   "artifact_mb": round(_size(art) / 1e6, 1), "wasm_mb": round((art / "model.wasm").stat().st_size / 1e6, 1),
                   "params_mb": round(_size(art / "params") / 1e6, 1)}
            row["phases"] = json.loads((art / "manifest.json").read_text())["build"]
            if args.run:
                from llamac.runtime.browser import run_in_browser

                try:
                    n = args.tokens
                    r = run_in_browser(art, [1] + list(range(10, 9 + n)), n, timeout_s=args.timeout)
                    row.update(prompt=n, generated=len(r["tokens"]), load_s=round(r.get("load_s", 0), 1),
                               prefill_tok_s=round(r["prefill_tok_s"], 2), decode_tok_s=round(r["decode_tok_s"], 2),
                               adapter=r.get("adapter"))
                except RuntimeError as e:
                    row["browser_error"] = str(e)[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)

    print("\n| model | quant | build | artifact | model.wasm | weights | page load | prefill tok/s | decode tok/s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['quant']} | {r['build_s']} s | {r['artifact_mb']} MB | {r['wasm_mb']} MB | "
              f"{r['params_mb']} MB | {r.get('load_s', '-')} s | {r.get('prefill_tok_s', r.get('browser_error', '-'))} | "
              f"{r.get('decode_tok_s', '-')} | {r['load']} |")


if __name__ == "__main__":
    main()
