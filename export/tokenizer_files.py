"""Rebuild standard tokenizer files from vocabularies stored elsewhere, so every export runs like any other.

GGUF metadata: `tokenizer.ggml.model == "llama"` (sentencepiece: Llama 1/2, Code Llama) -> tokenizer.model
(sentencepiece protobuf); `"gpt2"` (byte-level BPE, Llama 3) -> tokenizer.json (Hugging Face format).
llama2.c's tokenizer.bin (pieces with scores, spaces instead of U+2581) -> tokenizer.model.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from llamac.errors import InputError

# Llama 3's pre-tokenizer split (the regex its tokenizer.json and tiktoken file use).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre values llama.cpp reads as Llama 3's split; None: a file written before the key existed, which for
# a llama model with a byte-level BPE vocabulary means Llama 3 ("default" is GPT-2's split, which llamac does not write)
LLAMA3_PRE = (None, "llama-bpe", "llama3", "llama-v3")
_CONTROL, _BYTE = 3, 6


def write_tokenizer(reader, out_dir: Path) -> Path | None:
    """Write tokenizer.model or tokenizer.json into out_dir from a gguf.GGUFReader; None if the file has no vocab."""
    def field(name: str, default=None):
        f = reader.get_field(name)
        return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    if kind is None:
        return None
    tokens = field("tokenizer.ggml.tokens")
    if not tokens:
        raise InputError(f"the GGUF tokenizer ({kind!r}) has no tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "llama":
        return _write_sentencepiece(out_dir / "tokenizer.model", tokens, field("tokenizer.ggml.scores"), types,
                                    field("tokenizer.ggml.unknown_token_id", 0), field("tokenizer.ggml.bos_token_id", 1),
                                    field("tokenizer.ggml.eos_token_id", 2), field("tokenizer.ggml.add_space_prefix",
                                                                                   True))
    if kind == "gpt2":
        pre = field("tokenizer.ggml.pre")
        if pre not in LLAMA3_PRE:     # another model's split regex: encoding with Llama 3's would be wrong
            raise InputError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: Llama 3's, {LLAMA3_PRE[1]!r})")
        return _write_bpe_json(out_dir / "tokenizer.json", tokens, types, field("tokenizer.ggml.merges") or [])
    raise InputError(f"unsupported GGUF tokenizer model {kind!r} (supported: llama, gpt2)")


def _write_sentencepiece(path: Path, tokens, scores, types, unk: int, bos: int, eos: int, dummy_prefix: bool) -> Path:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    # Llama's settings: BPE with byte fallback, no normalisation, a dummy-prefix space.
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = unk, bos, eos, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(dummy_prefix)
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    scores = scores if scores is not None else [0.0] * len(tokens)
    # GGUF token types use sentencepiece's numbering (1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte).
    for piece, score, t in zip(tokens, scores, types):
        m.pieces.add(piece=piece, score=float(score), type=int(t))
    path.write_bytes(m.SerializeToString())
    return path


def _write_bpe_json(path: Path, tokens, types, merges) -> Path:
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty == _CONTROL]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(merges)},
    }
    path.write_text(json.dumps(spec, ensure_ascii=False))
    return path


def convert_llama2c_tokenizer(src: Path, out_dir: Path) -> Path:
    """llama2.c tokenizer.bin: uint32 max_token_length, then per token: float32 score, uint32 length, bytes."""
    data = Path(src).read_bytes()
    tokens, scores, types = [], [], []
    pos = 4
    try:
        while pos < len(data):
            score, n = struct.unpack_from("<fI", data, pos)
            piece = data[pos + 8:pos + 8 + n].decode("utf-8")
            pos += 8 + n
            scores.append(score)
            i = len(tokens)
            if i in (1, 2):  # llama2.c writes BOS/EOS as "\n<s>\n" and "\n</s>\n"
                tokens.append(piece.strip())
                types.append(_CONTROL)
            else:
                tokens.append(piece.replace(" ", "\u2581"))
                types.append(2 if i == 0 else _BYTE if piece.startswith("<0x") and len(piece) == 6 else 1)
    except (struct.error, UnicodeDecodeError):
        raise InputError(f"{src}: not a llama2.c tokenizer.bin") from None
    if len(tokens) < 3:
        raise InputError(f"{src}: not a llama2.c tokenizer.bin")
    return _write_sentencepiece(Path(out_dir) / "tokenizer.model", tokens, scores, types, 0, 1, 2, True)
