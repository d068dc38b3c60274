"""Open any supported checkpoint and check it holds every tensor the config implies, with the right shape.

Every reader hands out tensors under Hugging Face names, in HF layout (rotate-half q/k rows), as float32 or float16.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from llamac.errors import InputError

from .config import ModelConfig


class Checkpoint(Protocol):
    config: ModelConfig
    tokenizer_files: list[Path]

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> list[int] | None: ...
    def tensor(self, name: str) -> np.ndarray: ...


def expected_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a Llama with this config has."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        })
    out["model.norm.weight"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return out


# a vocabulary file by its suffix -> the name it has in an export (where the runtime looks for it); llama2.c's
# tokenizer.bin is converted to tokenizer.model
VOCAB_FILES = {".model": "tokenizer.model", ".json": "tokenizer.json"}


def export_name(tokenizer_file: Path) -> str:
    """The name a checkpoint's tokenizer file takes in the export: its own, or tokenizer.model / tokenizer.json
    for a vocabulary given under another name (--tokenizer my-vocab.model)."""
    f = Path(tokenizer_file)
    if f.name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        return f.name
    return VOCAB_FILES.get(f.suffix, f.name)


def _check_tokenizer_file(f: Path) -> None:
    """A --tokenizer file must be a sentencepiece model, a tokenizer.json or a llama2.c tokenizer.bin."""
    if f.suffix == ".bin":
        return          # converted on export, which reports a malformed one
    if f.suffix == ".json":
        try:
            ok = "model" in json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
            ok = False
        if not ok:
            raise InputError(f"tokenizer {f}: not a Hugging Face tokenizer.json")
        return
    if f.suffix == ".model":
        import sentencepiece

        try:
            sentencepiece.SentencePieceProcessor(model_file=str(f))
        except (OSError, RuntimeError) as e:
            raise InputError(f"tokenizer {f}: not a sentencepiece model ({e})") from None
        return
    raise InputError(f"tokenizer {f}: unknown format (expected a sentencepiece .model, a tokenizer .json or a "
                     f"llama2.c .bin)")


def open_checkpoint(src: Path, tokenizer: Path | None = None) -> Checkpoint:
    """A HF directory, a .gguf file or a llama2.c .bin; validated before any weight is read."""
    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise InputError(f"{src}: no config.json (expected a Hugging Face checkpoint directory)")
        from .hf_reader import HFCheckpoint
        ckpt: Checkpoint = HFCheckpoint(src)
    elif src.suffix == ".gguf":
        from .gguf_reader import GGUFCheckpoint
        ckpt = GGUFCheckpoint(src)
    elif src.suffix == ".bin":
        from .llama2c_reader import Llama2cCheckpoint
        ckpt = Llama2cCheckpoint(src)
    else:
        raise InputError(f"{src}: unknown checkpoint format (expected a HF directory, .gguf or llama2.c .bin)")
    if tokenizer is not None:  # an explicit tokenizer replaces the checkpoint's vocabulary files
        tokenizer = Path(tokenizer)
        if not tokenizer.is_file():
            raise InputError(f"tokenizer {tokenizer} not found")
        _check_tokenizer_file(tokenizer)
        ckpt.tokenizer_files = [tokenizer] + [f for f in ckpt.tokenizer_files if f.name not in VOCAB_FILES.values()]
    _validate(ckpt, src)
    return ckpt


def _validate(ckpt: Checkpoint, src: Path) -> None:
    expected = expected_tensors(ckpt.config)
    names = set(ckpt.names())
    if "lm_head.weight" in names and ckpt.config.tie_word_embeddings:
        ckpt.config.tie_word_embeddings = False  # a separate head wins over the flag: use the weights given
        expected = expected_tensors(ckpt.config)
    for name, shape in expected.items():
        got = ckpt.shape(name)
        if got is None:
            raise InputError(f"{src.name}: missing tensor {name}")
        if tuple(got) != shape:
            raise InputError(f"{src.name}: tensor {name} has shape {list(got)}, expected {list(shape)}")
    # rotary_emb.inv_freq: a buffer older transformers saved; RoPE comes from the config
    unused = sorted(n for n in names - set(expected) if not n.endswith("rotary_emb.inv_freq"))
    if unused:     # a config with fewer layers, or biases it says the model lacks: the export would drop them
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise InputError(f"{src.name}: holds tensors its config has no place for ({', '.join(unused[:3])}{more}); "
                         f"check num_hidden_layers, attention_bias and mlp_bias")
