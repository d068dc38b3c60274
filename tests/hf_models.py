"""Random-init Hugging Face Llama checkpoints for tests: the independent reference is transformers itself."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

# The five configurations every stage is checked on (export issue): name -> overrides of BASE.
CONFIGS = {
    "llama2_mha": dict(rope_theta=10000.0, rms_norm_eps=1e-6),
    "llama3_gqa_tied": dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
                            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=64)),
    "codellama_theta": dict(rope_theta=1e6, num_key_value_heads=2),
    "explicit_head_dim": dict(head_dim=24, num_key_value_heads=2),
    "bf16_sharded": dict(num_key_value_heads=1, dtype="bfloat16", shard="2KB"),
}


def make_hf_checkpoint(path: Path, seed: int = 0, dtype: str = "float32", shard: str | None = None, **overrides):
    """Save a seeded random LlamaForCausalLM to `path`; return it as transformers reads it back, in float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(BASE)
    kw.update(overrides)
    rope_theta = kw.pop("rope_theta", 10000.0)
    rope_scaling = kw.pop("rope_scaling", None)
    params = dict(rope_scaling or {"rope_type": "default"}, rope_theta=rope_theta)
    cfg = LlamaConfig(**kw, rope_parameters=params)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and a wider init, so mistakes in any piece show in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=shard or "5GB")
    # Reload rather than upcast: .to(bfloat16) also rounds the rotary buffer, which a real load recomputes.
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
