"""Random-weight checkpoints with the shapes the brief benchmarks on (section 6), written as HF directories."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPES = {
    # 123M: Llama 3.2 1B scaled down; the peers' figures in the brief were measured on this shape.
    "123m": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, intermediate_size=2816, tie_word_embeddings=True),
    # Llama 3.2 1B itself (1.24B parameters).
    "1b": dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True),
}


def make_checkpoint(path: Path, shape: str = "123m", seed: int = 0) -> Path:
    """Write config.json + model.safetensors with seeded random weights (no torch needed)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    s = SHAPES[shape]
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(s, architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
               max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, hidden_act="silu",
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
    rng = np.random.default_rng(seed)
    h, f, d = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (s["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    tensors = {}
    for name, shp in shapes.items():
        if len(shp) == 1:
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shp)).astype(np.float32)
        else:
            tensors[name] = rng.standard_normal(shp, dtype=np.float32) * np.float32(1.0 / np.sqrt(shp[1]))
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path
