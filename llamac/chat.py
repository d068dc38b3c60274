"""`llamac chat`: an interactive conversation that keeps one KV cache across turns.

Each turn renders the whole conversation with the chat template and feeds only what the cache does not hold yet;
when the rendering diverges from the cache (a reply re-tokenizes differently), the cache is rebuilt from scratch.
"""
from __future__ import annotations

from typing import Callable

import click

from llamac.runtime.chat_template import STOP_STRINGS, apply_chat_template, detect_template, read_hf_template
from llamac.runtime.sampling import SamplingParams


def chat_loop(model, system: str | None = None, template: str | None = None, max_new_tokens: int = 256,
              read: Callable[[], str | None] = None, write: Callable[[str], None] = None,
              notify: Callable[[str], None] = lambda note: None, ready: Callable[[], None] = lambda: None,
              **sampling) -> list[dict]:
    """Run turns until read() returns None or '/exit'; returns the messages (those still in the context).

    When the conversation and room for a reply (max_new_tokens, at most half the context) outgrow the context, the
    oldest turns are dropped (the system prompt stays), with a note; a message that cannot fit even alone is refused
    with a note, and the chat goes on."""
    tok = model.tokenizer
    name = template or detect_template(tok, read_hf_template(model.path))
    apply_chat_template([{"role": "user", "content": "hi"}], tok, name)   # a template the tokenizer lacks: now
    SamplingParams(**sampling)          # and bad sampling options, before the user types anything
    ready()
    messages = [{"role": "system", "content": system}] if system else []
    first = len(messages)                   # index of the oldest turn
    room = min(max_new_tokens, model.max_seq_len // 2)
    sess, fed = model.session(), []
    while True:
        line = read()
        if line is None or line.strip() in ("/exit", "/quit"):
            return messages
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = apply_chat_template(messages, tok, name)
        dropped = 0
        while len(ids) + room > model.max_seq_len and len(messages) - first > 1:
            del messages[first:first + 2]   # the oldest user message and its reply
            dropped += 1
            ids = apply_chat_template(messages, tok, name)
        if dropped:
            notify(f"(context full: the oldest {dropped} turn{'s' if dropped > 1 else ''} dropped)")
        if len(ids) + room > model.max_seq_len:
            notify(f"(that message takes {len(ids)} tokens; with room for a reply it does not fit the context of "
                   f"{model.max_seq_len}: not sent)")
            messages.pop()
            continue
        if ids[:len(fed)] != fed or len(fed) == 0:
            sess.reset()
            fed = []
        stream = model.generate(ids[len(fed):], max_new_tokens, session=sess, stream=True,
                                stop=STOP_STRINGS.get(name, []), **sampling)
        started = False
        for piece in stream:
            if not started:     # the reply continues the template's text: shown without the space before it
                piece = piece.lstrip()
                started = bool(piece)
            write(piece)
        g = stream.result
        write("\n")
        fed = (ids + g.tokens + ([g.end_token] if g.end_token is not None else []))[:sess.n_past]
        messages.append({"role": "assistant", "content": g.text.strip()})


def run_chat(model, system: str | None, template: str | None, max_new_tokens: int, **sampling) -> None:
    def read() -> str | None:
        try:
            return click.prompt(click.style("you", bold=True), prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.exceptions.Abort):
            click.echo()        # end the prompt's line
            return None

    def write(text: str) -> None:
        click.echo(text, nl=False)

    def notify(note: str) -> None:
        click.echo(note, err=True)

    chat_loop(model, system, template, max_new_tokens, read, write, notify,
              lambda: click.echo("(type /exit or /quit, or Ctrl-D, to leave)", err=True), **sampling)
