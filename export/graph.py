"""The Llama forward pass as ONNX, one small function per piece, reading top to bottom like llama2.c's forward().

Shapes in comments: B batch, S new tokens, P past tokens, T = P + S, H heads, K kv heads, G = H / K, D head_dim.
Only standard ONNX ops; no shape arithmetic on dynamic dims (Reshape uses 0 = "keep") so importers stay happy.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from onnx import TensorProto, helper

from .config import ModelConfig
from .onnx_builder import Graph

F32 = TensorProto.FLOAT


def rms_norm(g: Graph, x: str, weight: str, eps: float) -> str:
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 whatever the model dtype."""
    xf = g.op("Cast", x, to=F32) if g.float_type != F32 else x
    var = g.op("ReduceMean", g.op("Mul", xf, xf), axes=[-1], keepdims=1)
    y = g.op("Div", xf, g.op("Sqrt", g.op("Add", var, g.const(eps, np.float32))))
    if g.float_type != F32:
        y = g.op("Cast", y, to=g.float_type)
    return g.op("Mul", y, weight)


def rope_tables(g: Graph, position_ids: str, inv_freq: np.ndarray) -> tuple[str, str]:
    """cos, sin [B, 1, S, D] for rotate-half RoPE; positions come from the position_ids input."""
    pos = g.op("Unsqueeze", g.op("Cast", position_ids, to=F32), g.const([2]))          # [B, S, 1]
    freqs = g.op("Mul", pos, g.const(inv_freq.astype(np.float32), np.float32))      # [B, S, D/2]
    emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1]))    # [B, 1, S, D]
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)
    if g.float_type != F32:
        cos, sin = g.op("Cast", cos, to=g.float_type), g.op("Cast", sin, to=g.float_type)
    return cos, sin


