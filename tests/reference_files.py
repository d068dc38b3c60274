"""Write the same weights in llama.cpp's GGUF layout and llama2.c's .bin layout, as those projects' converters do.

Both formats store q/k rows in interleaved-pair order (the HF -> Meta permutation), which the readers must undo.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from llamac.export.gguf_reader import permute_rows


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def llama3_rope_factors(cfg) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for llama3 scaling: one divisor per frequency pair."""
    s, d = cfg.rope_parameters, cfg.head_dim
    base = 1.0 / (s["rope_theta"] ** (np.arange(0, d, 2) / d))
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in base:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(s["factor"])
        else:
            sm = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - sm) / s["factor"] + sm))
    return np.array(out, dtype=np.float32)


_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def write_gguf(model, path: Path, qtype: str = "F32", extra=None) -> None:
    """llama.cpp layout: blk.N.* names, permuted q/k, metadata keys of the llama architecture. `extra(writer)` adds
    keys or tensors after the standard ones."""
    import gguf

    cfg, sd = model.config, state_dict(model)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if cfg.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    if extra is not None:
        extra(w)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, i, *rest = name.split(".")
            gname = f"blk.{i}.{_GGUF_NAMES['.'.join(rest[:-1])]}.weight"
            if name.endswith("q_proj.weight"):
                t = permute_rows(t, cfg.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                t = permute_rows(t, cfg.num_key_value_heads)
        if t.ndim == 2 and qtype != "F32":  # llama.cpp keeps norms in f32 and quantizes matrices
            data = gguf.quants.quantize(t, q)
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=q)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_roundtrip(model, qtype: str) -> None:
    """Replace the model's matrices by what a `qtype` GGUF stores (the reference for quantized GGUF reads)."""
    import gguf
    import torch

    q = getattr(gguf.GGMLQuantizationType, qtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                deq = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q), q)
                p.copy_(torch.from_numpy(np.asarray(deq, dtype=np.float32).reshape(p.shape)))


def write_llama2c(model, path: Path) -> None:
    """run.c's legacy layout: 7 int32 header (negative vocab = separate classifier), float32 weights."""
    cfg, sd = model.config, state_dict(model)
    L, hd = cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads
    shared = cfg.tie_word_embeddings
    header = struct.pack("<7i", cfg.hidden_size, cfg.intermediate_size, L, cfg.num_attention_heads,
                         cfg.num_key_value_heads, cfg.vocab_size if shared else -cfg.vocab_size,
                         cfg.max_position_embeddings)

    def layers(part):
        out = []
        for i in range(L):
            t = sd[f"model.layers.{i}.{part}.weight"]
            if part == "self_attn.q_proj":
                t = permute_rows(t, cfg.num_attention_heads)
            elif part == "self_attn.k_proj":
                t = permute_rows(t, cfg.num_key_value_heads)
            out.append(t)
        return out

    parts = [sd["model.embed_tokens.weight"]]
    for part in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "post_attention_layernorm", "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"):
        parts += layers(part)
    parts.append(sd["model.norm.weight"])
    parts.append(np.zeros(2 * cfg.max_position_embeddings * hd // 2, np.float32))  # freq_cis, unused
    if not shared:
        parts.append(sd["lm_head.weight"])
    with open(path, "wb") as f:
        f.write(header)
        for p in parts:
            f.write(np.ascontiguousarray(p, dtype="<f4").tobytes())
