"""Weights as fetchable shards in tvmjs' tensor-cache layout (params/tensor-cache.json + params/shard_N.bin).

Shards stay under ~32 MB so a browser downloads them in parallel and keeps each in its Cache Storage; on a second
visit the page loads them from that cache without the network. Every record starts on a 4-byte boundary, which lets
tvmjs copy it straight into a WebGPU buffer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHARD_BYTES = 32 << 20
DIR = "params"


def _dtype_name(a: np.ndarray) -> str:
    return {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.int32): "int32",
            np.dtype(np.uint32): "uint32", np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8",
            np.dtype(np.int64): "int64"}[a.dtype]


def write_shards(weights: dict[str, np.ndarray], names: list[str], out: Path) -> dict:
    """Writes the tensors named in `names` (in that order); returns a summary for the manifest."""
    d = out / DIR
    d.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    cur: list[tuple[dict, np.ndarray]] = []
    cur_bytes = 0

    def flush() -> None:
        nonlocal cur, cur_bytes
        if not cur:
            return
        path = f"shard_{len(shards)}.bin"
        with open(d / path, "wb") as f:
            for _, arr in cur:
                f.write(arr.tobytes())
                pad = (-arr.nbytes) % 4
                if pad:
                    f.write(b"\0" * pad)
        shards.append({"dataPath": path, "format": "raw-shard", "nbytes": cur_bytes,
                       "records": [r for r, _ in cur]})
        cur, cur_bytes = [], 0

    largest = 0
    for name in names:
        arr = np.ascontiguousarray(weights[name])
        largest = max(largest, arr.nbytes)
        if cur and cur_bytes + arr.nbytes > SHARD_BYTES:
            flush()
        rec = {"name": name, "shape": list(arr.shape), "dtype": _dtype_name(arr), "format": "raw",
               "nbytes": int(arr.nbytes), "byteOffset": cur_bytes}
        cur.append((rec, arr))
        cur_bytes += arr.nbytes + (-arr.nbytes) % 4
    flush()
    total = sum(s["nbytes"] for s in shards)
    (d / "tensor-cache.json").write_text(json.dumps({"metadata": {"total_bytes": total}, "records": shards}))
    return {"dir": DIR, "shards": len(shards), "total_bytes": total, "largest_tensor_bytes": largest}
