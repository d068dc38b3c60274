"""The `llamac` command line. Each command parses its options and calls one library function; errors are one line.

Exit codes: 0 success, 1 failure while running, 2 bad usage or bad input (llamac.errors.InputError).
"""
from __future__ import annotations

import os
import re
import signal
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
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="Tokenizer to bundle instead of the checkpoint's: a sentencepiece .model, a tokenizer .json or a "
                   "llama2.c .bin.")
@click.option("--force", is_flag=True, help="Replace OUT if it is a previous export or artifact (or an empty directory).")
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


@cli.command("compile")
@click.argument("src", type=click.Path(path_type=Path), required=False)
@click.option("--target", "-t", default=None,
              help="Target name (see `llamac targets`) or a .toml file. Default: the best target for this machine.")
@click.option("--quant", "-q", default="q4", show_default=True, help="Quantization scheme: f32, f16, q8, q4.")
@click.option("--group-size", type=click.IntRange(min=1), default=None, help="q4/q8: inputs per scale, a multiple of 8 (default: q4 32, q8 one scale per output channel).")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None, help="KV cache capacity (default: the model's context, at most 4096).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it is a previous export or artifact (or an empty directory).")
@click.option("--no-tuning", is_flag=True,
              help="Ignore `llamac tune`'s results: the target file's parameters as they are.")
def compile_cmd(src: Path | None, target: str | None, quant: str, group_size: int | None, max_seq_len: int | None,
                out: Path, force: bool, no_tuning: bool) -> None:
    """Compile a checkpoint or export directory (default: the bundled model) into an artifact."""
    from llamac.compiler import compile_model

    if src is None:
        src = _bundled_checkpoint()
    if target is None:
        from llamac.targets import host_target

        target = host_target()
    path = compile_model(src, target, quant=quant, group_size=group_size, max_seq_len=max_seq_len, out=out,
                         force=force, tuning=False if no_tuning else None)
    click.echo(f"compiled {src} for {target} ({quant}) -> {path}")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path), required=False)
