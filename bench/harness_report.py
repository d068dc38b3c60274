"""Turn the harness's results (a dict, also saved as JSON) into docs/PEERS.md. Stdlib only."""
from __future__ import annotations

import statistics
from pathlib import Path

PAIRS = [("q4", "Q4_0"), ("q8", "Q8_0"), ("f16", "F16")]
BAR_TG, BAR_PP, BAR_ROOF = 1.2, 1.0, 0.70  # issue 7's bars


def _f(x: float | None, nd: int = 1) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def _rows(res: dict) -> list[dict]:
    return list(res["rows"].values())


def _load_summary(res: dict) -> str:
    runs = [r for row in _rows(res) for r in row.get("runs", [])]
    if not runs:
        return "no runs"
    loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
    others = [r["others_cores"] for r in runs]
    idle = [r.get("idle_workers_cores", 0) for r in runs]
    return (f"1-minute load average {min(loads):.2f}–{max(loads):.2f} (median {statistics.median(loads):.2f}) "
            f"around the runs; other processes used {statistics.median(others):.2f} cores in the median run "
            f"(max {max(others):.2f}) of the {res['machine'].get('cores')}, of which the harness's own idle workers "
            f"{statistics.median(idle):.2f} (max {max(idle):.2f})" + _gate_summary(res, runs))


def _gate_summary(res: dict, runs: list[dict]) -> str:
    g = res.get("gate") or {}
    if not g.get("max_wait_s"):
        return ""
    quiet = sum(1 for r in runs if r.get("gate_busy_cores") is not None and r["gate_busy_cores"] < g["cores"])
    waited = [r.get("gate_waited_s", 0) for r in runs]
    return (f". Each run started once the machine was quiet (< {g['cores']} cores busy over 1 s) or after "
            f"{g['max_wait_s']:.0f} s: {quiet} of {len(runs)} runs started quiet (waits: median "
            f"{statistics.median(waited):.0f} s, max {max(waited):.0f} s)" + _mem_gate_summary(res, runs))


def _mem_gate_summary(res: dict, runs: list[dict]) -> str:
    g, bw = res.get("mem_gate"), res.get("bandwidth_best_gbs")
    runs = [r for r in runs if "probe_after_gbs" in r]
    if not g or not bw or not runs:
        return ""
    fast = g["fraction"] * bw
    before = sum(1 for r in runs if r["probe_gbs"] >= fast)
    both = sum(1 for r in runs if min(r["probe_gbs"], r["probe_after_gbs"]) >= fast)
    waited = [r["mem_waited_s"] for r in runs]
    return (f"; and once a memory probe read ≥ {g['fraction']:.0%} of the best probe so far, or after "
            f"{g['max_wait_s']:.0f} s (the memory of this host flips between a fast and a slow state, whoever runs): "
            f"{before} of {len(runs)} runs started on fast memory (≥ {fast:.0f} GB/s, {g['fraction']:.0%} of the "
            f"session's best) and {both} were still on it after (waits: median {statistics.median(waited):.0f} s, "
            f"max {max(waited):.0f} s)")


def _round_shares(shares: list[float] | None) -> str:
    """'56-85 %, 2 of 5 rounds >= 70 %': each run's decode against the bandwidth probed just before it."""
    if not shares:
        return "–"
    above = sum(1 for x in shares if x >= BAR_ROOF)
    return (f"{100 * min(shares):.0f}-{100 * max(shares):.0f} %, {above} of {len(shares)} rounds "
            f"≥ {BAR_ROOF:.0%}")


