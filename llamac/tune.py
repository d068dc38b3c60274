"""`llamac tune`: pick a target's schedule parameters by measuring them on this machine, and keep the choice.

The kernels are scheduled by hand (TVM's meta_schedule crashes in the pinned wheel), with a few parameters a
target file sets and the best value of which depends on the CPU's caches and memory: how many 8-channel tiles the
int8 dot-product kernels store side by side (`dot_tiles`, one read stream per decode task) and how many
`lanes`-wide panels the f32/f16 kernels do (`float_panels`). Tuning compiles the model once per candidate value,
checks that every candidate gives the same logits, measures the artifacts like `llamac bench`, in rounds over the
candidates (decode first, prefill to break ties), and writes the winner to a tuning file per target:
{"target": name, "schemes": {quant: {"params": {...}, "measured": [...], ...}}}. `llamac compile` applies a
target's tuned parameters when it finds a file for it: first in the user's tuning directory ($LLAMAC_TUNING_DIR,
default ~/.cache/llamac/tuning), then the ones shipped with llamac (`targets/tuned/`, measured on the machines
named in them).

Tuning runs the artifacts, so it runs on a machine of the target (the device itself for an ARM board); the tuning
file can then be copied to wherever `llamac compile` cross-compiles.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from llamac.errors import InputError
from llamac.targets import HERE as TARGETS_DIR, Target, load_target

SHIPPED_DIR = TARGETS_DIR / "tuned"
# What can be tuned: parameter -> candidate values, by the kind of kernel a scheme compiles to (data, not code)
SPACE = {
    "dot": {"dot_tiles": (4, 8, 16)},              # q4/q8 on a target with int8 dot products
    "float": {"float_panels": (1, 2, 4)},          # f32/f16
}


def user_dir() -> Path:
    return Path(os.environ.get("LLAMAC_TUNING_DIR") or Path.home() / ".cache" / "llamac" / "tuning")


def kernel_kind(tgt: Target, quant: str) -> str | None:
    """Which SPACE entry applies to `quant` on `tgt` (None: nothing to tune, e.g. q4 without dot products)."""
    from llamac.quantize import get_scheme

    scheme = get_scheme(quant)
    if scheme.kind == "int":
        return "dot" if tgt.dot else None
    return "float"


def tuned_params(tgt: Target, quant: str) -> tuple[dict, Path | None]:
    """The tuned parameters for (target, quant) and the file they come from: the user's file, else the shipped one,
    else ({}, None). A file naming another target, or unreadable, is an error (it would be silently ignored)."""
    for d in (user_dir(), SHIPPED_DIR):
        f = d / f"{tgt.name}.json"
        if not f.is_file():
            continue
        entry = _read(f, tgt.name)["schemes"].get(quant)
        if entry is not None:
            return dict(entry["params"]), f
    return {}, None


def apply(tgt: Target, params: dict) -> Target:
    """tgt with the tuned parameters in place of its file's (validated like the target file's own values)."""
    allowed = {k: v for space in SPACE.values() for k, v in space.items()}
    for k, v in params.items():
        if k not in allowed or v not in allowed[k]:
            raise InputError(f"tuning for {tgt.name}: {k} = {v!r} is not a tunable value "
                             f"({', '.join(f'{a}: {list(b)}' for a, b in allowed.items())})")
    return dataclasses.replace(tgt, **params)


def tune(src: str | Path, target: str | Path, quant: str, out: Path | None = None, prompt_tokens: int = 128,
         gen_tokens: int = 64, repetitions: int = 3, threads: int | None = None,
         space: dict[str, tuple] | None = None, log: Callable[[str], None] = print) -> tuple[dict, Path]:
    """Measure every candidate of the parameters that apply to (target, quant) on this machine; write the best to
    `out` (default: the user's tuning file for the target) and return (the entry written, out)."""
    from llamac import artifact
    from llamac.bench import one_run, warm_up
    from llamac.compiler import compile_model
    from llamac.runtime import load
    from llamac.runtime.tvm_backend import _mem_available

    tgt = load_target(target)
    _check_runs_here(tgt)
    kind = kernel_kind(tgt, quant)
    if kind is None:
        raise InputError(f"nothing to tune for {quant} on {tgt.name}: its kernels take no tunable parameter "
                         f"(tunable: {', '.join(p for s in SPACE.values() for p in s)})")
    space = space or SPACE[kind]
    if not space or any(k not in SPACE[kind] for k in space):
        raise InputError(f"{quant} on {tgt.name} tunes {', '.join(SPACE[kind])}, not {', '.join(space) or 'nothing'}")
    (name, values), = space.items()       # one parameter per kind today; a grid would go here
    out = Path(out) if out else user_dir() / f"{tgt.name}.json"
    runs: list[list[tuple[float, float]]] = [[] for _ in values]
    with tempfile.TemporaryDirectory(prefix="llamac-tune-") as work:
        arts = []
        for i, value in enumerate(values):
            log(f"tune: compiling {name} = {value} ({i + 1}/{len(values)})")
            arts.append(compile_model(src, target, quant=quant, out=Path(work) / f"c{i}", progress=False,
                                      tuning={name: value}))
        reference = None

        def opened(i: int):
            nonlocal reference
            model = load(arts[i], threads=threads)
            if max(prompt_tokens, gen_tokens) > model.max_seq_len:
                raise InputError(f"-p/-n must fit the model's context of {model.max_seq_len} tokens")
            sess = model.session()
            # every candidate must compute the same thing: only the layout of the weights and the tasks differ
            logits = sess.prefill([1, 2, 3, 4, 5, 6, 7, 8])
            if reference is None:
                reference = logits
            elif not np.allclose(logits, reference, rtol=1e-4, atol=1e-4 * float(np.abs(reference).max())):
                raise RuntimeError(f"{name} = {values[i]} changes the logits (max diff "
                                   f"{float(np.abs(logits - reference).max()):.3g}): a kernel bug, please report")
            return model, sess

        if sum((a / artifact.WEIGHTS_FILE).stat().st_size for a in arts) < _mem_available() // 2:
            # all loaded, measured in rounds over the candidates: a slow minute of the machine hits them all alike
            loaded = [opened(i) for i in range(len(arts))]
            cfg = loaded[0][0].config
            ids = _prompt(cfg, prompt_tokens)
            for _, sess in loaded:
                warm_up(sess, ids)
            for rep in range(repetitions):
                for i in [*range(rep % len(values), len(values)), *range(rep % len(values))]:
                    runs[i].append(one_run(loaded[i][1], ids, gen_tokens))
        else:
            log("tune: the candidates do not fit in memory together: measured one after another")
            for i in range(len(arts)):
                model, sess = opened(i)
                cfg = model.config
                ids = _prompt(cfg, prompt_tokens)
                warm_up(sess, ids)
                runs[i] = [one_run(sess, ids, gen_tokens) for _ in range(repetitions)]
                del model, sess         # before the next one loads
    measured = [{"params": {name: v}, "decode_tok_s": round(max(r[1] for r in rs), 2),
                 "prefill_tok_s": round(max(r[0] for r in rs), 2)} for v, rs in zip(values, runs)]
    for m in measured:
        log(f"tune: {name} = {m['params'][name]}: pp{prompt_tokens} {m['prefill_tok_s']:.1f} tok/s, "
            f"tg{gen_tokens} {m['decode_tok_s']:.1f} tok/s (best of {repetitions})")
    best = max(measured, key=lambda m: (m["decode_tok_s"], m["prefill_tok_s"]))
    shape = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                          "num_kv_heads", "vocab_size")}
    entry = {"params": best["params"], "measured": measured, "model": {"name": Path(src).name, **shape},
             "threads": threads or os.cpu_count(),
             "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repetitions": repetitions,
             "load_avg": round(os.getloadavg()[0], 2), "cpu": _cpu_name(),
             "when": datetime.datetime.now().isoformat(timespec="seconds")}
    _write(out, tgt.name, quant, entry)
    return entry, out


