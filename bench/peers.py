"""Prepare the peers of `bench/harness.py` once, into a cache, and measure one of them when run as a worker.

Cache: $LLAMAC_BENCH_CACHE or ~/.cache/llamac-bench. Everything a peer needs lives there, never in the repo:
  sdist/llama-cpp-python-0.3.36/      the extracted sdist (convert_hf_to_gguf.py, gguf-py)
  venv-llamacpp/                      llama-cpp-python built from that sdist for this CPU (GGML_NATIVE)
  venv-ortgenai/                      onnxruntime-genai 0.18 + onnx-ir + onnxscript (torch etc. from the project venv)
  venv-tools/                         matplotlib, for bench/chart.py
  hf-123m/                            the random-weight checkpoint (bench/models.py) plus a Llama 2 tokenizer.model
  gguf-123m/{f16,q8_0,q4_0}.gguf      llama.cpp models
  ortgenai-123m/{int4,fp32}/          ONNX Runtime GenAI models
  llamac-123m/{q4,q8,f16}/            llamac artifacts

Commands:
  python bench/peers.py prepare [--shape 123m]   build/convert whatever is missing (the llama.cpp build runs in the
                                                 background with nohup; rerun `prepare` once it has finished)
  python bench/peers.py status                   what is ready
  python bench/peers.py worker PEER FORMAT MODEL --threads 2 [-p 512] [-n 128]
                                                 load one model, then answer "run" lines on stdin with one JSON line
                                                 of timings each (the harness drives these workers round-robin)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROJECT_PY = REPO / ".venv" / "bin" / "python"
LLAMA_CPP = "llama-cpp-python==0.3.36"
ORT_GENAI = "onnxruntime-genai==0.18.*"
ORT_GENAI_EXTRA = ["onnx-ir", "onnxscript"]
TOOLS = ["matplotlib"]
BUILD_JOBS = "2"


def cache_dir() -> Path:
    root = Path(os.environ.get("LLAMAC_BENCH_CACHE") or Path.home() / ".cache" / "llamac-bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _make_venv(venv: Path, share_project: bool = False) -> Path:
    """A fresh venv; with share_project, the project venv's site-packages are visible after its own (a .pth line),
    so numpy/torch/transformers are not installed twice."""
    py = _venv_python(venv)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    if share_project:
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        proj = subprocess.run([str(PROJECT_PY), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        (Path(site) / "zz_llamac_project.pth").write_text(proj + "\n")
    return py


def _run_logged(cmd: list[str], name: str, env: dict | None = None) -> None:
    """Run a noisy tool with its output in cache/logs/NAME.log; on failure show the log's tail."""
    logs = cache_dir() / "logs"
    logs.mkdir(exist_ok=True)
    path = logs / f"{name}.log"
    with open(path, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        tail = path.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"{name} failed (exit {r.returncode}, log {path}):\n" + "\n".join(tail))


# ---------------------------------------------------------------- llama.cpp (llama-cpp-python from its sdist)

def sdist_dir() -> Path:
    """The extracted llama-cpp-python sdist (downloaded once)."""
    root = cache_dir() / "sdist"
    out = root / "llama-cpp-python-0.3.36"
    if (out / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        return out
    root.mkdir(exist_ok=True)
    tgz = root / "llama_cpp_python-0.3.36.tar.gz"
    if not tgz.is_file():
        log(f"downloading the {LLAMA_CPP} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", str(root), LLAMA_CPP], check=True)
        found = list(root.glob("*.tar.gz"))
        if len(found) != 1:
            raise RuntimeError(f"expected one sdist in {root}, found {found}")
        found[0].rename(tgz)
    with tarfile.open(tgz) as tar:
        top = tar.getnames()[0].split("/")[0]
        tar.extractall(root)
    if (root / top) != out:
        (root / top).rename(out)
    return out


def llamacpp_venv() -> Path:
    return cache_dir() / "venv-llamacpp"


def llamacpp_ready() -> bool:
    return (llamacpp_venv() / ".built").is_file()