@click.option("--target", "-t", default=None, help="Target to tune (default: the best target for this machine).")
@click.option("--quant", "-q", default="q4", show_default=True, help="Quantization scheme: f32, f16, q8, q4.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Tuning file to write (default: $LLAMAC_TUNING_DIR or ~/.cache/llamac/tuning, TARGET.json).")
@click.option("-p", "--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("-n", "--gen-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads (default: all cores).")
def tune(src: Path | None, target: str | None, quant: str, out: Path | None, prompt_tokens: int, gen_tokens: int,
         repetitions: int, threads: int | None) -> None:
    """Measure a target's schedule parameters on this machine; `llamac compile` then uses the best.

    Compiles SRC (default: the bundled model) once per candidate, measures each like `llamac bench` and keeps the
    fastest decode in a tuning file for the target. Run it on a machine of the target, on a model the size of
    the ones you will compile."""
    from llamac.tune import tune as run_tune

    if src is None:
        src = _bundled_checkpoint()
    if target is None:
        from llamac.targets import host_target

        target = host_target()
    _warn_if_oversubscribed(threads)
    entry, path = run_tune(src, target, quant, out, prompt_tokens, gen_tokens, repetitions, threads,
                           log=lambda line: click.echo(line, err=True))
    click.echo(f"tuned {target} ({quant}): {', '.join(f'{k}={v}' for k, v in entry['params'].items())} -> {path}")


@cli.command()
def targets() -> None:
    """List the built-in targets."""
    from llamac.targets import list_targets

    found = list_targets()
    width = max(len(t.name) for t in found)
    for t in found:
        click.echo(f"{t.name:{width}s}  {t.summary}")


def _bundled_checkpoint() -> Path:
    from llamac import bundled

    return bundled.checkpoint()


def _parse_ids(text: str) -> list[int]:
    parts = re.split(r"\s*,\s*|\s+", text.strip())     # "1,2", "1, 2" and "1 2" alike
    if not all(re.fullmatch(r"[0-9]+", p, re.ASCII) for p in parts):
        raise InputError(f"--ids expects integers separated by commas or spaces, got {text!r}")
    ids = [int(p) for p in parts]
    for i in ids:
        if not 0 <= i < 2 ** 31:
            raise InputError(f"--ids: token id {i} is outside any vocabulary")
    return ids


def _options_as_argv(ctx: click.Context, skip: set[str]) -> list[str]:
    """The command's parsed options back as arguments (to re-run the command elsewhere, e.g. under qemu)."""
    argv: list[str] = []
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if not isinstance(p, click.Option) or p.name in skip or value is None or value is False:
            continue
        flag = p.opts[-1]
        if p.is_flag:
            argv.append(flag)
        else:
            for v in (value if p.multiple else [value]):
                argv += [flag, str(v)]
    return argv


@cli.command()
@click.argument("art", type=click.Path(path_type=Path), required=False)
@click.option("-p", "--prompt", help="Prompt text.")
@click.option("--ids", help="Prompt as token ids, separated by commas or spaces (no BOS added).")
@click.option("-n", "--max-tokens", type=click.IntRange(min=0), default=64, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Keep the k most likely tokens (0 = all).")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--min-p", default=0.0, show_default=True, help="Drop tokens below min_p x the top probability.")
@click.option("--repetition-penalty", default=1.0, show_default=True,
              help="Above 1 discourages the tokens among the last 64, prompt included (1 = off).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--truncate", is_flag=True,
              help="For a prompt longer than the context, keep its BOS and its end (leaving room for the reply) "
                   "instead of failing.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--emulate", is_flag=True, help="Run an artifact for another architecture (arm64) under qemu-user.")
@click.option("--browser", is_flag=True, help="Run a WebGPU artifact in headless Chromium.")
def run(art: Path | None, prompt: str | None, ids: str | None, max_tokens: int, temperature: float, top_k: int,
        top_p: float, min_p: float, repetition_penalty: float, seed: int | None, stop: tuple[str, ...],
        truncate: bool, threads: int | None, as_json: bool, emulate: bool, browser: bool) -> None:
    """Generate text from an artifact or export directory (default: the bundled model)."""
    if (prompt is None) == (ids is None):
        raise InputError("give exactly one of -p/--prompt and --ids")
    art = art or _default_artifact()
    if emulate:
        from llamac.runtime.emulate import run_emulated

        sys.exit(run_emulated(art, [str(art)] + _options_as_argv(click.get_current_context(), skip={"emulate"})))
    if browser:
        from llamac.runtime.browser import run_in_browser

        if top_k or top_p < 1 or min_p or repetition_penalty != 1 or stop or truncate:
            raise InputError("--browser samples with --temperature and --seed only (no top-k/top-p/min-p/"
                             "repetition penalty/stop/truncate)")

        g = run_in_browser(art, _parse_ids(ids) if ids else [], max_tokens, temperature=temperature,
                           seed=seed or 0, prompt=prompt)
        _print_result(g["prompt_tokens"], g["tokens"], g["text"], g["stop_reason"], g["prefill_tok_s"],
                      g["decode_tok_s"], as_json, streamed=False)
        return
    from llamac.runtime import load

    _warn_if_oversubscribed(threads)
    model = load(art, threads=threads)
    it = model.generate(prompt if ids is None else _parse_ids(ids), max_new_tokens=max_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, seed=seed, stop=stop, stream=True,
                        add_bos=ids is None, truncate=truncate)
    for piece in it:
        if not as_json:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    g = it.result
    _print_result(g.prompt_tokens, g.tokens, g.text, g.stop_reason, g.prefill_tok_s, g.decode_tok_s, as_json,
                  streamed=True)


def _warn_if_oversubscribed(threads: int | None) -> None:
    """Allowed, as in llama-bench, but threads that share a core wait for each other at every parallel loop."""
    from llamac.runtime.tvm_backend import usable_cores

    cores = usable_cores()
    if threads and threads > cores:
        click.echo(f"warning: --threads {threads} is more than the {cores} cores this process may use; threads that "
                   f"share a core slow every step down", err=True)


def _print_result(prompt_tokens: list[int], tokens: list[int], text: str, stop_reason: str, prefill_tok_s: float,
                  decode_tok_s: float, as_json: bool, streamed: bool) -> None:
    import json

    if as_json:
        click.echo(json.dumps({"prompt_tokens": prompt_tokens, "tokens": tokens, "text": text,
                               "stop_reason": stop_reason, "prefill_tok_s": round(prefill_tok_s, 2),
                               "decode_tok_s": round(decode_tok_s, 2)}))
        return
    click.echo(text if not streamed else "")
    sys.stdout.flush()  # the figures go to stderr: keep them after the text
    click.echo(f"[prefill {len(prompt_tokens)} tok at {prefill_tok_s:.1f} tok/s, decode {len(tokens)} tok at "
               f"{decode_tok_s:.1f} tok/s, stop: {stop_reason}]", err=True)


@cli.command()
@click.argument("art", type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (localhost by default).")
def serve(art: Path, port: int, host: str) -> None:
    """Serve a WebGPU artifact's page (prompt box, streamed output) over HTTP."""
    from llamac.web.serve import serve as serve_page

    serve_page(art, port=port, host=host)      # checks the artifact and the port, then says where it serves


@cli.command("bench")
@click.argument("art", type=click.Path(path_type=Path))
@click.option("-p", "--prompt-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Prompt length (pp).")
@click.option("-n", "--gen-tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Generated tokens (tg).")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_cmd(art: Path, prompt_tokens: int, gen_tokens: int, repetitions: int, threads: int | None,
              as_json: bool) -> None:
    """Measure prefill (pp) and decode (tg) speed like llama-bench.

    pp: one prompt of -p tokens from an empty cache; tg: -n tokens decoded one at a time from an empty cache, each
    fed the argmax of the last logits. Best and median of -r runs, after a warm-up."""
    import json

    from llamac.bench import bench

    _warn_if_oversubscribed(threads)
    r = bench(art, prompt_tokens, gen_tokens, repetitions, threads)
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(f"{r['artifact']}  threads {r['threads']}  load {r['load_avg_before']} -> {r['load_avg_after']}")
    click.echo(f"  pp{prompt_tokens}: best {r['prefill_tok_s']:8.1f} tok/s   median {r['prefill_tok_s_median']:8.1f}")
    click.echo(f"  tg{gen_tokens}: best {r['decode_tok_s']:8.1f} tok/s   median {r['decode_tok_s_median']:8.1f}")


@cli.command()
@click.argument("art", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="UTF-8 text to score.")
@click.option("--window", type=click.IntRange(min=2), default=None,
              help="Context window in tokens (default and most: the artifact's context).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Score only the first N tokens.")
@click.option("--json", "as_json", is_flag=True)
def perplexity(art: Path, text_file: Path, window: int | None, max_tokens: int | None, as_json: bool) -> None:
    """Per-token perplexity of a text file."""
    import json

    from llamac.perplexity import perplexity as ppl

    r = ppl(art, text_file, window, max_tokens)
    click.echo(json.dumps(r) if as_json else f"perplexity {r['perplexity']:.3f} over {r['tokens']} tokens "
                                             f"(window {r['window']})")


@cli.command()
@click.argument("art", type=click.Path(path_type=Path), required=False)
@click.option("--system", help="System prompt.")
@click.option("--template", type=click.Choice(["llama3", "llama2", "plain"]), default=None,
              help="Chat template (default: detected from the tokenizer).")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="Tokens per reply at most.")
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Keep the k most likely tokens (0 = all).")
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--min-p", default=0.0, show_default=True, help="Drop tokens below min_p x the top probability.")
@click.option("--repetition-penalty", default=1.0, show_default=True,
              help="Above 1 discourages the tokens among the last 64 (1 = off).")
@click.option("--seed", type=click.IntRange(min=0), default=None)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads (default: all cores).")
def chat(art: Path | None, system: str | None, template: str | None, max_tokens: int, temperature: float,
         top_k: int, top_p: float, min_p: float, repetition_penalty: float, seed: int | None,
         threads: int | None) -> None:
    """Chat interactively (the KV cache is kept across turns; /exit, /quit or Ctrl-D leaves)."""
    from llamac.chat import run_chat
    from llamac.runtime import load

    _warn_if_oversubscribed(threads)
    run_chat(load(art or _default_artifact(), threads=threads), system, template, max_tokens,
             temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
             seed=seed)


def _default_artifact() -> Path:
    from llamac import bundled

    return bundled.artifact()


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())     # click >= 8.2


