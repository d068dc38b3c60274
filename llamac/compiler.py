"""`llamac compile`: checkpoint or export dir -> artifact for one target.

    export (if needed) -> import ONNX into Relax -> rewrite (KV cache in place, quantized kernels)
    -> build (schedule, lower, link for the target) -> package (weights, tokenizer, manifest; atomic rename)
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from llamac import __version__, artifact
from llamac.errors import InputError, refuse_replacing_source
from llamac.quantize import Scheme, get_scheme, pack, quantize
from llamac.targets import Target, load_target

DEFAULT_CONTEXT_CAP = 4096
NOT_TOKENIZER = {"model.onnx", "model.onnx.data", "config.json"}


def compile_model(src: str | Path, target: str | Path = "x86_64", quant: str = "q4", max_seq_len: int | None = None,
                  out: str | Path = "model.llamac", progress: bool = True, group_size: int | None = None,
                  force: bool = False, quantize_embeddings: bool = True, tuning: dict | bool | None = None) -> Path:
    """Compile `src` (HF dir, .gguf, llama2.c .bin, or an export dir) for `target`; returns the artifact dir.
    tuning: None = the target's tuned parameters where `llamac tune` left some (llamac.tune), False = the target
    file's own, a dict = these."""
    stage = _Stages(progress)
    tgt = load_target(target)
    cc = tgt.check_buildable()
    scheme = _scheme(quant, group_size)
    tgt = _tuned(tgt, scheme.name, tuning, stage)
    src, out = Path(src), Path(out)
    refuse_replacing_source(out, src)
    if max_seq_len is not None and (src / "config.json").is_file() and not (src / "manifest.json").is_file():
        _context(max_seq_len, _model_context(src))     # a HF or export directory: refuse before a long export
    with tempfile.TemporaryDirectory(prefix="llamac-compile-") as work, artifact.staging(out, force) as tmp:
        is_export = (src / "model.onnx").is_file()
        with stage("export: " + ("SRC is an export directory, used as is" if is_export else f"{src.name} -> ONNX")):
            export_dir = _export_dir(src, Path(work) / "export", progress)
        if group_size is not None:
            _check_group_size(group_size, export_dir)
        if tgt.kind == "webgpu":  # its own pipeline: GPU schedules, wasm host, a page (llamac.web)
            from llamac.web.build import compile_webgpu
            compile_webgpu(export_dir, scheme.name, _context(max_seq_len, _model_context(export_dir)), tmp, progress)
            return out
        with stage("import ONNX into TVM Relax"):
            from llamac import tvm_import, tvm_rewrite
            model, cfg, weights = tvm_import.load_export(export_dir)
            capacity = _context(max_seq_len, cfg.max_position_embeddings)
            # two step functions: any prompt length, and a single token (static shapes: a shorter VM program)
            imports = {"main": tvm_import.import_onnx(model, cfg), "decode": tvm_import.import_onnx(model, cfg, 1)}
        with stage(f"rewrite: KV cache of {capacity} in place, {scheme.name} kernels"):
            plan = tvm_rewrite.rewrite(imports, cfg, capacity, scheme, tgt.lanes, quantize_embeddings, tgt.dot,
                                       tgt.dot_tiles, tgt.float_panels)
        with stage(f"build for {tgt.name} ({tgt.mtriple})"):
            from llamac import tvm_build
            tvm_build.build(plan.mod, tgt.tvm_target(), _vector_lanes(tgt), tmp / artifact.LIBRARY_FILE, cc)
        with stage(f"quantize and pack weights ({scheme.name})"):
            entries = _write_weights(plan, weights, tmp / artifact.WEIGHTS_FILE)
        with stage("package"):
            tokenizer_files = _copy_tokenizer(export_dir, tmp)
            cfg.save(tmp / "config.json")
            artifact.write_manifest(tmp, _manifest(tgt, scheme, cfg, capacity, plan, entries, tokenizer_files,
                                                   quantize_embeddings))
    return out


def _tuned(tgt: Target, quant: str, tuning: dict | bool | None, stage) -> Target:
    from llamac import tune

    if tuning is False or tgt.kind != "llvm":
        return tgt
    params, source = (tuning, None) if isinstance(tuning, dict) else tune.tuned_params(tgt, quant)
    if not params:
        return tgt
    with stage(f"tuned parameters {', '.join(f'{k}={v}' for k, v in params.items())}"
               + (f" (from {source})" if source else "")):
        return tune.apply(tgt, params)


def _scheme(quant: str, group_size: int | None) -> Scheme:
    scheme = get_scheme(quant)
    if group_size is None:
        return scheme
    if scheme.kind != "int":
        raise InputError(f"--group-size applies to q4/q8, not {quant}")
    return get_scheme(f"q{scheme.bits}-g{group_size}" + ("-f32" if scheme.scale_dtype == "float32" and
                                                          scheme.bits == 4 else ""))


def _check_group_size(group_size: int, export_dir: Path) -> None:
    """A weight group wider than a layer's inputs would be padded with zeros up to the group: the storage and the
    decode time of that layer multiplied for nothing. Refused, naming the widest that fits."""
    from llamac.export.config import ModelConfig
    cfg = ModelConfig.load(export_dir)
    narrowest = min(cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size)
    if group_size > narrowest:
        raise InputError(f"--group-size {group_size} is wider than this model's narrowest layer input ({narrowest} "
                         f"values); use at most {narrowest}")


