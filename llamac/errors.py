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


def check_output_dir(out: Path, force: bool) -> None:
    """Bad input: an OUT that exists (without --force), is not a directory, or is a directory llamac did not write:
    --force replaces a previous export or artifact, or an empty directory, never anything else (nothing is lost)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    names = {p.name for p in out.iterdir()}
    replaceable = not names or bool(names & {"manifest.json", "model.onnx"})
    if not force:       # suggest --force only where it would be taken
        raise InputError(f"{out} already exists" + (" (pass --force to replace it)" if replaceable else ""))
    if not replaceable:
        raise InputError(f"{out} is not a llamac export or artifact: --force replaces only those (or an empty "
                         f"directory)")


def staging_dir(out: Path) -> Path:
    """A new private directory next to `out` to write the output into (renamed to `out` when complete)."""
    import tempfile

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}") from None
