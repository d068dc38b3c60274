"""`compile_webgpu`: an export directory -> a WebGPU artifact directory a browser can open.

Reads top to bottom: import the ONNX graph into Relax (int32 integers, last-position logits), quantize the weights,
compile for TVM's webgpu target with a wasm32 host (the default GPU pipeline schedules every kernel with dlight),
link the kernels with TVM's wasm runtime, bundle tvmjs around the link's glue, write the weight shards, the
tokenizer, the page and the manifest.

Artifact layout:
  index.html, app.js, tokenizer.js     the page (prompt box, streamed output, speed figures)
  tvmjs.bundle.js, model.wasm          TVM's JS runtime and the compiled model (kernels + VM bytecode)
  params/tensor-cache.json, params/shard_*.bin   weights in <= 32 MB shards
  tokenizer.web.json                   the tokenizer, for tokenizer.js
  manifest.json                        versions, target, quant, config, every file's sha256, what the page needs
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from llamac.errors import InputError
from llamac.export.config import ModelConfig
from llamac.runtime.model import generation_eos
from llamac.runtime.tvm_backend import sha256_file

FORMAT_VERSION = 1
PAGE_DIR = Path(__file__).parent / "page"
QUANTS = ("f32", "q4")  # compute is f32 in both; q4 packs weights 4-bit (f32 scales) and dequantizes in-kernel
WASM_HOST = {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}


def webgpu_target():
    import tvm

    return tvm.target.Target({"kind": "webgpu"}, host=WASM_HOST)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[llamac webgpu] {msg}", flush=True)



def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from llamac.web.toolchain import emcc_version

    try:
        llamac_version = version("llamac")
    except PackageNotFoundError:
        llamac_version = "0+unknown"
    return {"llamac": llamac_version, "tvm": version("apache-tvm"), "emscripten": emcc_version()}


def compile_webgpu(export_dir: Path, quant: str, max_seq_len: int, out: Path, progress: bool = True) -> None:
    """Compiles the export at export_dir for WebGPU into the directory out (written atomically)."""
    from llamac.web import jsbundle, wasm_runtime
    from llamac.web.relax_import import import_export
    from llamac.web.shards import write_shards
    from llamac.web.tokenizer_web import write_tokenizer

    export_dir, out = Path(export_dir), Path(out)
    if quant not in QUANTS:
        raise InputError(f"the webgpu target supports --quant {' or '.join(QUANTS)} (f32 compute), not {quant!r}")
    if not (export_dir / "model.onnx").is_file():
        raise InputError(f"{export_dir} is not an export directory (no model.onnx)")
    cfg = ModelConfig.load(export_dir)
    if max_seq_len < 1 or max_seq_len > cfg.max_position_embeddings:
        raise InputError(f"--max-seq-len must be 1..{cfg.max_position_embeddings} for this model")

    timings: dict[str, float] = {}
    t_all = t = time.time()
    wasm_runtime.runtime_objects(progress=progress)  # built once per TVM/emscripten version
    jsbundle.ensure_node_packages()
    timings["runtime_cache_s"] = time.time() - t

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t = time.time()
        _log(progress, f"importing {export_dir / 'model.onnx'}")
        model = import_export(export_dir, cfg)
        mod, weights, names = model.mod, model.weights, model.weight_names
        quantized: list[str] = []
        if quant == "q4":
            from llamac.web.q4 import quantize_q4

            mod, weights, names, quantized = quantize_q4(mod, weights, names, model.num_inputs)
        timings["import_s"] = time.time() - t

        t = time.time()
        _log(progress, "compiling kernels for webgpu (dlight GPU schedules)")
        import tvm

        from llamac.web.schedule import webgpu_pipeline

        target = webgpu_target()
        ex = tvm.compile(mod, target, relax_pipeline=webgpu_pipeline(target))
        timings["compile_s"] = time.time() - t

        t = time.time()
        _log(progress, "linking model.wasm with the TVM wasm runtime")
        logs = tmp / "build-logs"
        logs.mkdir()

        def fcompile(output, objects, options=None, **_kw):
            wasm_runtime.link_wasm([Path(o) for o in objects], Path(output), logs / "link.log")

        fcompile.object_format = "o"  # wasm objects: wasm-ld 14 cannot read TVM's LLVM 22 bitcode
        ex.export_library(str(tmp / "model.wasm"), fcompile=fcompile)
        timings["link_s"] = time.time() - t

        t = time.time()
        jsbundle.bundle_tvmjs(tmp / "model.js", tmp / "tvmjs.bundle.js", logs / "bundle.log")
        (tmp / "model.js").unlink()
        shutil.rmtree(logs)
        params = write_shards(weights, names, tmp)
        tokenizer = write_tokenizer(export_dir, tmp)
        for f in ("index.html", "app.js", "tokenizer.js"):
            shutil.copy(PAGE_DIR / f, tmp / f)
        # config and tokenizer files as exported, so Python tools (llamac run --browser -p TEXT) can read them too
        for f in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
                  "tokenizer_config.json"):
            if (export_dir / f).is_file():
                shutil.copy(export_dir / f, tmp / f)
        timings["package_s"] = time.time() - t
        timings["total_s"] = time.time() - t_all

        manifest = {
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "target": {"name": "webgpu", "kind": "webgpu", "host": WASM_HOST, "compute_dtype": "float32",
                       "requires_features": []},
            "quant": quant,
            "max_seq_len": max_seq_len,
            "config": cfg.to_hf_dict(),
            "tokenizer": tokenizer,
            "web": {
                "wasm": "model.wasm",
                "params": params,
                "weight_names": names,
                # ONNX initializers stored q4 (the rest stay f32): lets tests build the exact f32 reference
                "quantized_weights": sorted(model.onnx_names.get(n, n) for n in quantized),
                "num_layers": cfg.num_layers,
                "num_kv_heads": cfg.num_kv_heads,
                "head_dim": cfg.head_dim,
                "vocab_size": cfg.vocab_size,
                "bos_token_id": cfg.bos_token_id,
                # Llama 3 Instruct lists <|eot_id|> only in generation_config.json, as the native runtime reads
                "eos_token_ids": sorted(set(cfg.eos_token_ids) | generation_eos(export_dir)),
            },
            "build": {k: round(v, 2) for k, v in timings.items()},
        }
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        _log(progress, f"wrote {out} ({size / 1e6:.1f} MB) in {timings['total_s']:.0f} s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
