"""`llamac inspect` for an export directory: config, graph inputs/outputs and weight sizes."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from llamac.errors import InputError

from .config import ModelConfig
from .exporter import MODEL_FILE


def _dims(vi: onnx.ValueInfoProto) -> str:
    return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in vi.type.tensor_type.shape.dim) + "]"


def _group(name: str) -> str:
    parts = name.removesuffix(".T").split(".")
    if parts[:2] == ["model", "layers"]:
        return parts[3] + "." + parts[4] if parts[3] in ("self_attn", "mlp") else "norms"
    return "embedding/head" if "embed" in name or "lm_head" in name else "norms"


def describe_export(path: Path) -> str:
    path = Path(path)
    if not (path / MODEL_FILE).is_file():
        what = "no such file or directory" if not path.exists() else f"neither an export directory (no {MODEL_FILE}) " \
            f"nor an artifact (no manifest.json)"
        raise InputError(f"{path}: {what}")
    cfg = ModelConfig.load(path)
    try:
        model = onnx.load(str(path / MODEL_FILE), load_external_data=False)
    except Exception as e:
        raise InputError(f"{path / MODEL_FILE}: unreadable ONNX ({e})") from None
    lines = [f"export directory {path}", "config:"]
    lines += [f"  {k}: {v}" for k, v in cfg.__dict__.items()]
    lines.append(f"graph: opset {model.opset_import[0].version}, {len(model.graph.node)} nodes")
    for kind, vis in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        lines.append(f"{kind}:")
        for vi in vis:
            lines.append(f"  {vi.name:28s} {helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name:8s} "
                         f"{_dims(vi)}")
    sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:  # weights; inline initializers are shape/axis constants
            n = int(np.prod(t.dims))
            g = sizes[_group(t.name)]
            g[0] += n
            g[1] += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    lines.append("weights:")
    for name, (n, b) in sorted(sizes.items()):
        lines.append(f"  {name:20s} {n:>14,d} params {b / 2**20:10.2f} MiB")
    total = sum(n for n, _ in sizes.values()), sum(b for _, b in sizes.values())
    lines.append(f"  {'total':20s} {total[0]:>14,d} params {total[1] / 2**20:10.2f} MiB")
    tok = [p.name for p in path.iterdir() if p.name.startswith("tokenizer")]
    lines.append(f"tokenizer: {', '.join(sorted(tok)) or 'none'}")
    return "\n".join(lines)