_SIGNALLED: list[int] = []


def _on_signal(signum, _frame) -> None:
    """Ctrl-C and SIGTERM unwind like an error, so half-written output is removed on the way out. Raised inside a
    TVM callback, the exception comes back as a TVM error: main() still exits as interrupted, by the record here."""
    _SIGNALLED.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def main() -> None:
    """Entry point: run the CLI, turning errors into one line and the documented exit codes."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        cli.main(standalone_mode=False)
        if _SIGNALLED:      # raised where Python drops exceptions (a finalizer): the work finished, whole
            click.echo("interrupted", err=True)
            sys.exit(128 + _SIGNALLED[0])
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except _NO_ARGS_IS_HELP as e:       # `llamac` alone: the help text, as before
        click.echo(e.format_message(), err=True)
        sys.exit(2)
    except click.UsageError as e:       # one line, like every other error
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        click.echo(f"error: {e.format_message()}{where}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except InputError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a failure while running: one line, full trace only on request
        if _SIGNALLED:      # the signal's exception, wrapped on its way through TVM
            click.echo("interrupted", err=True)
            sys.exit(128 + _SIGNALLED[0])
        if os.environ.get("LLAMAC_DEBUG"):
            raise
        click.echo(f"error: {type(e).__name__}: {e}", err=True)
        sys.exit(1)
