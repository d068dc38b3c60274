"""`llamac export`: checkpoint -> directory with model.onnx, model.onnx.data, config.json and the tokenizer.

Written into a temporary sibling directory and renamed into place, so a failure never leaves a half-written OUT.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from tqdm import tqdm

from llamac.errors import InputError, check_output_dir, refuse_replacing_source, staging_dir

from . import graph
from .checkpoint import export_name, open_checkpoint
from .onnx_builder import Graph, save
from .tokenizer_files import convert_llama2c_tokenizer

DTYPES = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16}
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"


def export(src: Path, out: Path, dtype: str = "f32", tokenizer: Path | None = None, force: bool = False,
           progress: bool = True) -> Path:
    """Export the checkpoint at `src` to the directory `out`; returns `out`."""
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    out = Path(out)
    refuse_replacing_source(out, src)
    check_output_dir(out, force)
    ckpt = open_checkpoint(Path(src), tokenizer)
    cfg = ckpt.config
    tmp = staging_dir(out)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other directory
    bar = None
    try:
        # the tokenizer first: a broken one is refused before the weights are written
        for f in ckpt.tokenizer_files:
            if f.suffix == ".bin":  # llama2.c's own tokenizer format
                convert_llama2c_tokenizer(f, tmp)
            else:
                shutil.copyfile(f, tmp / export_name(f))
        if not ckpt.tokenizer_files and hasattr(ckpt, "write_tokenizer"):  # GGUF: vocabulary in the metadata
            ckpt.write_tokenizer(tmp)
        _check_tokenizer(tmp, src)
        bar = tqdm(total=cfg.num_layers + 2, desc="export", unit="layer", disable=not progress)

        def load(name: str) -> np.ndarray:
            w = ckpt.tensor(name)
            if not np.isfinite(w).all():
                raise InputError(f"{Path(src).name}: tensor {name} holds NaN or Inf")
            return w

        with open(tmp / DATA_FILE, "wb") as data:
            g = Graph(data, DATA_FILE, DTYPES[dtype])
            bar.update(1)
            inputs, outputs = graph.build_llama(g, cfg, load, on_layer=lambda: bar.update(1))
        model = g.model(inputs, outputs, producer="llamac")
        save(model, tmp / MODEL_FILE)
        onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        bar.update(1)
        bar.close()
        cfg.save(tmp / "config.json")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        if bar is not None:
            bar.close()         # ends the bar's line, so that the error is a line of its own
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_tokenizer(out: Path, src: Path) -> None:
    """The tokenizer the export carries loads and encodes (a broken one failed only when a prompt was run)."""
    from llamac.runtime.tokenizer import load_tokenizer

    if not any((out / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        return
    try:
        load_tokenizer(out).encode("Hello, world 123")
    except InputError as e:
        raise InputError(f"{Path(src).name}: its tokenizer cannot be used ({str(e).split(': ', 1)[-1]})") from None
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise InputError(f"{Path(src).name}: its tokenizer cannot be used ({type(e).__name__}: {e})") from None
