"""Benchmark llamac against its peers on one model, interleaved, and write docs/PEERS.md and docs/peers.png.

    python bench/harness.py            # prepare what is missing (bench/peers.py), then measure and write the docs

Method (llama-bench's, brief section 6): batch 1, --threads (2) threads for every peer, pp512 = one prefill of 512
tokens from an empty cache, tg128 = 128 single-token decodes from an empty cache (each fed the argmax of the last
logits). Every (peer, format) runs in its own long-lived worker process (bench/peers.py worker), loaded and warmed
up once; then the harness goes round-robin over the workers for --rounds rounds (the starting worker rotates), so a
burst of load from other processes hits every peer alike. Best and median over the rounds are reported.

Before each run the harness waits (--gate-wait s at most) until the machine is quiet: fewer than --gate cores busy
over one second, and (--mem-wait s at most) until the memory is fast: a bandwidth probe reads at least --mem-gate
of the best probe so far (this host's memory flips between about 36 and 67 GB/s for seconds to minutes at a time,
whoever runs; every peer waits alike). A probe after each run tells whether the memory stayed fast through it.
For each run the harness records the 1-minute load average before and after, and the CPU time other processes used
during the run (from /proc: all busy jiffies minus the measured worker's own), in cores. Memory bandwidth is measured
in the same session (a C streaming-read kernel, gcc -O3 -march=native -fopenmp, --threads threads, at the start of
each round and right before and after each run; the best probe of a round is its figure); the decode roofline of a
model is bandwidth / bytes of weights read per token (the KV cache, under 1 MB per token at these context lengths,
is left out).

Raw results: $LLAMAC_BENCH_CACHE/results/<time>.json. Options: --rounds, --threads, --shape, --llamac-target,
--only PEER[,PEER], --wait-quiet LOAD (wait up to --max-wait s for the 1-minute load average to drop below LOAD).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402

REPO = HERE.parent
ORDER = [("llama.cpp", "Q4_0"), ("llama.cpp", "Q8_0"), ("llama.cpp", "F16"), ("ORT GenAI", "int4"),
         ("ORT GenAI", "fp32"), ("PyTorch eager", "fp32"), ("llamac", "q4"), ("llamac", "q8"), ("llamac", "f16")]

BW_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
#include <sys/mman.h>
/* Streaming read of a 1 GiB float array by all OpenMP threads; prints the best pass in GB/s. Each thread reads its
   share as S streams in lockstep, S = 1, 2, 4, 8, and the best of all is the figure: one stream per core does not
   keep enough reads in flight on every CPU (llamac's decode kernels read several), and a roofline must be what the
   memory can deliver. GCC vector types (32 bytes: AVX on x86, two NEON registers on ARM) and four accumulators,
   so the loop is bound by memory, not by add latency. The array asks for transparent huge pages, as llamac's
   runtime does for its weights. `bw PASSES serve` allocates once and probes once per line read from stdin: freeing
   1 GiB before every run would not be free here, the guest reports freed pages to its host, which then steals
   0.3-0.6 of the 2 vCPUs for about a second, 2 s later, in the middle of the next run. */
typedef float v8 __attribute__((vector_size(32)));
#define PASS(S) {                                                                                    \
    int t = omp_get_thread_num(), nt = omp_get_num_threads();                                        \
    size_t len = nv / nt / (S) / 4 * 4;                                                              \
    v8 *b = a + (size_t)t * (nv / nt);                                                               \
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                                       \
    for (size_t i = 0; i < len; i += 4)                                                              \
        for (int k = 0; k < (S); k++) {                                                              \
            v8 *c = b + k * len + i; s0 += c[0]; s1 += c[1]; s2 += c[2]; s3 += c[3];                 \
        }                                                                                            \
    v8 s = s0 + s1 + s2 + s3;                                                                        \
    for (int k = 0; k < 8; k++) total += s[k];                                                       \
    bytes += len * (S) * sizeof(v8);                                                                 \
}
int main(int argc, char **argv) {
    size_t n = (size_t)1 << 28; int passes = argc > 1 ? atoi(argv[1]) : 8;
    v8 *a = aligned_alloc(1 << 21, n * sizeof(float));
#ifdef MADV_HUGEPAGE
    madvise(a, n * sizeof(float), MADV_HUGEPAGE);
#endif
    size_t nv = n / 8;
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < nv; i++) a[i] = (v8){1, 2, 3, 4, 5, 6, 7, 8};
    char line[64];
    do {
    double best = 0, sink = 0;
    for (int p = 0; p < passes + 1; p++) {
        for (int streams = 1; streams <= 8; streams *= 2) {
            double t = omp_get_wtime(), total = 0, bytes = 0;
            #pragma omp parallel reduction(+:total, bytes)
            switch (streams) { case 1: PASS(1) break; case 2: PASS(2) break; case 4: PASS(4) break; default: PASS(8) }
            t = omp_get_wtime() - t; sink += total;
            if (p > 0 && bytes / t / 1e9 > best) best = bytes / t / 1e9;
        }
    }
    printf("%.2f %g\n", best, sink);
    fflush(stdout);
    } while (argc > 2 && fgets(line, sizeof line, stdin));
    return 0;
}
"""