def _build_running(pidfile: Path) -> bool:
    if not pidfile.is_file():
        return False
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
        return True
    except (ValueError, ProcessLookupError, PermissionError):
        return False


def start_llamacpp_build() -> str:
    """Build llama-cpp-python from the sdist in its own venv, in the background (nohup, nice, 2 jobs); never twice."""
    if llamacpp_ready():
        return "built"
    venv, pidfile = llamacpp_venv(), cache_dir() / "llamacpp-build.pid"
    logf = cache_dir() / "llamacpp-build.log"
    if _build_running(pidfile):
        return f"building (log {logf})"
    if logf.is_file():  # a build ran and did not finish: never start a second one behind the user's back
        return f"FAILED earlier (see {logf}; delete it to build again)"
    src = sdist_dir()
    py = _make_venv(venv)
    env = dict(os.environ, MAKEFLAGS=f"-j{BUILD_JOBS}", CMAKE_BUILD_PARALLEL_LEVEL=BUILD_JOBS,
               # native: the build host is the machine measured; no tests/examples/server, they only cost time
               CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                          "-DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release")
    script = (f"{py} -m pip install -v --no-cache-dir 'numpy' '{src}' && "
              f"touch {venv / '.built'} && echo BUILD-OK")
    with open(logf, "w") as out:
        p = subprocess.Popen(["nohup", "nice", "-n", "10", "bash", "-c", script], stdout=out, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
    pidfile.write_text(str(p.pid))
    return f"started (pid {p.pid}, log {logf})"


def _quantize_gguf(src: Path, dst: Path, ftype_name: str) -> None:
    """Q4_0 / Q8_0 from the F16 gguf with llama.cpp's own quantizer (run in the llama.cpp venv)."""
    code = ("import sys, llama_cpp as L\n"
            "p = L.llama_model_quantize_default_params()\n"
            "p.ftype = getattr(L, 'LLAMA_FTYPE_MOSTLY_' + sys.argv[3]); p.nthread = 2\n"
            "rc = L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)\n"
            "sys.exit(rc)\n")
    tmp = dst.with_suffix(".tmp")
    subprocess.run([str(_venv_python(llamacpp_venv())), "-c", code, str(src), str(tmp), ftype_name], check=True,
                   capture_output=True)
    tmp.rename(dst)


def prepare_gguf(hf: Path, shape: str) -> dict[str, Path]:
    """F16 via convert_hf_to_gguf.py (project venv + the sdist's gguf-py), then Q8_0/Q4_0 once llama.cpp is built."""
    out = cache_dir() / f"gguf-{shape}"
    out.mkdir(exist_ok=True)
    f16 = out / "f16.gguf"
    if not f16.is_file():
        conv = sdist_dir() / "vendor" / "llama.cpp"
        log(f"converting {hf} to GGUF F16")
        env = dict(os.environ, PYTHONPATH=str(conv / "gguf-py"), HF_HUB_OFFLINE="1")
        tmp = out / "f16.tmp.gguf"
        _run_logged([str(PROJECT_PY), str(conv / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16",
                     "--outfile", str(tmp)], "convert-gguf", env=env)
        tmp.rename(f16)
    models = {"F16": f16}
    if llamacpp_ready():
        for ft in ("Q8_0", "Q4_0"):
            q = out / f"{ft.lower()}.gguf"
            if not q.is_file():
                log(f"quantizing to {ft}")
                _quantize_gguf(f16, q, ft)
            models[ft] = q
    return models


# ---------------------------------------------------------------- ONNX Runtime GenAI

def ortgenai_venv() -> Path:
    return cache_dir() / "venv-ortgenai"


def prepare_ortgenai(hf: Path, shape: str) -> dict[str, Path]:
    """int4 (MatMulNBits, block 32) and fp32 models from the builder; 2 intra-op threads set in genai_config.json."""
    venv = ortgenai_venv()
    py = _venv_python(venv)
    if not (venv / ".installed").is_file():
        log(f"installing {ORT_GENAI} {' '.join(ORT_GENAI_EXTRA)}")
        _make_venv(venv)
        # installed before the project's site-packages become visible, so pip resolves their deps in this venv
        subprocess.run([str(py), "-m", "pip", "install", "-q", ORT_GENAI, *ORT_GENAI_EXTRA], check=True)
        _make_venv(venv, share_project=True)  # the builder imports torch/transformers: take the project's
        (venv / ".installed").touch()
    models = {}
    for prec in ("int4", "fp32"):
        out = cache_dir() / f"ortgenai-{shape}" / prec
        if not (out / "genai_config.json").is_file():
            log(f"building the ORT GenAI {prec} model")
            tmp = out.with_name(prec + ".tmp")
            extra = ["--extra_options", "block_size=32"] if prec == "int4" else []
            _run_logged([str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
                         "-p", prec, "-e", "cpu", "-c", str(cache_dir() / "ortgenai-hf-cache"), *extra],
                        f"ortgenai-build-{prec}", env=dict(os.environ, HF_HUB_OFFLINE="1"))
            tmp.rename(out)
        models[prec] = out
    return models


def set_ortgenai_threads(model_dir: Path, threads: int) -> None:
    cfg_path = model_dir / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    if so.get("intra_op_num_threads") != threads:
        so["intra_op_num_threads"] = threads
        cfg_path.write_text(json.dumps(cfg, indent=4))


# ---------------------------------------------------------------- llamac

LLAMAC_QUANTS = ("q4", "q8", "f16")


def _stale(built: Path) -> bool:
    """True when llamac's compiler, runtime or targets changed after `built` was written (then recompile)."""
    t = built.stat().st_mtime
    for sub in ("llamac", "runtime", "export", "targets"):
        for f in (REPO / sub).rglob("*"):
            if f.suffix in (".py", ".toml") and f.stat().st_mtime > t and "web" not in f.relative_to(REPO).parts:
                return True
    return False


def native_target() -> str:
    """llamac's best built-in target for this CPU (what `--llamac-target native` means): llama.cpp is built native."""
    from llamac.targets import host_target

    return host_target()


def llamac_dir(shape: str, target: str) -> Path:
    return cache_dir() / f"llamac-{shape}-{target}"


def prepare_llamac(hf: Path, shape: str, target: str = "x86_64", retry: bool = False) -> dict[str, Path | str]:
    """`llamac compile` at each scheme; a failure is kept as a one-line error (retried with retry=True)."""
    models: dict[str, Path | str] = {}
    llamac = REPO / ".venv" / "bin" / "llamac"
    for q in LLAMAC_QUANTS:
        art = llamac_dir(shape, target) / q
        err = art.with_name(q + ".error")
        if (art / "manifest.json").is_file() and not _stale(art / "manifest.json"):
            models[q] = art
            continue
        if err.is_file() and not retry and not _stale(err):
            models[q] = err.read_text().strip()
            continue
        log(f"llamac compile --quant {q}")
        art.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([str(llamac), "compile", str(hf), "--target", target, "--quant", q, "-o", str(art),
                            "--force"], capture_output=True, text=True, timeout=1800)
        if r.returncode == 0 and (art / "manifest.json").is_file():
            err.unlink(missing_ok=True)
            models[q] = art
        else:
            lines = [ln for ln in (r.stderr + r.stdout).strip().splitlines() if ln.strip()]
            msg = f"llamac compile failed (exit {r.returncode}): {lines[-1] if lines else '?'}"
            err.write_text(msg + "\n")
            models[q] = msg
    return models


# ---------------------------------------------------------------- tools venv, checkpoint, status

def tools_python() -> Path:
    venv = cache_dir() / "venv-tools"
    py = _venv_python(venv)
    if not (venv / ".installed").is_file():
        _make_venv(venv)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *TOOLS], check=True)
        (venv / ".installed").touch()
    return py


