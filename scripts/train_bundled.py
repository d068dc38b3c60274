#!/usr/bin/env python3
"""Train the small Llama bundled with llamac, from scratch, on the King James Bible (public domain).

Pipeline: KJV dump -> verses (references stripped, one per line) -> train split + held-out tail of whole books
-> sentencepiece tokenizer (Llama-2 style: BPE, byte fallback) -> LlamaForCausalLM (GQA, llama3 RoPE, tied
embeddings) trained on CPU with AdamW + cosine -> HF folder + train_report.json with measured numbers.

Corpus: `--corpus FILE` (a dump of `bible -f -p /usr/lib "Gen1:1-Rev22:21"`, one "Ref text" line per verse),
or, without it, the script runs that `bible` command itself (Debian packages bible-kjv + bible-kjv-text).
See scripts/README-train.md for the exact commands.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BOS, EOS, UNK = 1, 2, 0
VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


# ---------------------------------------------------------------- corpus

def read_corpus(path: Path | None) -> list[tuple[str, str]]:
    """Return [(book, verse text)] in canonical order; dump it with `bible` when no file is given."""
    if path is not None:
        raw = path.read_text(encoding="utf-8")
    else:
        exe = shutil.which("bible")
        if exe is None:
            sys.exit("no --corpus given and `bible` is not installed (apt-get install bible-kjv bible-kjv-text)")
        datadir = "/usr/lib"  # where bible-kjv-text puts bible.data
        raw = subprocess.run([exe, "-f", "-p", datadir, "Gen1:1-Rev22:21"], check=True,
                             capture_output=True, text=True).stdout
    verses = []
    for line in raw.splitlines():
        m = VERSE_RE.match(line.strip())
        if m:
            verses.append((m.group(1), " ".join(m.group(4).split())))
    if len(verses) < 30000:
        sys.exit(f"corpus has {len(verses)} verses; expected the whole KJV (31102)")
    return verses


def split_corpus(verses: list[tuple[str, str]], val_from: str, held_books: list[str]) -> tuple[str, str, str]:
    """Train text = books before `val_from`; validation = that book to the end (a contiguous tail, never trained on);
    held_out.txt = the `held_books` inside the validation tail (a few tens of KB, for perplexity checks later)."""
    books = list(dict.fromkeys(b for b, _ in verses))
    if val_from not in books:
        sys.exit(f"unknown book {val_from!r}; books are {' '.join(books)}")
    cut = books.index(val_from)
    val_books = set(books[cut:])
    for b in held_books:
        if b not in val_books:
            sys.exit(f"held-out book {b!r} is not in the validation tail starting at {val_from}")
    train = [t for b, t in verses if b not in val_books]
    val = [t for b, t in verses if b in val_books]
    held = [t for b, t in verses if b in set(held_books)]
    return "\n".join(train) + "\n", "\n".join(val) + "\n", "\n".join(held) + "\n"


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(train_text: str, dest: Path, vocab: int) -> None:
    """Llama-2-style sentencepiece: BPE, identity normalization, dummy prefix, byte fallback, split digits."""
    import sentencepiece as spm

    # The trainer records its input path, model prefix and thread count inside tokenizer.model: train in a scratch
    # directory with fixed relative names and one thread so the file is byte-identical from run to run.
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            Path("train.txt").write_text(train_text, encoding="utf-8")
            spm.SentencePieceTrainer.train(
                input="train.txt", model_prefix="sp", vocab_size=vocab, model_type="bpe",
                character_coverage=1.0, byte_fallback=True, split_digits=True,
                normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=-1,
                num_threads=1, minloglevel=2)
            shutil.copy("sp.model", dest)
        finally:
            os.chdir(cwd)


# ---------------------------------------------------------------- evaluation

def nll_sum(model, ids: np.ndarray, ctx: int, batch: int = 8) -> tuple[float, int]:
    """Sum of next-token NLL over every token of `ids` (natural log), and the token count.

    Protocol (reproducible elsewhere): split ids into consecutive chunks of `ctx` tokens; each chunk c is scored
    with input [BOS] + c[:-1] and targets c, so every token is predicted exactly once, with a fresh context
    that starts at BOS."""
    import torch

    chunks = [ids[i:i + ctx] for i in range(0, len(ids), ctx)]
    total, count = 0.0, 0
    with torch.no_grad():
        for j in range(0, len(chunks), batch):
            group = chunks[j:j + batch]
            n = max(len(c) for c in group)
            x = torch.full((len(group), n), BOS, dtype=torch.long)
            y = torch.full((len(group), n), -100, dtype=torch.long)
            for r, c in enumerate(group):
                x[r, 1:len(c)] = torch.from_numpy(c[:-1].astype(np.int64))
                y[r, :len(c)] = torch.from_numpy(c.astype(np.int64))
            logits = model(input_ids=x).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((y != -100).sum())
    return total, count


def unigram_ppl(train_ids: np.ndarray, ids: np.ndarray, vocab: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the training tokens."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[ids].mean()))


def sample_texts(model, sp, prompts: list[str], new_tokens: int, seed: int) -> list[dict]:
    """Greedy and seeded sampled continuations with transformers' generate()."""
    import torch

    out = []
    for i, prompt in enumerate(prompts):
        x = torch.tensor([[BOS] + sp.encode(prompt)], dtype=torch.long)
        for mode in ("greedy", "sample"):
            torch.manual_seed(seed + i)
            kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=0.8, top_k=40,
                                                                      top_p=1.0)
            with torch.no_grad():
                y = model.generate(x, max_new_tokens=new_tokens, eos_token_id=EOS, pad_token_id=EOS, **kw)
            text = sp.decode(y[0, 1:].tolist())
            out.append({"prompt": prompt, "mode": mode, **({} if mode == "greedy" else
                        {"temperature": 0.8, "top_k": 40, "seed": seed + i}), "text": text})
    return out