# ---------------------------------------------------------------- machine, load, CPU accounting

def machine() -> dict:
    info = {"python": platform.python_version(), "kernel": platform.release(), "cores": os.cpu_count()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "Flags"):
                info["cpu" if k.strip() == "Model name" else "flags"] = v.strip()
    except OSError:
        pass
    flags = set(info.pop("flags", "").split())
    info["isa"] = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni") if f in flags)
    with open("/proc/meminfo") as f:
        info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    return info


def versions() -> dict:
    def ask(py: Path, code: str) -> str:
        try:
            r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120)
            return r.stdout.strip() or f"? ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'no output'})"
        except (OSError, subprocess.SubprocessError) as e:
            return f"? ({e})"

    proj = peers.PROJECT_PY
    v = {"llama-cpp-python": ask(peers._venv_python(peers.llamacpp_venv()),
                                 "import llama_cpp; print(llama_cpp.__version__)"),
         "onnxruntime-genai": ask(peers._venv_python(peers.ortgenai_venv()),
                                  "import onnxruntime_genai as g, onnxruntime as o; "
                                  "print(g.__version__, '(onnxruntime', o.__version__ + ')')"),
         "torch": ask(proj, "import torch; print(torch.__version__)"),
         "transformers": ask(proj, "import transformers; print(transformers.__version__)"),
         "llamac": ask(proj, "import llamac, tvm; print(getattr(llamac, '__version__', '?'), '(tvm', tvm.__version__ + ')')"),
         "gcc": subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()}
    try:
        v["llamac git"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True).stdout.strip() + (" + uncommitted changes" if subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout.strip() else "")
    except OSError:
        pass
    return v


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
    return sum(vals[:8]) - vals[3] - vals[4]


def _proc_jiffies(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads
    except OSError:
        return 0


# ---------------------------------------------------------------- bandwidth and bytes per token

def bandwidth_tool() -> Path:
    exe = peers.cache_dir() / "bw"
    src = peers.cache_dir() / "bw.c"
    if not (exe.is_file() and src.is_file() and src.read_text() == BW_SOURCE):
        src.write_text(BW_SOURCE)
        subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-o", str(exe), str(src)], check=True)
    return exe


_PROBES: dict[int, subprocess.Popen] = {}


def bandwidth(threads: int) -> float:
    """One probe (GB/s) from a long-lived probe process per thread count: its 1 GiB stays allocated between probes."""
    pr = _PROBES.get(threads)
    if pr is None:      # the first probe runs right after the allocation
        # passive OpenMP threads: between probes they sleep instead of spinning next to the measured runs
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="false", OMP_WAIT_POLICY="passive")
        pr = _PROBES[threads] = subprocess.Popen([str(bandwidth_tool()), "8", "serve"], stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, text=True, env=env)
    else:
        pr.stdin.write("\n")
        pr.stdin.flush()
    line = pr.stdout.readline()
    if not line:
        raise RuntimeError(f"the bandwidth probe exited (status {pr.poll()})")
    return float(line.split()[0])