def checkpoint(shape: str = "123m") -> Path:
    """bench/models.py's random checkpoint plus Llama 2's 32000-piece tokenizer (the converters need one)."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO / "tests"))
    from models import make_checkpoint
    import vocab_cache

    hf = make_checkpoint(cache_dir() / f"hf-{shape}", shape)
    if not (hf / "tokenizer_config.json").is_file():
        if shape != "123m":
            raise SystemExit("only the 123m shape has a matching tokenizer (vocab 32000)")
        (hf / "tokenizer.model").write_bytes(vocab_cache.llama2_spm_model().read_bytes())
        (hf / "tokenizer.json").write_bytes(vocab_cache.llama2_tokenizer_json().read_bytes())
        (hf / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return hf


def models(shape: str = "123m", target: str = "x86_64") -> dict[tuple[str, str], Path | str]:
    """(peer, format) -> model path, or a one-line reason it is missing. Never builds anything."""
    c = cache_dir()
    target = native_target() if target == "native" else target
    out: dict[tuple[str, str], Path | str] = {}
    for ft in ("Q4_0", "Q8_0", "F16"):
        p = c / f"gguf-{shape}" / f"{ft.lower()}.gguf"
        out[("llama.cpp", ft)] = p if p.is_file() and llamacpp_ready() else "not prepared (run peers.py prepare)"
    for prec in ("int4", "fp32"):
        p = c / f"ortgenai-{shape}" / prec
        out[("ORT GenAI", prec)] = p if (p / "genai_config.json").is_file() else "not prepared"
    hf = c / f"hf-{shape}"
    out[("PyTorch eager", "fp32")] = hf if (hf / "config.json").is_file() else "not prepared"
    for q in LLAMAC_QUANTS:
        art, err = llamac_dir(shape, target) / q, llamac_dir(shape, target) / f"{q}.error"
        out[("llamac", q)] = art if (art / "manifest.json").is_file() else (
            err.read_text().strip() if err.is_file() else "not prepared")
    return out


def prepare(shape: str = "123m", target: str = "x86_64", retry_llamac: bool = False) -> dict[tuple[str, str], Path | str]:
    """Everything that is missing; the llama.cpp build only starts here (background), so call again once built."""
    target = native_target() if target == "native" else target
    hf = checkpoint(shape)
    log(f"llama.cpp build: {start_llamacpp_build()}")
    prepare_gguf(hf, shape)
    prepare_ortgenai(hf, shape)
    prepare_llamac(hf, shape, target, retry=retry_llamac)
    tools_python()
    return models(shape, target)


# ---------------------------------------------------------------- workers: one process per (peer, format)

def worker_python(peer: str) -> Path:
    if peer == "llama.cpp":
        return _venv_python(llamacpp_venv())
    if peer == "ORT GenAI":
        return _venv_python(ortgenai_venv())
    return PROJECT_PY


class _LlamaCpp:
    def __init__(self, path: str, threads: int, ctx: int):
        import llama_cpp
        import numpy as np

        self.np, self.L = np, llama_cpp
        self.version = llama_cpp.__version__
        # flash attention on: llama.cpp's own default ("auto" resolves to on for the CPU backend) and llama-bench's;
        # the Python binding alone defaults to off
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=True, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _logits(self):
        ptr = self.L.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def reset(self) -> None:
        self.llm.reset()

    def prefill(self, ids):
        self.llm.eval(ids)
        return self._logits()

    def decode(self, tok: int):
        self.llm.eval([tok])
        return self._logits()


class _OrtGenAI:
    def __init__(self, path: str, threads: int, ctx: int):
        import numpy as np
        import onnxruntime_genai as og

        self.og, self.np, self.ctx = og, np, ctx
        self.version = og.__version__
        set_ortgenai_threads(Path(path), threads)
        self.model = og.Model(path)
        self.gen = None

    def reset(self) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.ctx, do_sample=False)
        self.gen = None  # free the old KV cache before making the new one
        self.gen = self.og.Generator(self.model, params)
        self._pending = False

    def prefill(self, ids):
        self.gen.append_tokens(self.np.asarray(ids, dtype=self.np.int32))
        return self.gen.get_logits()[0, -1]

    def decode(self, tok: int):
        # generate_next_token would sample from the logits already computed; appending the token runs one step
        self.gen.append_tokens(self.np.asarray([tok], dtype=self.np.int32))
        return self.gen.get_logits()[0, -1]


class _Torch:
    def __init__(self, path: str, threads: int, ctx: int):
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(threads)
        self.torch, self.version = torch, torch.__version__
        self.model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.past = None

    def reset(self) -> None:
        self.past = None

    def _step(self, ids):
        with self.torch.inference_mode():
            # logits_to_keep=1: only the last position's logits, as generate() does
            out = self.model(input_ids=self.torch.tensor([ids]), past_key_values=self.past, use_cache=True,
                             logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[0, -1].numpy()

    def prefill(self, ids):
        return self._step(list(ids))

    def decode(self, tok: int):
        return self._step([tok])


class _Llamac:
    def __init__(self, path: str, threads: int, ctx: int):
        import llamac
        from llamac.runtime import load

        self.version = getattr(llamac, "__version__", "?")
        self.model = load(path, threads=threads)
        self.sess = self.model.session()

    def reset(self) -> None:
        self.sess.reset()

    def prefill(self, ids):
        return self.sess.prefill(ids)

    def decode(self, tok: int):
        return self.sess.decode(tok)


RUNNERS = {"llama.cpp": _LlamaCpp, "ORT GenAI": _OrtGenAI, "PyTorch eager": _Torch, "llamac": _Llamac}


def prompt_ids(n: int, vocab: int = 32000) -> list[int]:
    """The same pseudo-random prompt for every peer (ids 3.. to skip <unk>, <s>, </s>)."""
    x, out = 12345, []
    for _ in range(n):  # a small LCG: no numpy needed before the runner is imported
        x = (1103515245 * x + 12345) % 2**31
        out.append(3 + x % (vocab - 3))
    return out


def worker(peer: str, fmt: str, model: str, threads: int, p: int, n: int) -> None:
    """Load once, warm up with one full pp+tg, then answer each 'run' line on stdin with one JSON line.

    pp = p prompt tokens in one prefill from an empty cache; tg = n single-token decodes from an empty cache,
    each fed the argmax of the previous logits (llama-bench's tg starts from an empty context too)."""
    t0 = time.perf_counter()
    r = RUNNERS[peer](model, threads, ctx=p + n + 16)  # llama-bench sizes the context p + n
    ids = prompt_ids(p)
    import numpy as np

    def one() -> dict:
        r.reset()
        a = time.perf_counter()
        r.prefill(ids)
        b = time.perf_counter()
        r.reset()
        tok = ids[0]
        c = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(r.decode(tok)))
        d = time.perf_counter()
        return {"pp": p / (b - a), "tg": n / (d - c), "pp_s": b - a, "tg_s": d - c}

    load_s = time.perf_counter() - t0
    warm = one()
    print(json.dumps({"ready": True, "load_s": load_s, "version": r.version, "warmup": warm}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "run":
            print(json.dumps(one()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare")
    pr.add_argument("--shape", default="123m")
    pr.add_argument("--llamac-target", default="native")
    pr.add_argument("--retry-llamac", action="store_true", help="recompile llamac artifacts that failed before")
    st = sub.add_parser("status")
    st.add_argument("--shape", default="123m")
    st.add_argument("--llamac-target", default="native")
    wk = sub.add_parser("worker")
    wk.add_argument("peer")
    wk.add_argument("fmt")
    wk.add_argument("model")
    wk.add_argument("--threads", type=int, default=2)
    wk.add_argument("-p", type=int, default=512)
    wk.add_argument("-n", type=int, default=128)
    a = ap.parse_args()
    if a.cmd == "worker":
        worker(a.peer, a.fmt, a.model, a.threads, a.p, a.n)
        return
    res = (prepare(a.shape, a.llamac_target, a.retry_llamac) if a.cmd == "prepare"
           else models(a.shape, a.llamac_target))
    if a.cmd == "status":
        log(f"llama.cpp build: {'built' if llamacpp_ready() else 'not built'}")
    for (peer, fmt), m in res.items():
        print(f"{peer:14s} {fmt:5s} {m}")


if __name__ == "__main__":
    main()
