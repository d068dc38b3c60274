"""Open any supported checkpoint and check it holds every tensor the config implies, with the right shape.

Every reader hands out tensors under Hugging Face names, in HF layout (rotate-half q/k rows), as float32 or float16.
"""
from __future__ import annotations

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
    if tokenizer is not None:  # an explicit tokenizer replaces a same-named file from the checkpoint
        tokenizer = Path(tokenizer)
        if not tokenizer.is_file():
            raise InputError(f"tokenizer {tokenizer} not found")
        ckpt.tokenizer_files = [tokenizer] + [f for f in ckpt.tokenizer_files if f.name != tokenizer.name]
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