def bytes_per_token(peer: str, path: Path) -> int:
    """Weight bytes a decode step reads: every tensor a matmul or norm uses, the lm_head once; an embedding table
    that is not also the lm_head is left out (one row of it is read)."""
    if peer == "llama.cpp":
        from gguf import GGUFReader

        t = {x.name: int(x.n_bytes) for x in GGUFReader(path).tensors}
        if "output.weight" in t:
            t.pop("token_embd.weight", None)
        return sum(v for k, v in t.items() if k != "rope_freqs.weight")
    if peer == "ORT GenAI":
        import onnx

        g = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
        size = {}
        for init in g.initializer:
            ext = {e.key: e.value for e in init.external_data}
            size[init.name] = int(ext.get("length", 0)) or len(init.raw_data)
        reads = {"MatMul", "MatMulNBits", "Gemm", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
        used = {i for n in g.node if n.op_type in reads for i in n.input}
        # a Transpose feeding a MatMul (the fp32 tied lm_head) reads its input too
        outs = {o: n for n in g.node for o in n.output}
        for n in g.node:
            if n.op_type in reads:
                for i in n.input:
                    if i in outs and outs[i].op_type == "Transpose":
                        used.update(outs[i].input)
        return sum(v for k, v in size.items() if k in used)
    if peer == "PyTorch eager":
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "np") as f:
            # fp32; tied: embed_tokens is the lm_head, stored and read once
            return sum(_numel(f.get_slice(k).get_shape()) * 4 for k in f.keys())
    if peer == "llamac":
        m = json.loads((path / "manifest.json").read_text())
        ts = m["weights"]["tensors"]
        has_head = any(t.get("group") == "lm_head" for t in ts)
        return sum(t["nbytes"] for t in ts if not (has_head and t.get("group") == "embedding"))
    raise ValueError(peer)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------- workers

