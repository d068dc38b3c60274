"""Tokenizers for Llama models, behind one small interface.

Three backends, picked from the file:
- sentencepiece tokenizer.model (Llama 1/2, Code Llama): the `sentencepiece` library.
- byte-level BPE (Llama 3): Meta's tiktoken-format tokenizer.model ("base64token rank" lines) or a HF tokenizer.json
  with a ByteLevel pre-tokenizer. Pure Python (`regex` for the pre-tokenizer pattern), no tokenizers/tiktoken needed.
- any other tokenizer.json (e.g. the sentencepiece-style BPE that Llama 2 HF repos ship): the `tokenizers` library.

encode() never adds BOS; callers (chat templates, the generation loop) add it. Special tokens written in text are
only recognised with encode(text, allow_special=True), so user text cannot smuggle in control tokens.
decode() and stream() share one byte-level path: every token maps to its bytes, and a UTF-8 incremental decoder
turns them into text, so a character split across tokens comes out whole, once all its bytes have arrived.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
from collections.abc import Iterable
from pathlib import Path

from llamac.errors import InputError

# Meta's Llama 3.1 names for the 256 special tokens that follow the 128000 BPE ranks (Llama 3.0 uses the same ids,
# with reserved names where 3.1 has <|finetune_right_pad_id|>, <|step_id|>, <|eom_id|>, <|python_tag|>).
_LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - 11)]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BOS_NAMES = ("<|begin_of_text|>", "<s>")
_EOS_NAMES = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "</s>")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SURROGATE = re.compile("[\ud800-\udfff]")


class Tokenizer:
    """The interface every backend implements. Subclasses fill in the attributes and the four token methods."""

    bos_id: int | None
    eos_ids: list[int]
    vocab_size: int
    # sentencepiece's dummy prefix: encode puts a space before the text, decode drops it from the first text token.
    adds_dummy_prefix: bool = False
    _special_re: re.Pattern[str] | None = None  # built on first use by _split_special

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text` (no BOS). With allow_special, special-token text like "<|eot_id|>" becomes that token;
        otherwise it is plain text."""
        bad = _SURROGATE.search(text)
        if bad:     # what Python makes of bytes that were not UTF-8 (e.g. in a command-line argument)
            raise InputError(f"the text is not valid UTF-8: character {bad.start()} is a lone surrogate "
                             f"{ascii(bad.group())}")
        return self._encode(text, allow_special)

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """Id of a token given by its exact vocabulary string (e.g. "<|eot_id|>"); None if absent."""
        raise NotImplementedError

    def is_special(self, token_id: int) -> bool:
        """True for control tokens (BOS, EOS, chat headers): they are markup, not text."""
        raise NotImplementedError

    def token_bytes(self, token_id: int, first: bool = False) -> bytes:
        """The bytes one token contributes to decoded text; `first`: it is the first text token of the sequence."""
        raise NotImplementedError

    def special_tokens(self) -> dict[str, int]:
        """All special tokens by text."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        stream = self.stream(skip_special)
        return "".join(stream.put(i) for i in ids) + stream.flush()

    def stream(self, skip_special: bool = False, continues: bool = False) -> TokenStream:
        """A streaming detokenizer: put(id) returns only complete characters, flush() the rest. `continues`: the
        tokens follow text (a prompt), so a sentencepiece word keeps the space before it."""
        return TokenStream(self, skip_special, continues)

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return token_id

    def _split_special(self, text: str, allow_special: bool) -> list[tuple[str, int | None]]:
        """Cut text into (plain text, None) and (special token text, id) pieces."""
        if not allow_special or not text:
            return [(text, None)]
        specials = self.special_tokens()
        if not specials:
            return [(text, None)]
        if self._special_re is None:
            names = sorted(specials, key=len, reverse=True)  # longest first, so no token shadows a longer one
            self._special_re = re.compile("|".join(map(re.escape, names)))
        pattern = self._special_re
        out: list[tuple[str, int | None]] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], None))
            out.append((m.group(), specials[m.group()]))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], None))
        return out

    def _find_bos_eos(self) -> None:
        specials = self.special_tokens()
        self.bos_id = next((specials[n] for n in _BOS_NAMES if n in specials), None)
        self.eos_ids = [specials[n] for n in _EOS_NAMES if n in specials]


class TokenStream:
    """Incremental detokenizer. It holds back incomplete UTF-8 sequences and never emits broken text:
    bytes that can never form a character become U+FFFD, exactly as a whole-sequence decode would show them."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, continues: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = not continues  # no text yet (sentencepiece strips the dummy-prefix space there)

    def put(self, token_id: int) -> str:
        if self._tok.is_special(token_id):
            if self._skip_special:
                return ""
            # Control tokens do not end the "start of text" state, as in sentencepiece's own decoder.
            return self._utf8.decode(self._tok.token_bytes(token_id))
        data = self._tok.token_bytes(token_id, first=self._first)
        self._first = False
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is still buffered, at the end of generation (an incomplete character becomes U+FFFD).
        For a new sequence (say, the next chat reply) make a new stream: only a new one strips a dummy prefix."""
        return self._utf8.decode(b"", final=True)


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 style sentencepiece model (BPE with byte fallback and a dummy-prefix space)."""

    def __init__(self, path: Path) -> None:
        import sentencepiece  # lazy: only sentencepiece models need it

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self._specials = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        self._special_ids = set(self._specials.values())
        # The normalizer settings are not exposed: probe whether encode prepends the whitespace marker.
        self.adds_dummy_prefix = "".join(sp.encode("a", out_type=str)).startswith("\u2581")
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_ids = [sp.eos_id()] if sp.eos_id() >= 0 else []
        self._pieces: dict[int, bytes] = {}

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        ids: list[int] = []
        for chunk, special_id in self._split_special(text, allow_special):
            if special_id is not None:
                ids.append(special_id)
            elif chunk:
                ids.extend(self._sp.encode(chunk))
        return ids

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def token_bytes(self, token_id: int, first: bool = False) -> bytes:
        data = self._pieces.get(token_id)
        if data is None:
            sp, piece = self._sp, self._sp.id_to_piece(self._check_id(token_id))
            if sp.is_byte(token_id):
                data = bytes([int(piece[3:5], 16)])
            elif sp.is_unknown(token_id):
                data = " \u2047 ".encode()  # sentencepiece's default surface for <unk>
            elif sp.is_control(token_id):
                data = piece.encode()
            else:
                data = piece.replace("\u2581", " ").encode()
            self._pieces[token_id] = data
        # The dummy prefix is dropped only from a normal piece that starts the text (not from a <0x20> byte).
        if first and self.adds_dummy_prefix and data.startswith(b" ") and not self._sp.is_byte(token_id) \
                and not self._sp.is_unknown(token_id):
            return data[1:]
        return data


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte, used by byte-level tokenizer.json vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ByteBPETokenizer(Tokenizer):
    """Byte-level BPE as in tiktoken and Llama 3: split text with a regex, then merge byte pairs by rank."""

    def __init__(self, encoder: dict[bytes, int], specials: dict[str, int], pattern: str,
                 ranks: dict[bytes, int] | None = None) -> None:
        import regex  # lazy: \p{L} classes need the third-party regex module

        lacking = [b for b in range(256) if bytes([b]) not in encoder]
        if lacking:     # any text must split into tokens down to single bytes
            raise ValueError(f"a byte-level BPE vocabulary without tokens for {len(lacking)} of the 256 bytes")
        self._encoder = encoder
        self._ranks = encoder if ranks is None else ranks  # merge priority; tiktoken uses the token id itself
        self._specials = dict(specials)
        self._special_ids = set(specials.values())
        self._pattern = regex.compile(pattern)
        self.vocab_size = max([*encoder.values(), *specials.values()]) + 1
        self._decoder: list[bytes | None] = [None] * self.vocab_size
        for b, i in encoder.items():
            self._decoder[i] = b
        for s, i in specials.items():
            self._decoder[i] = s.encode()
        self._cache: dict[bytes, list[int]] = {}
        self._find_bos_eos()

    @classmethod
    def from_tiktoken(cls, path: Path) -> ByteBPETokenizer:
        encoder = {}
        for line in path.read_bytes().splitlines():
            if line.strip():
                token, rank = line.split()
                encoder[base64.b64decode(token, validate=True)] = int(rank)
        first = len(encoder)
        specials = {s: first + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)}
        return cls(encoder, specials, LLAMA3_PATTERN)

    @classmethod
    def from_tokenizer_json(cls, spec: dict) -> ByteBPETokenizer:
        # Map each stand-in character back to the byte it encodes (via latin-1, which is one byte per code point).
        table = str.maketrans({c: chr(b) for b, c in _bytes_to_unicode().items()})

        def to_bytes(s: str) -> bytes:
            return s.translate(table).encode("latin-1")

        model = spec["model"]
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        special_ids = set(specials.values())
        encoder = {}
        for s, i in model["vocab"].items():
            if i not in special_ids:  # specials may sit in the vocab too; they are matched as text, not merged
                encoder[to_bytes(s)] = i
        ranks: dict[bytes, int] = {}
        for rank, merge in enumerate(model.get("merges", [])):
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            ranks.setdefault(to_bytes(a) + to_bytes(b), rank)
        return cls(encoder, specials, _split_pattern(spec.get("pre_tokenizer")), ranks)

    def encode_with_library(self, path: Path) -> None:
        """Encode with the `tokenizers` library from now on (decoding stays byte-level here): for a tokenizer.json
        whose normalizer or pre-tokenizer steps this class does not run (lowercasing, NFKC, digits, prefix space)."""
        self._library = _library_tokenizer(path)

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        library = getattr(self, "_library", None)
        if library is not None:
            library.encode_special_tokens = not allow_special
            return library.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for chunk, special_id in self._split_special(text, allow_special):
            if special_id is not None:
                ids.append(special_id)
                continue
            for word in self._pattern.findall(chunk):
                ids.extend(self._encode_word(word.encode("utf-8")))
        return ids

    def _encode_word(self, word: bytes) -> list[int]:
        if word in self._encoder:  # whole pre-token in the vocabulary: tiktoken and Llama 3 take it directly
            return [self._encoder[word]]
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [word[i:i + 1] for i in range(len(word))]
        ranks = self._ranks
        while len(parts) > 1:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        ids = [self._encoder[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        return self._encoder.get(token.encode())

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def token_bytes(self, token_id: int, first: bool = False) -> bytes:
        data = self._decoder[self._check_id(token_id)]
        if data is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        return data


def _split_pattern(pre_tokenizer: dict | None) -> str:
    """The regex of a tokenizer.json Split pre-tokenizer (Llama 3 has one before ByteLevel)."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    for step in steps:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            return step["pattern"]["Regex"]
    # A ByteLevel pre-tokenizer with its own regex is GPT-2's; Llama 3's tokenizer.json always names its pattern.
    return r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


class HFTokenizer(Tokenizer):
    """Any other tokenizer.json (e.g. Llama 2's sentencepiece-style BPE), run by the `tokenizers` library."""

    def __init__(self, path: Path, spec: dict) -> None:
        self._tok = _library_tokenizer(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        # <unk> is text in sentencepiece's eyes (it decodes to " ⁇ "), not a control token.
        self._unk_id = self._specials.pop(spec["model"].get("unk_token") or "", None)
        self._special_ids = set(self._specials.values())
        self._byte_fallback = bool(spec["model"].get("byte_fallback"))
        text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
        self.adds_dummy_prefix = '"Prepend"' in text or ('"Metaspace"' in text and '"never"' not in text)
        self._find_bos_eos()

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        self._tok.encode_special_tokens = not allow_special
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def token_bytes(self, token_id: int, first: bool = False) -> bytes:
        piece = self._tok.id_to_token(self._check_id(token_id))
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if token_id in self._special_ids:
            return piece.encode()
        if token_id == self._unk_id:
            return " \u2047 ".encode()
        m = _BYTE_PIECE.fullmatch(piece)
        if m and self._byte_fallback:
            return bytes([int(m.group(1), 16)])
        if first and self.adds_dummy_prefix and piece.startswith("\u2581"):
            piece = piece[1:]
        return piece.replace("\u2581", " ").encode()


def _library_tokenizer(path: Path):
    """tokenizer.json loaded by the `tokenizers` library (imported lazily: only such files need it)."""
    try:
        from tokenizers import Tokenizer as _HFTokenizer
    except ImportError as e:
        raise InputError(f"{path} needs the 'tokenizers' package (pip install tokenizers)") from e
    return _HFTokenizer.from_file(str(path))


def _is_tiktoken(path: Path) -> bool:
    """Meta's Llama 3 tokenizer.model is text, "base64 rank" per line; a sentencepiece model is binary protobuf."""
    with open(path, "rb") as f:
        head = f.read(512)
    first = head.split(b"\n", 1)[0]
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?", first) is not None


def _load_json(path: Path) -> Tokenizer:
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") == "BPE" and '"ByteLevel"' in pre:
        tok = ByteBPETokenizer.from_tokenizer_json(spec)
        if not _plain_byte_level(spec):
            tok.encode_with_library(path)
        return tok
    return HFTokenizer(path, spec)


def _plain_byte_level(spec: dict) -> bool:
    """A byte-level BPE that ByteBPETokenizer encodes exactly: no normalizer, and a ByteLevel pre-tokenizer without
    a prefix space, alone (GPT-2's regex) or after one isolating Split regex (Llama 3's)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if spec.get("normalizer") is not None or kinds not in (["ByteLevel"], ["Split", "ByteLevel"]) \
            or steps[-1].get("add_prefix_space"):
        return False
    if kinds == ["ByteLevel"]:
        return steps[0].get("use_regex", True)
    split = steps[0]
    return not steps[-1].get("use_regex", True) and "Regex" in split.get("pattern", {}) \
        and split.get("behavior") == "Isolated" and not split.get("invert")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.model (sentencepiece or tiktoken format), tokenizer.json, or a directory holding one.

    In a directory a sentencepiece tokenizer.model wins; otherwise tokenizer.json, then a tiktoken tokenizer.model.
    """
    p = Path(path)
    if p.is_dir():
        model, hf = p / "tokenizer.model", p / "tokenizer.json"
        if model.is_file() and not _is_tiktoken(model):
            p = model
        elif hf.is_file():
            p = hf
        elif model.is_file():
            p = model
        else:
            raise InputError(f"no tokenizer.model or tokenizer.json in {p}")
    if not p.is_file():
        raise InputError(f"tokenizer not found: {p}")
    try:
        if p.suffix == ".json":
            return _load_json(p)
        if _is_tiktoken(p):
            return ByteBPETokenizer.from_tiktoken(p)
        return SentencePieceTokenizer(p)
    except InputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read tokenizer {p}: {type(e).__name__}: {e}") from e


__all__ = ["Tokenizer", "TokenStream", "SentencePieceTokenizer", "ByteBPETokenizer", "HFTokenizer",
           "load_tokenizer", "LLAMA3_SPECIAL_TOKENS"]
