"""Run an export directory with onnxruntime, and the same tokens with transformers, for logit comparisons."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llamac.export.config import ModelConfig


def positions(mask: np.ndarray) -> np.ndarray:
    """position_ids for a (left-)padded mask, as transformers computes them."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def ort_steps(export_dir: Path, prompt: np.ndarray, mask: np.ndarray, steps: np.ndarray) -> list[np.ndarray]:
    """Prefill `prompt` [B,S] then feed each column of `steps` [B,N] through past_key_values/present.

    Returns [prompt logits [B,S,V], step logits [B,V] ...]."""
    import onnxruntime as ort

    cfg = ModelConfig.load(export_dir)
    sess = ort.InferenceSession(str(Path(export_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    kv_type = np.float16 if "float16" in sess.get_inputs()[3].type else np.float32
    B = prompt.shape[0]
    past = {}
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            past[f"past_key_values.{i}.{kind}"] = np.zeros((B, cfg.num_kv_heads, 0, cfg.head_dim), kv_type)
    names = [o.name for o in sess.get_outputs()]
    out, ids, full_mask = [], prompt, mask
    pos = positions(mask)
    for step in range(steps.shape[1] + 1):
        res = dict(zip(names, sess.run(None, {"input_ids": ids, "attention_mask": full_mask,
                                                "position_ids": pos, **past})))
        out.append(res["logits"] if step == 0 else res["logits"][:, -1])
        past = {k: res[k.replace("past_key_values", "present")] for k in past}
        if step < steps.shape[1]:
            ids = steps[:, step:step + 1]
            full_mask = np.concatenate([full_mask, np.ones((B, 1), np.int64)], axis=1)
            pos = pos[:, -1:] + 1
    return out


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' logits for the whole sequence at once [B, T, V]."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions(mask))).logits.float().numpy()


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())
