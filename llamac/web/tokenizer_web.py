"""The tokenizer as one JSON file the page's JavaScript can run (tokenizer.js implements the algorithms).

Kinds: "spm-bpe" (sentencepiece BPE models such as Llama 1/2 and the bundled model), "byte-bpe" (tiktoken-style
byte-level BPE, Llama 3). Any other tokenizer becomes "ids-only": the page decodes tokens to text but needs token
ids as input. Every kind carries each token's bytes, so decoding is the same code for all.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from llamac.runtime.tokenizer import ByteBPETokenizer, SentencePieceTokenizer, load_tokenizer

FILE = "tokenizer.web.json"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _spm_model(tok: SentencePieceTokenizer):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok._sp.serialized_model_proto())  # noqa: SLF001 - the pieces and scores live here
    return proto


def js_pattern(pattern: str) -> str:
    """Python-regex pre-tokenizer pattern -> one JavaScript's RegExp (with the u flag) accepts everywhere.

    Only `(?i:...)` groups need work (JS engines before 2024 lack inline modifiers): their letters become classes,
    `(?i:'s|'t)` -> `(?:'[sS]|'[tT])`. Llama 3's pattern needs nothing else.
    """
    def fold(m: re.Match) -> str:
        body = re.sub(r"[A-Za-z]", lambda c: f"[{c.group().lower()}{c.group().upper()}]", m.group(1))
        return "(?:" + body + ")"

    return re.sub(r"\(\?i:([^()\[\]\\]*)\)", fold, pattern)


def tokenizer_spec(src: Path) -> dict:
    tok = load_tokenizer(src)
    n = tok.vocab_size
    token_bytes = []
    for i in range(n):
        try:
            token_bytes.append(_b64(tok.token_bytes(i)))
        except (ValueError, IndexError):
            token_bytes.append("")
    spec: dict = {
        "kind": "ids-only",
        "vocab_size": n,
        "bos_id": tok.bos_id,
        "eos_ids": list(tok.eos_ids),
        "special_ids": [i for i in range(n) if tok.is_special(i)],
        "adds_dummy_prefix": bool(tok.adds_dummy_prefix),
        "token_bytes": token_bytes,
    }
    if isinstance(tok, SentencePieceTokenizer) and hasattr(tok, "_sp"):
        proto = _spm_model(tok)
        if proto.trainer_spec.model_type == 2:  # BPE
            norm = proto.normalizer_spec
            spec.update(kind="spm-bpe",
                        pieces=[[p.piece, p.score, p.type] for p in proto.pieces],
                        byte_fallback=bool(proto.trainer_spec.byte_fallback),
                        add_dummy_prefix=bool(norm.add_dummy_prefix),
                        remove_extra_whitespaces=bool(norm.remove_extra_whitespaces),
                        normalizer=norm.name,
                        unk_id=proto.trainer_spec.unk_id)
    elif isinstance(tok, ByteBPETokenizer):
        encoder, ranks = tok._encoder, tok._ranks  # noqa: SLF001
        spec.update(kind="byte-bpe",
                    pattern=js_pattern(tok._pattern.pattern),  # noqa: SLF001
                    encoder=[[_b64(b), i] for b, i in encoder.items()],
                    ranks=None if ranks is encoder else [[_b64(b), r] for b, r in ranks.items()],
                    specials=tok.special_tokens())
    return spec


def write_tokenizer(export_dir: Path, out: Path) -> dict | None:
    """Writes out/tokenizer.web.json if the export has a tokenizer; returns a summary for the manifest."""
    has = any((export_dir / f).is_file() for f in ("tokenizer.model", "tokenizer.json"))
    if not has:
        return None
    spec = tokenizer_spec(export_dir)
    (out / FILE).write_text(json.dumps(spec, separators=(",", ":")))
    return {"file": FILE, "kind": spec["kind"], "vocab_size": spec["vocab_size"]}
