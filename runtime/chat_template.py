"""Chat templates: a list of {"role", "content"} messages -> prompt token ids, built the way Meta's reference
code builds them (token by token, not by parsing a rendered string).

- llama3: <|begin_of_text|> then per message <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>,
  ending with an open assistant header.
- llama2: <s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] answer </s><s>[INST] user [/INST]; each turn is
  encoded on its own (so the sentencepiece dummy-prefix space starts every turn, as in Meta's chat_completion).
- plain: for base models with no chat markup: a transcript "User: ...\\nAssistant: ..." after an optional system
  paragraph, ending with "Assistant:".
Message contents are encoded as ordinary text: a "<|eot_id|>" typed by a user stays text, not a control token.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from llamac.errors import InputError

from .tokenizer import Tokenizer

Message = Mapping[str, str]


def _special(tok: Tokenizer, name: str) -> int:
    i = tok.token_to_id(name)
    if i is None or not tok.is_special(i):
        raise InputError(f"this tokenizer has no {name} token, which the chat template needs")
    return i


def _bos(tok: Tokenizer) -> list[int]:
    return [] if tok.bos_id is None else [tok.bos_id]


def _check(messages: Sequence[Message]) -> None:
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError("each chat message needs a string 'role' and a string 'content'")


def llama3(messages: Sequence[Message], tok: Tokenizer, add_generation_prompt: bool = True) -> list[int]:
    start, end, eot = (_special(tok, n) for n in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    bos = [_special(tok, "<|begin_of_text|>")]

    def header(role: str) -> list[int]:
        return [start, *tok.encode(role), end, *tok.encode("\n\n")]

    ids = bos
    for m in messages:
        ids += header(m["role"]) + tok.encode(m["content"].strip()) + [eot]
    if add_generation_prompt:
        ids += header("assistant")
    return ids


def llama2(messages: Sequence[Message], tok: Tokenizer, add_generation_prompt: bool = True) -> list[int]:
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
        if msgs:  # the system prompt travels inside the first user turn
            msgs[0]["content"] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{msgs[0]['content']}"
    for i, m in enumerate(msgs):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise InputError("llama2 chat messages must be [system], user, assistant, user, ... in turn")
    bos, eos = _bos(tok), tok.eos_ids[:1]
    ids: list[int] = []
    for user, answer in zip(msgs[::2], msgs[1::2]):
        ids += bos + tok.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ") + eos
    if len(msgs) % 2 == 1:  # an open user turn: the model answers it
        ids += bos + tok.encode(f"[INST] {msgs[-1]['content'].strip()} [/INST]")
    return ids


def plain(messages: Sequence[Message], tok: Tokenizer, add_generation_prompt: bool = True) -> list[int]:
    parts = []
    for m in messages:
        content = m["content"].strip()
        parts.append(f"{content}\n\n" if m["role"] == "system" else f"{m['role'].capitalize()}: {content}\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return _bos(tok) + tok.encode("".join(parts))


TEMPLATES: dict[str, Callable[[Sequence[Message], Tokenizer, bool], list[int]]] = {
    "llama3": llama3, "llama2": llama2, "plain": plain}
# Text after which generation should stop, beyond the tokenizer's EOS ids (a base model keeps writing turns).
STOP_STRINGS: dict[str, list[str]] = {"llama3": [], "llama2": [], "plain": ["\nUser:"]}


def detect_template(tok: Tokenizer, hf_template: str | None = None) -> str:
    """Template name for a tokenizer. hf_template: the jinja chat_template from tokenizer_config.json, if known;
    it tells a Llama 2 chat model from a base model, which share one vocabulary."""
    if hf_template:
        if "<|start_header_id|>" in hf_template:
            return "llama3"
        if "[INST]" in hf_template:
            return "llama2"
    specials = tok.special_tokens()
    if all(t in specials for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")):
        return "llama3"
    return "plain"


def read_hf_template(model_dir: str | Path) -> str | None:
    """The chat_template string of model_dir/tokenizer_config.json, or None."""
    path = Path(model_dir) / "tokenizer_config.json"
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # the multi-template form: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def apply_chat_template(messages: Sequence[Message], tokenizer: Tokenizer, template: str | None = None,
                        add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids (BOS included) for a conversation. template: a TEMPLATES name, or None to detect it."""
    name = template or detect_template(tokenizer)
    if name not in TEMPLATES:
        raise InputError(f"unknown chat template {name!r}; choose one of {', '.join(TEMPLATES)}")
    _check(messages)
    return TEMPLATES[name](messages, tokenizer, add_generation_prompt)
