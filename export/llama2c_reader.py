"""llama2.c checkpoints (`.bin`): the legacy format run.c reads (7 int32 header, then float32 weights) and the
versioned format (magic "ak42", version 1, float32). q/k rows are in Meta's interleaved RoPE layout, as in GGUF.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from llamac.errors import InputError

from .config import ModelConfig
from .gguf_reader import unpermute_rows

_MAGIC = 0x616B3432


class Llama2cCheckpoint:
    def __init__(self, src: Path):
        self.src = Path(src)
        size = self.src.stat().st_size
        with open(self.src, "rb") as f:
            head = f.read(256)
        if len(head) < 28:
            raise InputError(f"{self.src.name}: too short for a llama2.c header")
        if struct.unpack("<I", head[:4])[0] == _MAGIC:
            version = struct.unpack("<i", head[4:8])[0]
            if version != 1:
                raise InputError(f"{self.src.name}: llama2.c format version {version} is not supported (1 is; "
                                 f"version 2 is int8-quantized)")
            dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack("<7i", head[8:36])
            shared = bool(head[36])
            offset, order = 256, "v1"
        else:
            dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack("<7i", head[:28])
            shared, vocab = vocab > 0, abs(vocab)
            offset, order = 28, "legacy"
        if min(dim, hidden, layers, heads, kv_heads, vocab, seq) <= 0:
            raise InputError(f"{self.src.name}: not a llama2.c checkpoint (header {dim, hidden, layers, heads})")
        self.config = ModelConfig(
            vocab_size=vocab, hidden_size=dim, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
            head_dim=dim // heads, intermediate_size=hidden, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=shared, bos_token_id=1, eos_token_ids=[2], max_position_embeddings=seq)
        self._offsets = self._layout(order, offset)
        end = max(o + int(np.prod(s)) * 4 for o, s in self._offsets.values())
        if end > size:
            raise InputError(f"{self.src.name}: truncated llama2.c checkpoint ({size} bytes, header implies {end})")
        self.tokenizer_files: list[Path] = []

    def _layout(self, order: str, offset: int) -> dict[str, tuple[int, tuple[int, ...]]]:
        c = self.config
        L, d, kv = c.num_layers, c.hidden_size, c.num_kv_heads * c.head_dim
        per_layer = {"input_layernorm": (d,), "self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d),
                     "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, d), "post_attention_layernorm": (d,),
                     "mlp.gate_proj": (c.intermediate_size, d), "mlp.down_proj": (d, c.intermediate_size),
                     "mlp.up_proj": (c.intermediate_size, d)}
        if order == "legacy":  # run.c's struct order; RoPE tables sit between the final norm and the classifier
            seq = ["model.embed_tokens", "input_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                   "self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj",
                   "mlp.down_proj", "mlp.up_proj", "model.norm", "freq_cis", "lm_head"]
        else:
            seq = ["input_layernorm", "post_attention_layernorm", "model.norm", "model.embed_tokens",
                   "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj", "lm_head"]
        out: dict[str, tuple[int, tuple[int, ...]]] = {}
        for part in seq:
            if part == "model.embed_tokens":
                out["model.embed_tokens.weight"] = (offset, (c.vocab_size, d))
                offset += c.vocab_size * d * 4
            elif part == "model.norm":
                out["model.norm.weight"] = (offset, (d,))
                offset += d * 4
            elif part == "freq_cis":
                offset += 2 * c.max_position_embeddings * (c.head_dim // 2) * 4
            elif part == "lm_head":
                if not c.tie_word_embeddings:
                    out["lm_head.weight"] = (offset, (c.vocab_size, d))
            else:  # one tensor per layer, stored layer after layer
                shape = per_layer[part]
                for i in range(L):
                    out[f"model.layers.{i}.{part}.weight"] = (offset, shape)
                    offset += int(np.prod(shape)) * 4
        return out

    def names(self) -> list[str]:
        return list(self._offsets)

    def shape(self, name: str) -> list[int] | None:
        return list(self._offsets[name][1]) if name in self._offsets else None

    def tensor(self, name: str) -> np.ndarray:
        offset, shape = self._offsets[name]
        w = np.array(np.memmap(self.src, dtype="<f4", mode="r", offset=offset, shape=shape))
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, self.config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, self.config.num_kv_heads)
        return w
