"""`llamac chat`: an interactive conversation that keeps one KV cache across turns.

Each turn renders the whole conversation with the chat template and feeds only what the cache does not hold yet;
when the rendering diverges from the cache (a reply re-tokenizes differently), the cache is rebuilt from scratch.
"""
from __future__ import annotations

from typing import Callable

import click

from llamac.runtime.chat_template import STOP_STRINGS, apply_chat_template, detect_template, read_hf_template


def chat_loop(model, system: str | None = None, template: str | None = None, max_new_tokens: int = 256,
              read: Callable[[], str | None] = None, write: Callable[[str], None] = None, **sampling) -> list[dict]:
    """Run turns until read() returns None or '/exit'; returns the messages."""
    tok = model.tokenizer
    name = template or detect_template(tok, read_hf_template(model.path))
    messages = [{"role": "system", "content": system}] if system else []
    sess, fed = model.session(), []
    while True:
        line = read()
        if line is None or line.strip() in ("/exit", "/quit"):
            return messages
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = apply_chat_template(messages, tok, name)
        if ids[:len(fed)] != fed or len(fed) == 0:
            sess.reset()
            fed = []
        stream = model.generate(ids[len(fed):], max_new_tokens, session=sess, stream=True,
                                stop=STOP_STRINGS.get(name, []), **sampling)
        for piece in stream:
            write(piece)
        g = stream.result
        write("\n")
        fed = (ids + g.tokens)[:sess.n_past]
        messages.append({"role": "assistant", "content": g.text.strip()})


def run_chat(model, system: str | None, template: str | None, max_new_tokens: int, **sampling) -> None:
    def read() -> str | None:
        try:
            return click.prompt(click.style("you", bold=True), prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.exceptions.Abort):
            return None

    def write(text: str) -> None:
        click.echo(text, nl=False)

    click.echo("(type /exit or Ctrl-D to leave)", err=True)
    chat_loop(model, system, template, max_new_tokens, read, write, **sampling)