# ---------------------------------------------------------------- model

def make_config(args, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=args.ctx, rms_norm_eps=1e-5,
        rope_theta=args.rope_theta,
        rope_scaling={"rope_type": "llama3", "factor": float(args.rope_factor), "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0,
                      "original_max_position_embeddings": args.ctx // args.rope_factor},
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=None,
        attention_bias=False, mlp_bias=False, hidden_act="silu")


def add_legacy_rope_keys(config_path: Path, args) -> None:
    """transformers 5 writes `rope_parameters`; older readers (llama.cpp's converter, onnxruntime-genai, transformers
    4) read `rope_theta` + `rope_scaling`. Write both spellings with the same values."""
    d = json.loads(config_path.read_text())
    params = dict(d.get("rope_parameters") or {})
    d["rope_theta"] = float(params.pop("rope_theta", args.rope_theta))
    d["rope_scaling"] = params
    config_path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def param_groups(model, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm weights: no decay
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, help="KJV dump (`bible -f -p /usr/lib \"Gen1:1-Rev22:21\"`); "
                   "default: run `bible` to dump it")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "llamac" / "bundled")
    p.add_argument("--minutes", type=float, default=27.0, help="training-loop time budget (the LR schedule follows "
                   "elapsed time unless --steps is given)")
    p.add_argument("--steps", type=int, default=0, help="train exactly this many steps (schedule by step; "
                   "deterministic) instead of a time budget")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    # data split
    p.add_argument("--val-from", default="Heb", help="first book of the held-out tail (default Heb: Heb..Rev)")
    p.add_argument("--held-books", default="Jas,1Pet,2Pet,1Jn,2Jn,3Jn,Jude",
                   help="books of the tail written to held_out.txt")
    # tokenizer
    p.add_argument("--vocab", type=int, default=4096)
    # model size
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--ctx", type=int, default=256, help="training context = max_position_embeddings")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--rope-factor", type=int, default=4, help="llama3 rope factor; original context = ctx/factor")
    # optimisation
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=float, default=300.0, help="seconds between progress evaluations")
    p.add_argument("--save-dtype", choices=["bf16", "f32"], default="bf16")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch  # imported late so --help is quick

    import sentencepiece as spm
    import transformers
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals make CPU training many times slower
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    # --- data
    verses = read_corpus(args.corpus)
    train_text, val_text, held_text = split_corpus(verses, args.val_from, args.held_books.split(","))
    (out / "held_out.txt").write_text(held_text, encoding="utf-8")
    n_bytes = len(train_text) + len(val_text)
    log(f"corpus: {len(verses)} verses; train {len(train_text)} B, validation {len(val_text)} B "
        f"({100 * len(val_text) / n_bytes:.2f}%), held_out.txt {len(held_text)} B")

    # --- tokenizer
    train_tokenizer(train_text, out.resolve() / "tokenizer.model", args.vocab)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    vocab = sp.get_piece_size()
    train_ids = np.array(sp.encode(train_text), dtype=np.int32)
    val_ids = np.array(sp.encode(val_text), dtype=np.int32)
    held_ids = np.array(sp.encode(held_text), dtype=np.int32)
    log(f"tokenizer: vocab {vocab}; train {len(train_ids)} tokens ({len(train_text) / len(train_ids):.2f} B/token), "
        f"validation {len(val_ids)}, held_out {len(held_ids)}")

    # --- model
    config = make_config(args, vocab)
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.model.embed_tokens.weight.numel()
    log(f"model: {n_params} params ({n_params - n_embed} non-embedding); hidden {args.hidden}, layers {args.layers}, "
        f"heads {args.heads}/{args.kv_heads}, ffn {args.intermediate}, ctx {args.ctx}")

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    train_t = torch.from_numpy(train_ids.astype(np.int64))
    n_windows = len(train_ids) - args.ctx
    budget = args.minutes * 60.0
    eval_ids = val_ids[: 64 * args.ctx]  # fixed slice for quick progress evaluations

    def lr_at(step: int, progress: float) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        lo = args.lr * args.min_lr_frac
        return lo + 0.5 * (args.lr - lo) * (1 + math.cos(math.pi * min(progress, 1.0)))

    step, tokens_seen, losses, history = 0, 0, [], []
    t_train = time.time()
    next_eval = args.eval_every
    while True:
        elapsed = time.time() - t_train
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress)
        # random windows of ctx text tokens; each starts with BOS as in the evaluation protocol
        starts = torch.randint(0, n_windows, (args.batch,), generator=gen)
        win = torch.stack([train_t[s:s + args.ctx] for s in starts.tolist()])
        x = torch.cat([torch.full((args.batch, 1), BOS, dtype=torch.long), win[:, :-1]], dim=1)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), win.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += win.numel()
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"step {step} loss {np.mean(losses[-50:]):.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{tokens_seen / (time.time() - t_train):.0f} tok/s progress {100 * progress:.1f}%")
        if elapsed >= next_eval:
            model.eval()
            s, c = nll_sum(model, eval_ids, args.ctx)
            model.train()
            history.append({"step": step, "seconds": round(elapsed, 1), "train_loss": round(float(np.mean(losses[-50:])), 4),
                            "val_ppl_quick": round(math.exp(s / c), 2)})
            log(f"eval: {history[-1]}")
            next_eval += args.eval_every
    train_seconds = time.time() - t_train
    log(f"trained {step} steps, {tokens_seen} tokens in {train_seconds:.0f}s")

    # --- save (weights rounded to the save dtype), then measure the saved model, reloaded
    model.eval()
    s, c = nll_sum(model, val_ids, args.ctx)
    ppl_f32 = math.exp(s / c)  # before rounding to the save dtype
    log(f"validation ppl (float32 training weights) {ppl_f32:.3f}")
    dtype = torch.bfloat16 if args.save_dtype == "bf16" else torch.float32
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    add_legacy_rope_keys(out / "config.json", args)
    (out / "model.safetensors").chmod(0o644)  # save_pretrained leaves it 0600; it ships as package data
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "add_prefix_space": True, "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {}}, indent=2) + "\n")

    reloaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    reloaded.eval()
    results = {}
    for name, ids in (("validation", val_ids), ("held_out_txt", held_ids)):
        s, c = nll_sum(reloaded, ids, args.ctx)
        results[name] = {"tokens": c, "bytes": len(val_text if name == "validation" else held_text),
                         "ppl": round(math.exp(s / c), 3), "nll_per_token": round(s / c, 5),
                         "bits_per_byte": round(s / math.log(2) / len(val_text if name == "validation" else held_text), 4),
                         "unigram_ppl": round(unigram_ppl(train_ids, ids, vocab), 2)}
        log(f"{name}: ppl {results[name]['ppl']} (unigram {results[name]['unigram_ppl']}) over {c} tokens")
    samples = sample_texts(reloaded, sp, ["And God said", "In the beginning", "Jesus said unto them"], 48, args.seed)
    for smp in samples:
        log(f"{smp['mode']:6s} {smp['text']!r}")

    files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file() and f.suffix != ".py"}
    report = {
        "model": {"params": n_params, "non_embedding_params": n_params - n_embed, "hidden_size": args.hidden,
                  "num_layers": args.layers, "num_heads": args.heads, "num_kv_heads": args.kv_heads,
                  "head_dim": args.hidden // args.heads, "intermediate_size": args.intermediate, "vocab_size": vocab,
                  "context": args.ctx, "rope_theta": args.rope_theta,
                  "rope_scaling": {"rope_type": "llama3", "factor": float(args.rope_factor), "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": args.ctx // args.rope_factor},
                  "tie_word_embeddings": True, "saved_dtype": args.save_dtype},
        "data": {"corpus": "King James Bible (Debian bible-kjv-text), verse references stripped, one verse per line",
                 "train_books": f"Gen..{_book_before(verses, args.val_from)}",
                 "validation_books": f"{args.val_from}..Rev (contiguous tail, never trained on)",
                 "held_out_txt_books": args.held_books, "train_bytes": len(train_text), "train_tokens": len(train_ids),
                 "validation_bytes": len(val_text), "validation_fraction": round(len(val_text) / n_bytes, 4)},
        "tokenizer": {"type": "sentencepiece BPE, byte_fallback, identity normalization, dummy prefix, split digits",
                      "vocab_size": vocab, "unk_id": UNK, "bos_id": BOS, "eos_id": EOS, "pad_id": None,
                      "train_bytes_per_token": round(len(train_text) / len(train_ids), 3)},
        "training": {"threads": args.threads, "seconds": round(train_seconds, 1), "steps": step,
                     "batch": args.batch, "tokens_seen": tokens_seen,
                     "epochs": round(tokens_seen / len(train_ids), 2),
                     "tokens_per_second": round(tokens_seen / train_seconds, 1),
                     "final_train_loss": round(float(np.mean(losses[-100:])), 4),
                     "final_train_ppl": round(math.exp(float(np.mean(losses[-100:]))), 2),
                     "optimizer": f"AdamW lr {args.lr} betas (0.9, 0.95) wd {args.weight_decay} (matrices only), "
                                  f"warmup {args.warmup} steps, cosine to {args.min_lr_frac}x, clip 1.0",
                     "schedule": "by step" if args.steps else f"by elapsed time, budget {args.minutes} min",
                     "seed": args.seed, "history": history},
        "evaluation": {"protocol": f"ids = sp.encode(text) (no BOS); consecutive chunks of {args.ctx} tokens; chunk c "
                                   "scored with input [BOS]+c[:-1], targets c; ppl = exp(sum NLL / len(ids)); "
                                   "saved weights reloaded with transformers in float32; unigram = add-one smoothed "
                                   "token frequencies of the training split",
                       "validation_ppl_before_save_rounding": round(ppl_f32, 3), **results},
        "samples": samples,
        "files_bytes": files,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "sentencepiece": spm.__version__},
        "command": " ".join(["python", "scripts/train_bundled.py", *(sys.argv[1:] if argv is None else argv)]),
        "total_seconds": round(time.time() - t_start, 1),
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out} ({sum(files.values())} bytes)")


def _book_before(verses: list[tuple[str, str]], book: str) -> str:
    books = list(dict.fromkeys(b for b, _ in verses))
    return books[books.index(book) - 1]


if __name__ == "__main__":
    main()
