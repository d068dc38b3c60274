"""Run an export directory (model.onnx) with onnxruntime: the reference backend, and a fallback where TVM is absent."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from llamac.export.config import ModelConfig

from .prompt import check_ids


class OnnxModel:
    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.config = ModelConfig.load(self.path)
        self.max_seq_len = self.config.max_position_embeddings
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self._sess = ort.InferenceSession(str(self.path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._sess.get_outputs()]
        self.kv_dtype = np.float16 if "float16" in self._sess.get_inputs()[3].type else np.float32

    def session(self) -> "OnnxSession":
        return OnnxSession(self)


class OnnxSession:
    """One sequence's KV cache, kept as the present/past arrays the graph exchanges."""

    def __init__(self, model: OnnxModel):
        self._m = model
        self.max_seq_len = model.max_seq_len
        self.reset()

    def reset(self) -> None:
        c = self._m.config
        empty = np.zeros((1, c.num_kv_heads, 0, c.head_dim), self._m.kv_dtype)
        self._past = {f"past_key_values.{i}.{k}": empty for i in range(c.num_layers) for k in ("key", "value")}
        self.n_past = 0

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        ids = check_ids(ids, self.n_past, self.max_seq_len, self._m.config.vocab_size)
        total = self.n_past + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(self.n_past, total, dtype=np.int64)[None], **self._past}
        res = dict(zip(self._m._outputs, self._m._sess.run(None, feeds)))
        self._past = {k: res[k.replace("past_key_values", "present")] for k in self._past}
        self.n_past = total
        return res["logits"][0, -1].astype(np.float32)

    def decode(self, token: int) -> np.ndarray:
        return self.prefill([token])