def _export_dir(src: Path, tmp_export: Path, progress: bool) -> Path:
    if (src / "model.onnx").is_file():
        return src
    if not src.exists():
        raise InputError(f"{src} does not exist")
    if (src / "manifest.json").is_file():
        raise InputError(f"{src} is a compiled artifact; compile takes a checkpoint or an export directory")
    from llamac.export.exporter import export
    return export(src, tmp_export, progress=progress)


def _model_context(export_dir: Path) -> int:
    from llamac.export.config import ModelConfig
    return ModelConfig.load(export_dir).max_position_embeddings


def _context(max_seq_len: int | None, model_max: int) -> int:
    if max_seq_len is None:
        return min(model_max, DEFAULT_CONTEXT_CAP)
    if max_seq_len < 1 or max_seq_len > model_max:
        raise InputError(f"--max-seq-len must be between 1 and the model's context ({model_max}), got {max_seq_len}")
    return int(max_seq_len)


def _vector_lanes(tgt: Target) -> int:
    """f32 lanes of one SIMD register, for the generic elementwise schedules."""
    attrs = set(tgt.mattr)
    if "+avx512f" in attrs or "avx512" in tgt.mcpu:
        return 16
    if "+avx2" in attrs or tgt.mcpu in ("haswell", "znver2", "znver3", "x86-64-v3"):
        return 8
    return 4


def _write_weights(plan, weights, path: Path) -> list[dict]:
    """Quantize + pack one weight at a time (bounded memory), in the step function's parameter order."""
    writer = artifact.WeightWriter(path)
    packed_cache: dict[str, dict[str, np.ndarray]] = {}
    try:
        for onnx_name, key in plan.params:
            meta = dict(onnx=onnx_name, key=key, hf=artifact.hf_name(onnx_name),
                        group=artifact.tensor_group(onnx_name))
            if key is None:
                writer.add(onnx_name, np.asarray(weights.get(onnx_name)), quant=None, **meta)
                continue
            pw = plan.packed[onnx_name]
            if onnx_name not in packed_cache:
                w = np.asarray(weights.get(onnx_name), dtype=np.float32)
                if not np.isfinite(w).all():
                    raise InputError(f"weight {onnx_name} holds NaN or Inf")
                packed_cache.clear()       # keys of one weight are consecutive: keep only the current one
                try:
                    qt = quantize(w.T if pw.transpose else w, pw.scheme)
                except InputError as e:
                    raise InputError(f"weight {onnx_name}: {e}") from None
                packed_cache[onnx_name] = pack(qt, pw.lanes, pw.layout)
            writer.add(pw.param_name(key), packed_cache[onnx_name][key],
                       quant=dict(scheme=pw.scheme.to_json(), k=pw.k, n=pw.n, lanes=pw.lanes,
                                  layout=pw.layout, transpose=pw.transpose), **meta)
    finally:
        writer.close()
    return writer.entries


def _copy_tokenizer(export_dir: Path, dest: Path) -> list[str]:
    """Copy the tokenizer and generation files of the export; return the tokenizer's own files."""
    files = []
    for f in sorted(export_dir.iterdir()):
        if f.is_file() and f.name not in NOT_TOKENIZER and not f.name.startswith("."):
            shutil.copyfile(f, dest / f.name)
            if f.name.startswith(("tokenizer", "special_tokens")):
                files.append(f.name)
    return files


def _manifest(tgt: Target, scheme: Scheme, cfg, capacity: int, plan, entries: list[dict], tokenizer_files: list[str],
              quantize_embeddings: bool) -> dict:
    import tvm
    return {
        "llamac_version": __version__,
        "tvm_version": tvm.__version__,
        "target": tgt.to_json(),
        "quant": scheme.to_json(),
        "quantize_embeddings": quantize_embeddings,
        "model": cfg.to_hf_dict(),
        "max_seq_len": capacity,
        "library": artifact.LIBRARY_FILE,
        "entry": {"function": "main", "decode": "decode", "inputs": ["input_ids", "attention_mask", "position_ids"],
                  "logits": "last" if plan.logits_last_only else "all"},
        "kv_cache": {"shape": [1, cfg.num_kv_heads, capacity, cfg.head_dim], "dtype": "float32",
                     "count": 2 * cfg.num_layers, "order": "k0 v0 k1 v1 ..."},
        "weights": {"file": artifact.WEIGHTS_FILE, "tensors": entries},
        "tokenizer": {"files": tokenizer_files},
    }


class _Stages:
    """Prints `compile: <stage> ... 1.2s` lines to stderr, one per pipeline stage."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, name: str):
        return _Stage(name, self.enabled)


class _Stage:
    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled = name, enabled

    # On a terminal the stage shows while it runs and, if it fails, is wiped, so that a refusal stays one line (the
    # error); in a log it is written once done.
    def __enter__(self):
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        if self.enabled and self.tty:
            print(f"compile: {self.name} ...", end="", file=sys.stderr, flush=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.enabled:
            return False
        took = f"{time.perf_counter() - self.t0:.1f}s"
        if exc_type is not None:
            if self.tty:
                print("\r\033[K", end="", file=sys.stderr, flush=True)
        elif self.tty:
            print(f" {took}", file=sys.stderr, flush=True)
        else:
            print(f"compile: {self.name} ... {took}", file=sys.stderr, flush=True)
        return False
