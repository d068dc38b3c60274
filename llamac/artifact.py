"""The artifact directory: written atomically, described for `llamac inspect`, and turned back into f32 weights.

Layout:
  manifest.json   format version, llamac/TVM versions, target, scheme, model config, tokenizer, KV cache shape,
                  every weight (name, dtype, shape, offset in weights.bin, quantization) and every file's sha256
  model.so        the compiled step function (for the target's OS/CPU)
  weights.bin     all parameters back to back, each 64-byte aligned, in the kernels' packed layout (mmap-able)
  config.json     the model config (HF style), tokenizer files as exported

The runtime reads and verifies it (`llamac.runtime.tvm_backend`); this module only writes and inspects.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from llamac.errors import InputError, check_output_dir, staging_dir
from llamac.quantize import dequantize as dequantize_tensor, scheme_from_json, unpack
from llamac.runtime.tvm_backend import (FORMAT, FORMAT_VERSION, MANIFEST, is_webgpu_manifest, read_manifest,
                                       sha256_file, verify_files)

ALIGN = 64
WEIGHTS_FILE = "weights.bin"
LIBRARY_FILE = "model.so"
GROUPS = ("embedding", "attention", "mlp", "norm", "lm_head", "other")


def tensor_group(onnx_name: str) -> str:
    if "embed_tokens" in onnx_name:
        return "embedding"
    if onnx_name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in onnx_name:
        return "attention"
    if ".mlp." in onnx_name:
        return "mlp"
    if "norm" in onnx_name:
        return "norm"
    return "other"


def hf_name(onnx_name: str) -> str:
    return onnx_name[:-2] if onnx_name.endswith(".T") else onnx_name


@contextlib.contextmanager
def staging(out: Path, force: bool = False) -> Iterator[Path]:
    """A temporary sibling of `out` to write into; renamed to `out` on success, removed on any failure."""
    out = Path(out)
    check_output_dir(out, force)
    tmp = staging_dir(out)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class WeightWriter:
    """Appends arrays to weights.bin (64-byte aligned) and records where each one is."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.entries: list[dict] = []

    def add(self, name: str, array: np.ndarray, **meta) -> None:
        pos = self.file.tell()
        pad = (-pos) % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
        arr = np.ascontiguousarray(array)
        offset = self.file.tell()
        self.file.write(arr.tobytes())
        self.entries.append(dict(name=name, dtype=str(arr.dtype), shape=list(arr.shape), offset=offset,
                                 nbytes=int(arr.nbytes), **meta))

    def close(self) -> None:
        self.file.close()


def write_manifest(root: Path, manifest: dict) -> None:
    """Checksum every file in root (except the manifest) and write manifest.json last."""
    files = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = f.relative_to(root).as_posix()
        files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = dict(format=FORMAT, format_version=FORMAT_VERSION, **manifest, files=files)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------- inspect

def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _describe_webgpu(path: Path, m: dict) -> str:
    cfg = m["config"]
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    return "\n".join([
        f"artifact     {path}",
        f"format       WebGPU artifact v{m.get('format_version')} (run: llamac run --browser, or llamac serve)",
        f"target       webgpu: {m['target'].get('host', 'wasm')} host, {m['target'].get('compute_dtype')} compute",
        f"quantization {m.get('quant')}",
        f"model        {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, heads "
        f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} kv, head_dim {cfg['head_dim']}, ffn "
        f"{cfg['intermediate_size']}, vocab {cfg['vocab_size']}",
        f"context      {m.get('max_seq_len')} tokens",
        f"files        {', '.join(files)} ({_human(sum((path / f).stat().st_size for f in files))})",
    ])


