"""The one exception type that means "the user gave us something we cannot use".

The CLI prints its message as a single line and exits with code 2; any other exception is a failure while running
(exit 1). Every layer (export, compiler, runtime) raises it for bad input, so the message names the real problem.
"""
from pathlib import Path


class InputError(Exception):
    """Bad input: a missing file, a malformed checkpoint, an unknown target. Message is one line for the user."""


def refuse_replacing_source(out: Path, src: Path) -> None:
    """Bad input: an output directory that is the source, or holds it (--force would replace it, source and all)."""
    out, src = Path(out).resolve(), Path(src).resolve()
    if out == src or out in src.parents:
        raise InputError(f"output {out} would replace the source {src}: choose another output directory")