def _prompt(cfg, n: int) -> list[int]:
    return np.random.default_rng(0).integers(3, cfg.vocab_size, size=n).tolist()


def _check_runs_here(tgt: Target) -> None:
    from llamac.runtime.tvm_backend import missing_cpu_features

    if tgt.kind != "llvm":
        raise InputError(f"llamac tune measures CPU kernels; {tgt.name} is a {tgt.kind} target")
    here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    if tgt.arch != here:
        raise InputError(f"llamac tune measures on this machine ({here}); {tgt.name} is for {tgt.arch}: run it on "
                         f"an {tgt.arch} machine and copy the tuning file to where you compile")
    missing = missing_cpu_features(tgt.mattr, tgt.arch)
    if missing:
        raise InputError(f"this CPU lacks {', '.join(missing)}, which {tgt.name} needs: tune it on a machine that "
                         f"has them")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(f: Path, target: str) -> dict:
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{f}: unreadable tuning file ({e})") from None
    if not isinstance(data, dict) or data.get("target") != target or not isinstance(data.get("schemes"), dict) \
            or not all(isinstance(e, dict) and isinstance(e.get("params"), dict) for e in data["schemes"].values()):
        raise InputError(f"{f}: not a tuning file for target {target} (written by `llamac tune`)")
    return data


def _write(out: Path, target: str, quant: str, entry: dict) -> None:
    """Add or replace the scheme's entry; the file is replaced whole (a crash leaves the old one)."""
    data = _read(out, target) if out.is_file() else {"target": target, "schemes": {}}
    data["schemes"][quant] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out)