def rope(g: Graph, x: str, cos: str, sin: str, head_dim: int) -> str:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = concat(-x2, x1) over the two halves of D."""
    x1, x2 = g.op("Split", x, g.const([head_dim // 2, head_dim // 2]), axis=-1, outputs=2)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def attention_mask(g: Graph, input_ids: str, mask: str) -> str:
    """Boolean [B, 1, 1, S, T]: key t is visible to query s if it is not padding and not in the future.

    Counting from the end avoids computing P: query s is T-S+s, so t <= T-S+s  <=>  (T - t) >= (S - s), and both
    sides are reverse cumulative sums of ones shaped like the inputs.
    """
    ones_k = g.op("Add", g.op("Mul", mask, g.const(0)), g.const(1))                  # [B, T]
    ones_q = g.op("Add", g.op("Mul", input_ids, g.const(0)), g.const(1))             # [B, S]
    from_end_k = g.op("CumSum", ones_k, g.const(1), reverse=1)                      # T - t
    from_end_q = g.op("CumSum", ones_q, g.const(1), reverse=1)                      # S - s
    causal = g.op("GreaterOrEqual", g.op("Unsqueeze", from_end_k, g.const([1])),
                  g.op("Unsqueeze", from_end_q, g.const([2])))                       # [B, S, T]
    not_pad = g.op("Unsqueeze", g.op("Cast", mask, to=TensorProto.BOOL), g.const([1]))  # [B, 1, T]
    return g.op("Unsqueeze", g.op("And", causal, not_pad), g.const([1, 2]))          # [B, 1, 1, S, T]


def linear(g: Graph, x: str, weight_t: str) -> str:
    return g.op("MatMul", x, weight_t)


def attention(g: Graph, c: ModelConfig, x: str, w: Callable[[str], str], visible: str, cos: str, sin: str,
              past_k: str, past_v: str) -> tuple[str, str, str]:
    """Grouped-query attention; returns (output [B,S,hidden], present key, present value [B,K,T,D])."""
    H, K, D = c.num_heads, c.num_kv_heads, c.head_dim
    q = g.op("Transpose", g.op("Reshape", linear(g, x, w("q_proj")), g.const([0, 0, H, D])), perm=[0, 2, 1, 3])
    k = g.op("Transpose", g.op("Reshape", linear(g, x, w("k_proj")), g.const([0, 0, K, D])), perm=[0, 2, 1, 3])
    v = g.op("Transpose", g.op("Reshape", linear(g, x, w("v_proj")), g.const([0, 0, K, D])), perm=[0, 2, 1, 3])
    q = g.op("Mul", rope(g, q, cos, sin, D), g.float_const(1.0 / np.sqrt(D)))     # [B, H, S, D]
    k = rope(g, k, cos, sin, D)
    present_k = g.op("Concat", past_k, k, axis=2)                                   # [B, K, T, D]
    present_v = g.op("Concat", past_v, v, axis=2)
    # GQA without copying K/V: view queries as [B, K, G, S, D] and broadcast K/V over the group axis.
    q5 = g.op("Reshape", q, g.const([0, K, H // K, -1, D]))
    k_t = g.op("Unsqueeze", g.op("Transpose", present_k, perm=[0, 1, 3, 2]), g.const([2]))  # [B, K, 1, D, T]
    scores = g.op("Cast", g.op("MatMul", q5, k_t), to=F32) if g.float_type != F32 else g.op("MatMul", q5, k_t)
    scores = g.op("Where", visible, scores, g.const(np.finfo(np.float32).min, np.float32))  # [B, K, G, S, T]
    probs = g.op("Softmax", scores, axis=-1)
    if g.float_type != F32:
        probs = g.op("Cast", probs, to=g.float_type)
    out = g.op("MatMul", probs, g.op("Unsqueeze", present_v, g.const([2])))        # [B, K, G, S, D]
    out = g.op("Transpose", g.op("Reshape", out, g.const([0, H, -1, D])), perm=[0, 2, 1, 3])  # [B, S, H, D]
    out = linear(g, g.op("Reshape", out, g.const([0, 0, H * D])), w("o_proj"))
    return out, present_k, present_v


def swiglu(g: Graph, x: str, w: Callable[[str], str]) -> str:
    """down(silu(gate(x)) * up(x))."""
    gate = linear(g, x, w("gate_proj"))
    return linear(g, g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), linear(g, x, w("up_proj"))), w("down_proj"))


def build_llama(g: Graph, c: ModelConfig, load: Callable[[str], np.ndarray],
                on_layer: Callable[[], None] = lambda: None):
    """Emit the whole model into g. `load(hf_name)` returns a tensor in HF layout; linear weights are stored [in, out].

    Returns (graph inputs, graph outputs) as ValueInfoProtos.
    """
    ft = g.float_type
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
    kv_shape = lambda seq: ["batch", c.num_kv_heads, seq, c.head_dim]  # noqa: E731
    outputs = [helper.make_tensor_value_info("logits", F32, ["batch", "seq", c.vocab_size])]

    def linear_weight(name: str) -> str:
        return g.weight(name + ".T", load(name).T)

    # Embedding (tied models keep one [hidden, vocab] matrix for both the lookup and the head).
    if c.tie_word_embeddings:
        emb_t = linear_weight("model.embed_tokens.weight")
        x = g.op("Transpose", g.op("Gather", emb_t, "input_ids", axis=1), perm=[1, 2, 0])   # [B, S, hidden]
        head = emb_t
    else:
        x = g.op("Gather", g.weight("model.embed_tokens.weight", load("model.embed_tokens.weight")), "input_ids")
        head = None
    visible = attention_mask(g, "input_ids", "attention_mask")
    cos, sin = rope_tables(g, "position_ids", c.rope_inv_freq())

    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        inputs += [helper.make_tensor_value_info(past_k, ft, kv_shape("past_seq")),
                   helper.make_tensor_value_info(past_v, ft, kv_shape("past_seq"))]
        attn_w = lambda n: linear_weight(p + "self_attn." + n + ".weight")  # noqa: E731
        mlp_w = lambda n: linear_weight(p + "mlp." + n + ".weight")  # noqa: E731
        h = rms_norm(g, x, g.weight(p + "input_layernorm.weight", load(p + "input_layernorm.weight")), c.rms_norm_eps)
        a, present_k, present_v = attention(g, c, h, attn_w, visible, cos, sin, past_k, past_v)
        x = g.op("Add", x, a)
        h = rms_norm(g, x, g.weight(p + "post_attention_layernorm.weight", load(p + "post_attention_layernorm.weight")),
                     c.rms_norm_eps)
        x = g.op("Add", x, swiglu(g, h, mlp_w))
        for src, dst in ((present_k, f"present.{i}.key"), (present_v, f"present.{i}.value")):
            g.nodes.append(helper.make_node("Identity", [src], [dst], name=f"out_{dst}"))
            outputs.append(helper.make_tensor_value_info(dst, ft, kv_shape("total_seq")))
        on_layer()

    x = rms_norm(g, x, g.weight("model.norm.weight", load("model.norm.weight")), c.rms_norm_eps)
    logits = linear(g, x, head or linear_weight("lm_head.weight"))
    if ft != F32:
        logits = g.op("Cast", logits, to=F32)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="out_logits"))
    return inputs, outputs
