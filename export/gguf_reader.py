"""GGUF files (llama.cpp): config from metadata, tensors dequantized to float32 and mapped to HF names and layout.

llama.cpp's converter permutes the q/k rows of each head from HF's rotate-half order into interleaved pairs; we undo it
so every reader hands the graph builder the same layout.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llamac.errors import InputError

from .config import ModelConfig, llama3_scaling_from_factors

_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_SUPPORTED = {"F32", "F16", "BF16", "Q8_0", "Q4_0"}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, interleaved (x0,y0,x1,y1..) rows back to halves (x..,y..)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF halves -> interleaved pairs); used to write GGUF/llama2.c files in tests."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    def __init__(self, src: Path):
        import gguf  # the gguf package is only needed for this format

        self.src = Path(src)
        try:
            self._reader = gguf.GGUFReader(str(self.src))
        except Exception as e:  # the reader raises ValueError/struct errors on junk
            raise InputError(f"{self.src.name}: not a readable GGUF file ({e})") from None
        self._gguf = gguf
        arch = self._field("general.architecture")
        if arch != "llama":
            raise InputError(f"{self.src.name}: unsupported architecture {arch!r}: llamac exports llama models")
        self._tensors = {}
        unused = []
        for t in self._reader.tensors:
            name = _hf_name(t.name)
            if name is not None and name.endswith(".weight"):
                self._tensors[name] = t
            elif t.name == "rope_freqs.weight":
                self._rope_freqs = np.asarray(t.data, dtype=np.float64)
            elif ".attn_rot_embd" not in t.name:  # a rotary table some converters add: RoPE comes from the config
                unused.append(t.name)
        if unused:     # biases (llama.cpp's llama loads optional ones) or experts: the graph has no place for them
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            raise InputError(f"{self.src.name}: holds tensors a llama model without biases or experts does not have "
                             f"({', '.join(unused[:3])}{more}); llamac would drop them")
        self.config = self._read_config()
        self.tokenizer_files: list[Path] = []

    def _field(self, key: str, default=None):
        f = self._reader.get_field(key)
        if f is None:
            return default
        value = f.contents()
        return value

    def _read_config(self) -> ModelConfig:
        a = "llama."
        try:
            hidden = int(self._field(a + "embedding_length"))
            heads = int(self._field(a + "attention.head_count"))
            head_dim = int(self._field(a + "attention.key_length", hidden // heads if heads > 0 else 0))
            vocab = self._field(a + "vocab_size")
            if vocab is None:
                vocab = self._tensors["model.embed_tokens.weight"].shape[1]
            # Llama 3 ends turns with <|eot_id|> (and tool calls with <|eom_id|>) besides <|end_of_text|>.
            eos = [self._field(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                            "tokenizer.ggml.eom_token_id")]
            eos = list(dict.fromkeys(int(e) for e in eos if e is not None)) or [2]
            cfg = ModelConfig(
                vocab_size=int(vocab), hidden_size=hidden, num_layers=int(self._field(a + "block_count")),
                num_heads=heads, num_kv_heads=int(self._field(a + "attention.head_count_kv", heads)),
                head_dim=head_dim, intermediate_size=int(self._field(a + "feed_forward_length")),
                rms_norm_eps=float(self._field(a + "attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(self._field(a + "rope.freq_base", 10000.0)),
                tie_word_embeddings="lm_head.weight" not in self._tensors,
                bos_token_id=self._field("tokenizer.ggml.bos_token_id", 1),
                eos_token_ids=eos,
                max_position_embeddings=int(self._field(a + "context_length", 2048)),
            )
        except (TypeError, KeyError, ValueError) as e:
            raise InputError(f"{self.src.name}: GGUF metadata lacks a llama hyperparameter or holds one that is not "
                             f"a number ({e})") from None
        kind = self._field(a + "rope.scaling.type")
        if kind == "linear":
            factor = self._field(a + "rope.scaling.factor")
            if not isinstance(factor, (int, float)) or not factor > 0:
                raise InputError(f"{self.src.name}: linear rope scaling needs a positive {a}rope.scaling.factor, "
                                 f"got {factor!r}")
            cfg.rope_scaling = {"rope_type": "linear", "factor": float(factor)}
        elif kind not in (None, "none"):
            raise InputError(f"{self.src.name}: unsupported rope scaling type {kind!r} (supported: linear, llama3)")
        if hasattr(self, "_rope_freqs"):
            factors = self._rope_freqs
            if factors.shape != (cfg.head_dim // 2,):
                raise InputError(f"{self.src.name}: rope_freqs.weight holds {factors.size} factors; a head of "
                                 f"{cfg.head_dim} needs {cfg.head_dim // 2}")
            cfg.rope_scaling = (llama3_scaling_from_factors(factors, cfg.rope_inv_freq())
                                or {"rope_type": "freq_factors", "factors": [float(f) for f in factors]})
        return cfg

    def write_tokenizer(self, out_dir: Path) -> Path | None:
        """The embedded vocabulary as tokenizer.model / tokenizer.json (see tokenizer_files)."""
        from .tokenizer_files import write_tokenizer

        return write_tokenizer(self._reader, Path(out_dir))

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> list[int] | None:
        t = self._tensors.get(name)
        return None if t is None else [int(d) for d in reversed(t.shape)]

    def tensor(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        qtype = self._gguf.GGMLQuantizationType(t.tensor_type)
        if qtype.name not in _SUPPORTED:
            raise InputError(f"{self.src.name}: tensor {t.name} has unsupported type {qtype.name}")
        w = np.asarray(self._gguf.quants.dequantize(t.data, qtype), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, self.config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, self.config.num_kv_heads)
        return w
