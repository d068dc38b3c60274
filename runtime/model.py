"""load(path) -> Model; Model.session() owns one KV cache; Model.generate() is the generation loop.

The loop is backend-agnostic: a backend session only has prefill(ids), decode(token), reset(), n_past, max_seq_len.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from llamac.errors import InputError

from .prompt import as_token_ids
from .sampling import Sampler


@dataclasses.dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    stop_reason: str          # "eos", "stop", "length" or "context"
    prefill_s: float
    decode_s: float
    end_token: int | None = None    # the end-of-sequence id sampled when stop_reason is "eos" (not in tokens)

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s and len(self.tokens) > 1 else 0.0


class Model:
    def __init__(self, backend, path: Path):
        self.backend = backend
        self.path = Path(path)
        self.config = backend.config
        self.max_seq_len: int = backend.max_seq_len
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    @functools.cached_property
    def eos_ids(self) -> frozenset[int]:
        """Ids that end a generation: the config's, generation_config.json's (Llama 3 Instruct lists <|eot_id|>
        only there, and transformers' generate stops on them) and the tokenizer's own (a Llama 3 base config lists
        only <|end_of_text|>, but a chat turn ends with <|eot_id|>)."""
        own = set(self.tokenizer.eos_ids) if _has_tokenizer(self) else set()
        return frozenset(self.config.eos_token_ids) | generation_eos(self.path) | own

    def session(self):
        return self.backend.session()

    def encode_prompt(self, prompt: str | Sequence[int], add_bos: bool = True) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            bos = self.config.bos_token_id
            return ([bos] if add_bos and bos is not None else []) + list(ids)
        if not isinstance(prompt, (Sequence, np.ndarray)) or isinstance(prompt, bytes):
            raise InputError(f"a prompt is text or a sequence of token ids, got {type(prompt).__name__}")
        return as_token_ids(prompt)[0].tolist()     # the session checks them against the vocabulary

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: str | Sequence[str] = (), stream: bool = False, session=None,
                 add_bos: bool = True, truncate: bool = False):
        """Generate up to max_new_tokens; returns a Generation, or with stream=True an iterator of text pieces
        (its .result is set when it ends). `stop`: a string or several. Pass `session` to continue a conversation in
        the same KV cache: when the call ends, the cache holds the prompt, the reply and its end-of-sequence token."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
        if stop is None or isinstance(stop, str):
            stops = () if stop is None else (stop,)
        elif isinstance(stop, (list, tuple)) and all(isinstance(st, str) for st in stop):
            stops = tuple(stop)
        else:
            raise InputError(f"stop must be a string or a list of strings, got {stop!r}")
        it = _Stream(self, prompt, int(max_new_tokens), Sampler(temperature=temperature, top_k=top_k, top_p=top_p,
                                                                min_p=min_p, repetition_penalty=repetition_penalty,
                                                                seed=seed),
                     stops, session, add_bos, truncate)
        if stream:
            return it
        for _ in it:
            pass
        return it.result


class _Stream:
    """The generation loop as an iterator of decoded text pieces."""

    def __init__(self, model: Model, prompt, max_new_tokens: int, sampler: Sampler, stop: tuple[str, ...],
                 session, add_bos: bool, truncate: bool):
        if any(not st for st in stop):
            raise InputError("a stop string must not be empty")
        self.model, self.sampler, self.stop = model, sampler, stop
        self.max_new_tokens = max_new_tokens
        self.session = session if session is not None else model.session()
        self.continued = session is not None    # the caller's session: leave the whole reply in its cache
        # Only the first turn of a session starts with BOS.
        self.ids = model.encode_prompt(prompt, add_bos=add_bos and self.session.n_past == 0)
        room = self.session.max_seq_len - self.session.n_past
        if len(self.ids) > room:
            if not truncate:
                raise InputError(f"prompt of {len(self.ids)} tokens does not fit the context "
                                 f"({room} of {self.session.max_seq_len} positions left); pass truncate=True "
                                 f"(--truncate) to keep its end")
            self.ids = _truncated(self.ids, room, max_new_tokens, model.config.bos_token_id, self.session.n_past == 0)
        self.result: Generation | None = None
        self._gen = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def _run(self) -> Iterator[str]:
        m, s = self.model, self.session
        has_tok = _has_tokenizer(m)
        eos = m.eos_ids
        # after text (a prompt's, or earlier turns'), the reply's first word keeps its space: prompt + text reads
        # as the model wrote it ("And" + " he said", not "Andhe said"), and a stop string can start with a space
        detok = m.tokenizer.stream(continues=s.n_past > 0 or _has_text(m.tokenizer, self.ids)) if has_tok else None
        # a vocabulary padded past the tokenizer's (rows no text maps to): sample only ids the tokenizer can write
        offered = max(m.tokenizer.vocab_size, max(eos, default=-1) + 1) if has_tok else None
        t0 = time.perf_counter()
        logits = s.prefill(self.ids)
        t1 = time.perf_counter()
        history, tokens, text, reason = list(self.ids), [], "", "length"
        shown = 0       # text[:shown] is out; the rest is held back while it could be the start of a stop string
        pending = None  # the last sampled token, until it is decoded into the cache
        for n in range(self.max_new_tokens):
            tok = pending = self.sampler(logits[:offered], history)
            if tok in eos:
                reason = "eos"
                break
            tokens.append(tok)
            history.append(tok)
            text += detok.put(tok) if detok else ""
            cut = min((text.index(st) for st in self.stop if st in text), default=None)
            if cut is not None:
                text, reason = text[:cut], "stop"
                break
            ready = len(text) - _stop_prefix_len(text, self.stop)
            if ready > shown:
                yield text[shown:ready]
                shown = ready
            if n + 1 == self.max_new_tokens:
                break
            if s.n_past >= s.max_seq_len:
                reason = "context"
                break
            logits = s.decode(tok)
            pending = None
        t2 = time.perf_counter()
        if detok and reason != "stop":
            text += detok.flush()
        if len(text) > shown:
            yield text[shown:]
        if self.continued and pending is not None and s.n_past < s.max_seq_len:
            s.decode(pending)   # the next turn goes on after the last token (or the end-of-sequence one)
        self.result = Generation(list(self.ids), tokens, text, reason, t1 - t0, t2 - t1,
                                 pending if reason == "eos" else None)


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins one of `stops` (and may complete it with the next token)."""
    for k in range(min(len(text), max((len(st) for st in stops), default=1) - 1), 0, -1):
        if any(st.startswith(text[-k:]) for st in stops):
            return k
    return 0


def _truncated(ids: list[int], room: int, max_new_tokens: int, bos: int | None, first_turn: bool) -> list[int]:
    """The end of a prompt too long for `room` positions, after its BOS (a model reads its first position as the
    start of a text), leaving room for the reply: max_new_tokens, or half the room when that is less."""
    head = ids[:1] if first_turn and room > 1 and bos is not None and ids and ids[0] == bos else []
    keep = max(room - min(max_new_tokens, room // 2) - len(head), 1)
    return head + ids[len(ids) - keep:]


def generation_eos(path: Path) -> set[int]:
    """eos_token_id of the generation_config.json next to the model (an id or a list), if there is one."""
    f = path / "generation_config.json"
    if not f.is_file():
        return set()
    try:
        eos = json.loads(f.read_text()).get("eos_token_id")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise InputError(f"{f}: not a valid generation config ({e})") from None
    ids = eos if isinstance(eos, list) else [eos]
    return {i for i in ids if isinstance(i, int) and not isinstance(i, bool)}


def _has_text(tok, ids: Sequence[int]) -> bool:
    """Whether ids hold a token that is text, not markup (BOS, chat headers)."""
    return any(0 <= i < tok.vocab_size and not tok.is_special(i) for i in ids)


def _has_tokenizer(m: Model) -> bool:
    try:
        m.tokenizer
        return True
    except InputError:
        return False


def load(path: str | Path, threads: int | None = None) -> Model:
    """Load a compiled artifact (manifest.json) or an export directory (model.onnx)."""
    path = Path(path)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise InputError(f"threads must be a whole number >= 1 (or None for every core), got {threads!r}")
    threads = None if threads is None else int(threads)
    if (path / "manifest.json").is_file():
        from .tvm_backend import TVMModel

        return Model(TVMModel(path, threads=threads), path)
    if (path / "model.onnx").is_file():
        from .onnx_backend import OnnxModel

        return Model(OnnxModel(path, threads=threads), path)
    raise InputError(f"{path}: neither a compiled artifact (manifest.json) nor an export directory (model.onnx)")

