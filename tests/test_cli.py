"""The CLI offers every command of the contract, and bench/perplexity/chat run end to end on an export dir."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llamac import bundled
from llamac.export.exporter import export

CONTRACT = ["export", "compile", "run", "chat", "bench", "inspect", "targets", "serve", "perplexity"]


def cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamac", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=600)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export(bundled.checkpoint(), tmp_path_factory.mktemp("cli") / "onnx", progress=False)


def test_every_contract_command_exists():
    out = cli("--help").stdout
    for name in CONTRACT:
        assert cli(name, "--help").returncode == 0, name
        assert name in out


def test_bench_json(export_dir):
    r = cli("bench", export_dir, "-p", 16, "-n", 4, "-r", 2, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0 and res["repetitions"] == 2


def test_bench_pp_and_tg_each_start_from_an_empty_cache(export_dir):
    # llama-bench's method: tg does not follow the prompt, so -p and -n may each take the whole context
    ctx = json.loads((export_dir / "config.json").read_text())["max_position_embeddings"]
    r = cli("bench", export_dir, "-p", ctx, "-n", ctx, "-r", 1, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["prompt_tokens"] == ctx and res["gen_tokens"] == ctx and res["decode_tok_s"] > 0
    for flag in ("-p", "-n"):
        args = {"-p": 4, "-n": 2, flag: ctx + 1}
        r = cli("bench", export_dir, "-p", args["-p"], "-n", args["-n"], "-r", 1)
        assert r.returncode == 2 and r.stderr.strip() == f"error: {flag} {ctx + 1} exceeds the artifact's context " \
            f"of {ctx} tokens", r.stderr


def test_a_prompt_that_is_not_utf8_is_one_line_and_exit_2(export_dir):
    # the shell hands Python the raw bytes; Python keeps the invalid one as a lone surrogate
    r = subprocess.run([sys.executable.encode(), b"-m", b"llamac", b"run", str(export_dir).encode(), b"-p", b"abc\xff",
                        b"-n", b"2"], capture_output=True, timeout=600)
    err = r.stderr.decode()
    assert r.returncode == 2 and "not valid UTF-8" in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err


def test_ids_are_separated_by_commas_or_spaces():
    from llamac.cli import _parse_ids
    from llamac.errors import InputError

    for text in ("1,2,30", "1, 2, 30", "1 2 30", " 1  2,30 "):
        assert _parse_ids(text) == [1, 2, 30], text
    for text in ("1,,2", "", "1,x", "-1", "1.5", "\uff11", "1,"):     # "1 2" once became 12
        with pytest.raises(InputError, match="--ids"):
            _parse_ids(text)


def test_more_threads_than_cores_runs_with_a_warning(export_dir):
    from llamac.runtime.tvm_backend import usable_cores

    r = cli("bench", export_dir, "-p", 4, "-n", 2, "-r", 1, "--threads", usable_cores() + 1, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["decode_tok_s"] > 0, r.stderr
    assert f"warning: --threads {usable_cores() + 1} is more than the {usable_cores()} cores" in r.stderr
    r = cli("bench", export_dir, "-p", 4, "-n", 2, "-r", 1, "--threads", 1, "--json")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_perplexity_json(export_dir):
    r = cli("perplexity", export_dir, "--text", bundled.checkpoint() / "held_out.txt", "--max-tokens", 200, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["tokens"] == 200 and 1 < res["perplexity"] < 500


def test_chat_reads_turns_until_exit(export_dir):
    r = cli("chat", export_dir, "-n", 8, "--temperature", 0, stdin="And God said\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) > 3


def test_chat_refuses_a_template_the_tokenizer_lacks_before_the_first_message(export_dir):
    r = cli("chat", export_dir, "--template", "llama3", "-n", 4, stdin="And God said\n")
    assert r.returncode == 2 and "<|start_header_id|>" in r.stderr and not r.stdout.strip(), (r.stdout, r.stderr)
    assert "/exit" not in r.stderr


@pytest.mark.parametrize("option", [["--temperature", "-1"], ["--top-p", "0"], ["--temperature", "nan"]])
def test_chat_refuses_bad_sampling_options_before_the_banner(export_dir, option):
    # they were checked at the first message: with no input, chat even ended with exit 0
    for stdin in ("", "hi\n"):
        r = cli("chat", export_dir, *option, stdin=stdin)
        assert r.returncode == 2 and "/exit" not in r.stderr and not r.stdout.strip(), (r.stdout, r.stderr)


@pytest.mark.parametrize("args", [
    ["bench", "{art}", "-p", "4", "-n", "2", "-r", "0"], ["bench", "{art}", "-p", "4", "-n", "2", "--threads", "-2"],
    ["run", "{art}", "-p", "hi", "--seed", "-1"],
    ["run", "{art}", "-p", "hi", "-n", "-3"], ["compile", "{art}"], ["perplexity", "{art}", "--text", "{latin1}"],
    ["compile", "{array_config}", "-o", "{tmp}/out"], ["no-such-command"],
    ["run", "{art}", "--ids", "1,99999999999999999999"], ["serve", "{art}", "--port", "99999"],
    ["perplexity", "{art}", "--text", "{utf8}", "--window", "99999999"],
])
def test_bad_usage_is_one_line_and_exit_2(args, export_dir, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "utf8.txt").write_text("And God said\n")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("[1, 2]")
    paths = {"art": export_dir, "latin1": tmp_path / "latin1.txt", "utf8": tmp_path / "utf8.txt",
             "array_config": tmp_path / "cfg", "tmp": tmp_path}
    r = cli(*[a.format(**paths) for a in args])
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "Error" not in lines[0].split(":")[1] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_signal_whose_exception_python_dropped_still_ends_as_interrupted(monkeypatch, capsys):
    """A signal handled inside a finalizer raises nowhere: the command ends normally, and main() still exits as
    interrupted (128 + the signal), as the shell and a CI runner expect."""
    import signal

    from llamac import cli as cli_module

    monkeypatch.setattr(cli_module, "_SIGNALLED", [])
    monkeypatch.setattr(cli_module.cli, "main", lambda **kw: cli_module._SIGNALLED.append(signal.SIGTERM))
    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as e:
            cli_module.main()
    finally:        # main() installs its handlers in this (the test) process
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGINT, saved[1])
    assert e.value.code == 128 + signal.SIGTERM and "interrupted" in capsys.readouterr().err


def test_signal_handler_turns_ctrl_c_and_sigterm_into_unwinding_exceptions(monkeypatch):
    import signal

    from llamac import cli as cli_module

    monkeypatch.setattr(cli_module, "_SIGNALLED", [])
    with pytest.raises(KeyboardInterrupt):
        cli_module._on_signal(signal.SIGINT, None)
    with pytest.raises(SystemExit) as e:
        cli_module._on_signal(signal.SIGTERM, None)
    assert e.value.code == 128 + signal.SIGTERM and cli_module._SIGNALLED == [signal.SIGINT, signal.SIGTERM]