def write_report(res: dict, out: Path, png_name: str) -> None:
    m, v = res["machine"], res["versions"]
    p, n, t = res["p"], res["n"], res["threads"]
    bw = res.get("bandwidth_best_gbs")
    lines = [
        "# llamac and its peers on CPU",
        "",
        f"Written by `python bench/{res['command']}` on {res['when']} (see `bench/README.md`); the harness rewrites "
        "this file, so edit the harness, not this file.",
        "",
        f"- Machine: {m.get('cpu', '?')}, {m.get('cores')} cores ({m.get('isa') or 'no AVX2'}), {m.get('mem_gib')} GiB, "
        f"Linux {m.get('kernel')}, Python {m.get('python')}.",
        f"- Model: the brief's {res['shape']} shape (hidden 1024, 8 layers, 16 heads / 4 kv heads, ffn 2816, vocab "
        "32000, tied embeddings), random weights (`bench/models.py`), the same checkpoint for every peer.",
        f"- Method: batch 1, {t} threads for every peer; pp{p} = one prefill of {p} tokens from an empty cache, "
        f"tg{n} = {n} single-token decodes from an empty cache, each fed the argmax of the last logits. Every "
        "(peer, format) is loaded once in its own process and warmed up with one full run; then the harness goes "
        f"round-robin over them for {res['rounds']} rounds, rotating who goes first. Best and median over the rounds.",
        f"- Load: {_load_summary(res)}. The load average counts the measured process itself (2 busy threads add about 2), so the "
        "'other procs' column (CPU used by everything else during the run, from /proc/stat) is the cleaner signal. "
        "This machine is shared with other jobs: a run during which others held a core understates that peer "
        "(2-thread runs collapse when a core is taken), so compare rows whose 'other procs' figure is near 0.",
        f"- Memory bandwidth, measured in the same session ({t} threads, streaming read of 1 GiB in huge pages, 1-8 "
        f"streams per thread, best pass, at each round's start and right before and after each run): best {_f(bw)} GB/s (best per round: {', '.join(_f(x) for x in res.get('bandwidth_gbs', []))}). Decode "
        "roofline = bandwidth / weight bytes read per token (lm_head once; the KV cache, under 1 MB/token here, "
        "left out); % of roofline uses the best tg and the best bandwidth (issue 7's bar), and the llamac table "
        "also gives each run against the bandwidth probed just before it.",
        "",
        f"| peer | format | weights read / token | pp{p} tok/s best | pp{p} median | tg{n} tok/s best | tg{n} median "
        "| decode roofline tok/s | % of roofline | runs | load before (median) | other procs, cores (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    missing = []
    for row in _rows(res):
        if "tg_best" not in row:
            missing.append(row)
            continue
        bpt = row.get("bytes_per_token")
        lines.append(
            f"| {row['peer']} | {row['format']} | {_f(bpt / 1e6 if bpt else None)} MB | {_f(row['pp_best'])} "
            f"| {_f(row['pp_median'])} | {_f(row['tg_best'])} | {_f(row['tg_median'])} "
            f"| {_f(row.get('roofline_tok_s'))} | {_f(100 * row['roofline_share'] if 'roofline_share' in row else None, 0)} % "
            f"| {row['n']} | {row['load_median']:.2f} | {row['others_median']:.2f} |")
    for row in missing:
        lines.append(f"| {row['peer']} | {row['format']} | | not measured | | | | | | | | |")
    lines += ["", f"![pp{p} and tg{n} per peer]({png_name})", ""]
    table_end = len(lines)

    by = {(r["peer"], r["format"]): r for r in _rows(res)}
    lines += [f"## llamac / llama.cpp, same run (issue 7's bars: tg ≥ {BAR_TG}x, pp ≥ {BAR_PP}x, "
              f"decode ≥ {BAR_ROOF:.0%} of roofline)", "",
              f"| llamac | llama.cpp | pp{p} best | pp{p} median | tg{n} best | tg{n} median | llamac % of roofline "
              "| llamac % of the roofline probed just before each run | bars met |", "|---|---|---|---|---|---|---|---|---|"]
    for q, ft in PAIRS:
        a, b = by.get(("llamac", q), {}), by.get(("llama.cpp", ft), {})
        if "tg_best" not in a or "tg_best" not in b:
            why = a.get("error") or b.get("error") or "not measured"
            lines.append(f"| {q} | {ft} | not measured: {why} | | | | | | |")
            continue
        r = {k: a[k] / b[k] for k in ("pp_best", "pp_median", "tg_best", "tg_median")}
        share = a.get("roofline_share")
        met = [f"tg {'yes' if r['tg_best'] >= BAR_TG else 'no'}", f"pp {'yes' if r['pp_best'] >= BAR_PP else 'no'}",
               f"roofline {'yes' if share and share >= BAR_ROOF else 'no'}"]
        lines.append(f"| {q} | {ft} | {r['pp_best']:.2f}x | {r['pp_median']:.2f}x | {r['tg_best']:.2f}x "
                     f"| {r['tg_median']:.2f}x | {_f(100 * share if share else None, 0)} % "
                     f"| {_round_shares(a.get('roofline_round_shares'))} | {', '.join(met)} |")
    lines.append("")
    ratios = lines[table_end:]
    table = lines[_table_start(lines):table_end]

    if missing:
        lines += ["## Not measured", ""]
        lines += [f"- {r['peer']} {r['format']}: {r.get('error', 'not measured')}" for r in missing]
        lines.append("")
    errs = [r for r in _rows(res) if "tg_best" in r and (r.get("error") or r.get("slow"))]
    if errs:
        lines += ["Rows with fewer runs: " + "; ".join(f"{r['peer']} {r['format']}: {r.get('error') or r['slow']}"
                                                       for r in errs), ""]

    cli = res.get("llamac_bench_cli")
    if cli:
        lines += ["## Cross-check: `llamac bench ART -p 512 -n 128 -r 5 --threads 2 --json`", "",
                  "Run after the rounds, alone, by the CLI's own method: the harness's (llama-bench's) pp and tg, "
                  "each from an empty cache, best and median of its 5 runs; each started after the memory gate.", "",
                  "| scheme | pp best | pp median | tg best | tg median | load before → after | memory before → after |",
                  "|---|---|---|---|---|---|---|"]
        for q, r in cli.items():
            if isinstance(r, dict):
                lines.append(f"| {q} | {_f(r['prefill_tok_s'])} | {_f(r['prefill_tok_s_median'])} "
                             f"| {_f(r['decode_tok_s'])} | {_f(r['decode_tok_s_median'])} "
                             f"| {r['load_avg_before']} → {r['load_avg_after']} "
                             f"| {_f(r.get('probe_gbs'))} → {_f(r.get('probe_after_gbs'))} GB/s |"
                             + (f" {r['via']}" if "via" in r else ""))
            else:
                lines.append(f"| {q} | {r if r.startswith('skipped') else 'failed: ' + r} | | | | | |")
        lines.append("")

    lines += ["## Peers and versions", "",
              f"- llama.cpp: llama-cpp-python {v.get('llama-cpp-python')} built from its sdist on this machine "
              "(GGML_NATIVE, OpenMP, gcc " + str(v.get("gcc")) + "); F16 from the sdist's convert_hf_to_gguf.py, "
              "Q8_0/Q4_0 with `llama_model_quantize` (llama.cpp's defaults: Q4_0 keeps the tied output/embedding "
              "tensor at Q6_K); `Llama(n_batch=512, n_ubatch=512, n_threads=n_threads_batch=" f"{t})`, "
              "flash attention on (llama.cpp's and llama-bench's default, \"auto\"; the binding alone defaults to off).",
              f"- ONNX Runtime GenAI {v.get('onnxruntime-genai')}: its model builder, `-e cpu -p int4` "
              "(MatMulNBits, block 32, accuracy level 4 = int8 activations, the builder's CPU default; the tied "
              "embedding shares the int4 lm_head) and `-p fp32`; intra_op_num_threads set in genai_config.json; "
              "decode steps through `append_tokens`.",
              f"- PyTorch eager: torch {v.get('torch')}, transformers {v.get('transformers')} LlamaForCausalLM fp32, "
              "`torch.set_num_threads`, DynamicCache, logits of the last position only (as `generate` does).",
              f"- llamac {v.get('llamac')} ({v.get('llamac git', '')}): `llamac compile CKPT --target "
              f"{res['llamac_target']} --quant {{q4,q8,f16}}`, measured through `llamac.runtime` "
              "(load, session.prefill/decode/reset) in the same worker loop as the others.",
              "- Tokenizer (the converters need one; it does not affect speed): Llama 2's 32000-piece sentencepiece "
              "model rebuilt from llama.cpp's ggml-vocab-llama-spm.gguf (`tests/vocab_cache.py`).",
              ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    update_benchmarks(out.parent / "BENCHMARKS.md", res, table, ratios, out.name)


BEGIN, END = "<!-- harness:begin -->", "<!-- harness:end -->"


def _table_start(lines: list[str]) -> int:
    return next(i for i, ln in enumerate(lines) if ln.startswith("| peer |"))


def update_benchmarks(path: Path, res: dict, table: list[str], ratios: list[str], peers_name: str) -> None:
    """Replace the block between the harness markers in docs/BENCHMARKS.md with this run's tables."""
    if not path.is_file() or BEGIN not in path.read_text():
        return
    text = path.read_text()
    m = res["machine"]
    head = [BEGIN,
            f"Last harness run: {res['when']}, `python bench/{res['command']}`, llamac target "
            f"`{res['llamac_target']}`; {m.get('cpu', '?')}, {m.get('cores')} cores; load: {_load_summary(res)}; "
            f"memory bandwidth {_f(res.get('bandwidth_best_gbs'))} GB/s (best of the rounds). Method, versions and "
            f"the cross-check: [{peers_name}]({peers_name}).", ""]
    block = head + table + [r.replace("## ", "### ", 1) for r in ratios] + [END]
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1] if END in rest else ""
    path.write_text(before + "\n".join(block) + after)