def describe(path: Path) -> str:
    """What `llamac inspect ART` prints: versions, target, scheme, model, and sizes per tensor group."""
    path = Path(path)
    try:
        raw = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raw = None                                  # read_manifest says what is wrong
    if is_webgpu_manifest(raw):
        return _describe_webgpu(path, raw)
    m = read_manifest(path)
    cfg, tgt, q = m["model"], m["target"], m["quant"]
    lines = [
        f"artifact     {path}",
        f"format       {m['format']} v{m['format_version']} (llamac {m.get('llamac_version')}, "
        f"TVM {m.get('tvm_version')})",
        f"target       {tgt['name']}: {tgt.get('mtriple')} cpu={tgt.get('mcpu') or 'generic'} "
        f"{' '.join(tgt.get('mattr', []))}".rstrip(),
        f"runs on      {tgt.get('runtime_needs', '')}",
        f"quantization {q['name']}: {q.get('doc', '')}" + ("" if m.get("quantize_embeddings", True)
                                                             else " (embeddings f32)"),
        f"model        {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, heads "
        f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} kv, head_dim {cfg['head_dim']}, ffn "
        f"{cfg['intermediate_size']}, vocab {cfg['vocab_size']}, tied {cfg['tie_word_embeddings']}",
        f"context      {m['max_seq_len']} tokens (KV cache {_human(_kv_bytes(m))} f32, allocated per session)",
        f"tokenizer    {', '.join(m.get('tokenizer', {}).get('files', [])) or 'none'}",
        "",
        f"{'group':10s} {'tensors':>7s} {'params':>12s} {'bytes':>11s} {'bytes/param':>11s}  storage",
    ]
    groups: dict[str, dict] = {}
    for t in m["weights"]["tensors"]:
        g = groups.setdefault(t["group"], {"names": set(), "params": 0, "bytes": 0, "kinds": set()})
        g["bytes"] += t["nbytes"]
        if t["onnx"] not in g["names"]:
            g["names"].add(t["onnx"])
            quant = t.get("quant")
            g["params"] += quant["k"] * quant["n"] if quant else int(np.prod(t["shape"]))
            g["kinds"].add(quant["scheme"]["name"] if quant else t["dtype"])
    total_p = total_b = 0
    for name in GROUPS:
        if name not in groups:
            continue
        g = groups[name]
        total_p += g["params"]
        total_b += g["bytes"]
        lines.append(f"{name:10s} {len(g['names']):7d} {g['params']:12,d} {_human(g['bytes']):>11s} "
                     f"{g['bytes'] / max(g['params'], 1):11.3f}  {', '.join(sorted(g['kinds']))}")
    lines.append(f"{'total':10s} {sum(len(g['names']) for g in groups.values()):7d} {total_p:12,d} "
                 f"{_human(total_b):>11s} {total_b / max(total_p, 1):11.3f}")
    lines.append("")
    for name, info in m["files"].items():
        lines.append(f"file {name:22s} {_human(info['size']):>11s}  sha256 {info['sha256'][:16]}...")
    return "\n".join(lines)


def _kv_bytes(m: dict) -> int:
    kv = m.get("kv_cache", {})
    return int(np.prod(kv.get("shape", [0]))) * 4 * int(kv.get("count", 0))


# ---------------------------------------------------------------- dequantize

def read_weights(path: Path, m: dict) -> dict[str, np.ndarray]:
    blob = np.memmap(Path(path) / m["weights"]["file"], dtype=np.uint8, mode="r")
    out = {}
    for t in m["weights"]["tensors"]:
        count = int(np.prod(t["shape"])) if t["shape"] else 1
        out[t["name"]] = blob[t["offset"]:t["offset"] + t["nbytes"]].view(np.dtype(t["dtype"]))[:count].reshape(
            t["shape"])
    return out


def dequantize(path: Path, out_dir: Path) -> Path:
    """Write the weights exactly as the artifact computes with them: f32, HF names and layout (config.json +
    model.safetensors), so transformers can run what the artifact runs."""
    from safetensors.numpy import save_file

    path = Path(path)
    try:
        raw = json.loads((path / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raw = None          # read_manifest says what is wrong with it
    if is_webgpu_manifest(raw):
        raise InputError(f"{path} is a WebGPU artifact: --dequantize reads CPU artifacts only")
    m = read_manifest(path)
    verify_files(path, m)
    arrays = read_weights(path, m)
    by_onnx: dict[str, list[dict]] = {}
    for t in m["weights"]["tensors"]:
        by_onnx.setdefault(t["onnx"], []).append(t)
    tensors: dict[str, np.ndarray] = {}
    for onnx_name, entries in by_onnx.items():
        quant = entries[0].get("quant")
        if quant is None:
            tensors[hf_name(onnx_name)] = np.ascontiguousarray(arrays[entries[0]["name"]], dtype=np.float32)
            continue
        packed = {t["key"]: np.asarray(arrays[t["name"]]) for t in entries}
        qt = unpack(packed, scheme_from_json(quant["scheme"]), quant["k"], quant["n"],
                    quant.get("layout", "lanes"))
        kn = dequantize_tensor(qt)                         # [K, N] = [in, out]
        tensors[hf_name(onnx_name)] = np.ascontiguousarray(kn.T)   # HF keeps [out, in] (and [vocab, hidden])
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} already exists and is not empty")
    with staging(out_dir, force=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = dict(m["model"])
        config["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in m.get("tokenizer", {}).get("files", []):
            shutil.copyfile(path / f, tmp / f)
    return Path(out_dir)