class Worker:
    """One `peers.py worker` process; run() sends 'run' and waits for its JSON line."""

    def __init__(self, peer: str, fmt: str, model: Path, threads: int, p: int, n: int, logdir: Path):
        self.peer, self.fmt = peer, fmt
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
        self.log = logdir / f"worker-{peer.replace(' ', '_')}-{fmt}.log"
        self.proc = subprocess.Popen([str(peers.worker_python(peer)), str(HERE / "peers.py"), "worker", peer, fmt,
                                      str(model), "--threads", str(threads), "-p", str(p), "-n", str(n)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     text=True, env=env, cwd=str(REPO))
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no answer within {timeout:.0f} s") from None
            if line is None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
                raise RuntimeError(f"worker exited ({self.proc.wait()}): {tail[0][:300]}")
            line = line.strip()
            if line.startswith("{"):  # libraries may print other lines to stdout
                return json.loads(line)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer within {timeout:.0f} s")

    def run(self, timeout: float) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()


def others_now(window: float = 1.0) -> float:
    """Cores used by all processes over the next `window` seconds (the harness itself is idle meanwhile)."""
    hz = os.sysconf("SC_CLK_TCK")
    b0 = _busy_jiffies()
    time.sleep(window)
    return (_busy_jiffies() - b0) / hz / window


def mem_gate(threads: int, best: float, frac: float, max_wait: float) -> tuple[float, float]:
    """Wait until the memory is in its fast state (a probe >= frac x the best probe so far), at most max_wait s;
    return (last probe in GB/s, waited s). This host's memory speed flips between two states (about 36 and 67 GB/s
    with 2 threads) for seconds to minutes at a time, whoever runs; every peer waits alike, as for idle CPUs."""
    t0 = time.monotonic()
    while True:
        probe = bandwidth(threads)
        if probe >= frac * best or time.monotonic() - t0 >= max_wait:
            return probe, time.monotonic() - t0
        time.sleep(2)


def gate(limit: float, max_wait: float) -> tuple[float, float]:
    """Wait until the machine is quiet (< limit cores busy over 1 s), at most max_wait s; return (busy, waited)."""
    t0 = time.monotonic()
    while True:
        busy = others_now()
        if busy < limit or time.monotonic() - t0 >= max_wait:
            return busy, time.monotonic() - t0


def measured_run(w: Worker, timeout: float, idle: list[Worker]) -> dict:
    """One run of w; also the CPU (in cores) used meanwhile by everything else, and by the idle workers alone
    (a thread pool that spins after its own run would show there)."""
    hz = os.sysconf("SC_CLK_TCK")
    idle0 = sum(_proc_jiffies(x.proc.pid) for x in idle)
    load0, busy0, own0, t0 = os.getloadavg()[0], _busy_jiffies(), _proc_jiffies(w.proc.pid), time.monotonic()
    r = w.run(timeout)
    dt = time.monotonic() - t0
    busy, own = _busy_jiffies() - busy0, _proc_jiffies(w.proc.pid) - own0
    idle_cpu = sum(_proc_jiffies(x.proc.pid) for x in idle) - idle0
    r.update(load_before=round(load0, 2), load_after=round(os.getloadavg()[0], 2),
             others_cores=round(max(0, busy - own) / hz / dt, 2), own_cores=round(own / hz / dt, 2),
             idle_workers_cores=round(idle_cpu / hz / dt, 2))
    return r


def add_rooflines(res: dict) -> None:
    """Per row: best/median figures and the decode roofline from the run's best probe (issue 7's bar), and each run
    against the probe taken just before it (else its round's): how much the best-of-rounds bar owes to one round."""
    bw = max(res["bandwidth_gbs"]) if res["bandwidth_gbs"] else None
    res["bandwidth_best_gbs"] = bw
    for row in res["rows"].values():
        rs = row.get("runs")
        if not rs:
            continue
        row.update(summarize(rs))
        if bw and row.get("bytes_per_token"):
            row["roofline_tok_s"] = bw * 1e9 / row["bytes_per_token"]
            row["roofline_share"] = row["tg_best"] / row["roofline_tok_s"]
            row["roofline_round_shares"] = [
                r["tg"] * row["bytes_per_token"] / ((r.get("probe_gbs") or res["bandwidth_gbs"][r["round"]]) * 1e9)
                for r in rs]


def llamac_bench_cli(art: Path, threads: int, p: int, n: int) -> dict | str:
    """`llamac bench ... --json` as a cross-check of the rounds: the same method, run alone after them."""
    cmd = [str(REPO / ".venv" / "bin" / "llamac"), "bench", str(art), "-p", str(p), "-n", str(n), "-r", "5",
           "--threads", str(threads), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode == 2 and "No such command" in r.stderr:  # the CLI lacks `bench`: call the function it wraps
        code = ("import json, sys; from llamac.bench import bench; "
                "print(json.dumps(dict(bench(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 5, int(sys.argv[4])), "
                "via='llamac.bench.bench (the CLI has no bench command)')))")
        r = subprocess.run([str(peers.PROJECT_PY), "-c", code, str(art), str(p), str(n), str(threads)],
                           capture_output=True, text=True, timeout=1800)
    if r.returncode:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return f"exit {r.returncode}: {lines[-1] if lines else '?'}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main

def summarize(runs: list[dict]) -> dict:
    pp, tg = [r["pp"] for r in runs], [r["tg"] for r in runs]
    return {"pp_best": max(pp), "pp_median": statistics.median(pp), "tg_best": max(tg),
            "tg_median": statistics.median(tg), "n": len(runs),
            "load_median": statistics.median([r["load_before"] for r in runs]),
            "others_median": statistics.median([r["others_cores"] for r in runs])}


def wait_quiet(limit: float, max_wait: float) -> tuple[float, float]:
    t0 = time.monotonic()
    while os.getloadavg()[0] > limit and time.monotonic() - t0 < max_wait:
        time.sleep(15)
    return os.getloadavg()[0], time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="123m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--llamac-target", default="native",
                    help="llamac target to compile for; 'native': llamac compile's choice for this CPU")
    ap.add_argument("--only", default=None, help="comma-separated peers, e.g. 'llama.cpp,llamac'")
    ap.add_argument("--no-prepare", action="store_true", help="measure what is ready; build nothing")
    ap.add_argument("--no-cli-check", action="store_true", help="skip the `llamac bench` cross-check")
    ap.add_argument("--slow-s", type=float, default=120,
                    help="a worker whose warm-up run took longer is measured in the first round only")
    ap.add_argument("--gate", type=float, default=0.3, metavar="CORES",
                    help="before each run, wait until other processes use fewer cores than this over 1 s ...")
    ap.add_argument("--gate-wait", type=float, default=60, help="... but at most this many seconds (0: no gate)")
    ap.add_argument("--mem-gate", type=float, default=0.9, metavar="FRACTION",
                    help="before each run, wait until a bandwidth probe reads this share of the best one so far ...")
    ap.add_argument("--mem-wait", type=float, default=90, help="... but at most this many seconds (0: no wait)")
    ap.add_argument("--wait-quiet", type=float, default=None, metavar="LOAD")
    ap.add_argument("--max-wait", type=float, default=600)
    ap.add_argument("--out", default=str(REPO / "docs" / "PEERS.md"))
    ap.add_argument("--png", default=str(REPO / "docs" / "peers.png"))
    a = ap.parse_args()

    if a.llamac_target == "native":
        a.llamac_target = peers.native_target()
    if a.no_prepare:
        found = peers.models(a.shape, a.llamac_target)
    else:
        found = peers.prepare(a.shape, a.llamac_target)
        if not peers.llamacpp_ready():
            peers.log("llama.cpp is still building in the background: its rows are 'not measured' this time")
    only = set(a.only.split(",")) if a.only else None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logdir = peers.cache_dir() / "logs" / stamp
    logdir.mkdir(parents=True, exist_ok=True)
    res = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
           "versions": versions(), "shape": a.shape, "threads": a.threads, "rounds": a.rounds, "p": a.p, "n": a.n,
           "llamac_target": a.llamac_target, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "gate": {"cores": a.gate, "max_wait_s": a.gate_wait},
           "mem_gate": {"fraction": a.mem_gate, "max_wait_s": a.mem_wait}, "rows": {}}
    if a.wait_quiet is not None:
        load, waited = wait_quiet(a.wait_quiet, a.max_wait)
        res["waited_for_quiet"] = {"limit": a.wait_quiet, "load": round(load, 2), "waited_s": round(waited)}
        peers.log(f"load {load:.2f} after waiting {waited:.0f} s for < {a.wait_quiet}")

    workers: list[Worker] = []
    for key in ORDER:
        peer, fmt = key
        row = res["rows"].setdefault(f"{peer}|{fmt}", {"peer": peer, "format": fmt})
        m = found.get(key)
        if only and peer not in only:
            row["error"] = "not selected (--only)"
            continue
        if not isinstance(m, Path):
            row["error"] = f"not measured: {m}"
            continue
        row["model"] = str(m)
        try:
            row["bytes_per_token"] = bytes_per_token(peer, m)
        except Exception as e:  # the figure is informative; a reader failure must not stop the benchmark
            row["bytes_error"] = f"{type(e).__name__}: {e}"
        peers.log(f"loading {peer} {fmt}")
        w = Worker(peer, fmt, m, a.threads, a.p, a.n, logdir)
        try:
            ready = w.read(timeout=900)  # loading + one warm-up run (torch eager fp32 is slow under load)
            row.update(version=ready.get("version"), load_s=round(ready["load_s"], 2), warmup=ready.get("warmup"))
            warm_s = ready["warmup"]["pp_s"] + ready["warmup"]["tg_s"]
            if warm_s > a.slow_s:
                row["slow"] = f"warm-up run took {warm_s:.0f} s (> --slow-s {a.slow_s:.0f}): measured in one round only"
            workers.append(w)
        except Exception as e:
            row["error"] = f"not measured: {e}"
            w.close()

    res["bandwidth_gbs"], runs = [], {f"{w.peer}|{w.fmt}": [] for w in workers}
    try:
        for rnd in range(a.rounds):
            # the memory's speed swings within minutes on a shared host: probe at each round's start, right before
            # each run (the memory gate; that run's own roofline) and after it; the round's figure is its best probe
            res["bandwidth_gbs"].append(bandwidth(a.threads))
            k = rnd % max(1, len(workers))
            for w in workers[k:] + workers[:k]:  # rotate who goes first
                key = f"{w.peer}|{w.fmt}"
                if "error" in res["rows"][key] or ("slow" in res["rows"][key] and runs[key]):
                    continue
                probe, mem_waited = mem_gate(a.threads, max(res["bandwidth_gbs"]), a.mem_gate, a.mem_wait)
                res["bandwidth_gbs"][rnd] = max(res["bandwidth_gbs"][rnd], probe)
                busy, waited = gate(a.gate, a.gate_wait) if a.gate_wait > 0 else (None, 0.0)
                try:
                    r = measured_run(w, timeout=900, idle=[x for x in workers if x is not w])
                except Exception as e:
                    res["rows"][key]["error"] = f"failed in round {rnd + 1}: {e}"
                    continue
                after = bandwidth(a.threads)  # did the memory stay fast through the run?
                res["bandwidth_gbs"][rnd] = max(res["bandwidth_gbs"][rnd], after)
                r.update(gate_busy_cores=None if busy is None else round(busy, 2), gate_waited_s=round(waited, 1),
                         round=rnd, probe_gbs=probe, probe_after_gbs=after, mem_waited_s=round(mem_waited, 1))
                runs[key].append(r)
                peers.log(f"round {rnd + 1}/{a.rounds} {key:22s} pp {r['pp']:7.1f} tg {r['tg']:6.1f} tok/s "
                          f"(memory {probe:.0f}/{after:.0f} GB/s before/after, waited {mem_waited:.0f} s; load "
                          f"{r['load_before']}, others {r['others_cores']} cores, idle workers "
                          f"{r['idle_workers_cores']}, gate waited {waited:.0f} s)")
    finally:
        for w in workers:
            w.close()
    time.sleep(5)  # the host takes back the workers' freed memory, stealing CPU for a while: not during a run
    for key, rs in runs.items():
        res["rows"][key]["runs"] = rs
    add_rooflines(res)

    if not a.no_cli_check and (not only or "llamac" in only):
        res["llamac_bench_cli"] = {}
        for q in peers.LLAMAC_QUANTS:
            m = found.get(("llamac", q))
            if not isinstance(m, Path) or "tg_best" not in res["rows"][f"llamac|{q}"]:
                continue
            if "slow" in res["rows"][f"llamac|{q}"]:
                res["llamac_bench_cli"][q] = "skipped: too slow for 5 repetitions (see --slow-s)"
                continue
            peers.log(f"llamac bench {q} (cross-check)")
            probe, _ = mem_gate(a.threads, max(res["bandwidth_gbs"]), a.mem_gate, a.mem_wait)
            r = res["llamac_bench_cli"][q] = llamac_bench_cli(m, a.threads, a.p, a.n)
            if isinstance(r, dict):
                r.update(probe_gbs=probe, probe_after_gbs=bandwidth(a.threads))
    for pr in _PROBES.values():
        pr.stdin.close()
        pr.wait()

    out_json = peers.cache_dir() / "results" / f"{stamp}.json"
    out_json.parent.mkdir(exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1))
    from harness_report import write_report

    write_report(res, Path(a.out), Path(a.png).name)
    chart = subprocess.run([str(peers.tools_python()), str(HERE / "chart.py"), str(out_json), a.png],
                           capture_output=True, text=True)
    if chart.returncode:
        peers.log(f"chart failed: {chart.stderr.strip().splitlines()[-1:]}")
    peers.log(f"wrote {a.out}, {a.png}, {out_json}")
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
