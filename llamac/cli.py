"""The `llamac` command line. Each command parses its options and calls one library function; errors are one line.

Exit codes: 0 success, 1 failure while running, 2 bad usage or bad input (llamac.errors.InputError).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from llamac.errors import InputError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llamac")
def cli() -> None:
    """Compile Llama-family models for edge devices."""


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--dtype", type=click.Choice(["f32", "f16"]), default="f32", show_default=True,
              help="Weight and activation dtype of the graph.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="Tokenizer file to bundle (llama2.c .bin).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def export(src: Path, out: Path, dtype: str, tokenizer: Path | None, force: bool) -> None:
    """Export a checkpoint (HF dir, .gguf, llama2.c .bin) to an ONNX directory."""
    from llamac.export.exporter import export as run_export

    path = run_export(src, out, dtype=dtype, tokenizer=tokenizer, force=force)
    click.echo(f"exported {src} -> {path}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--dequantize", type=click.Path(path_type=Path),
              help="Write the artifact's weights, exactly as it computes with them, as an f32 HF checkpoint.")
def inspect(path: Path, dequantize: Path | None) -> None:
    """Describe an export directory or a compiled artifact."""
    if (path / "manifest.json").is_file():
        from llamac import artifact

        if dequantize:
            artifact.dequantize(path, dequantize)
            click.echo(f"wrote {dequantize}")
            return
        click.echo(artifact.describe(path))
        return
    if dequantize:
        raise InputError(f"{path}: --dequantize needs a compiled artifact (no manifest.json)")
    from llamac.export.inspect import describe_export

    click.echo(describe_export(path))


def main() -> None:
    """Entry point: run the CLI, turning errors into one line and the documented exit codes."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except InputError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a failure while running: one line, full trace only on request
        if os.environ.get("LLAMAC_DEBUG"):
            raise
        click.echo(f"error: {type(e).__name__}: {e}", err=True)
        sys.exit(1)
