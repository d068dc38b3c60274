"""Disassemble an arm64 artifact's kernels and count NEON and dot-product (sdot/udot) instructions per kernel.

No board is here: this shows what code the compiler emitted for a target (e.g. rpi5 = Cortex-A76 with dotprod).
Usage: python bench/arm64_disasm.py [--target rpi5] [--quant q4] [ART]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

NEON = re.compile(r"\bv\d+\.(?:\d+)?[bhsd]\b|\bq\d+\b")     # vector register operands: v0.4s, q1 ...
DOT = re.compile(r"^\s*[su]dot\b")


def kernel_stats(so: Path) -> list[tuple[str, int, int, int]]:
    out = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True,
                         text=True, check=True).stdout
    stats: dict[str, Counter] = {}
    name = None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            name = m.group(1)
            stats[name] = Counter()
            continue
        if name is None or "\t" not in line:
            continue
        insn = line.split("\t", 1)[1]
        stats[name]["all"] += 1
        stats[name]["neon"] += bool(NEON.search(insn))
        stats[name]["dot"] += bool(DOT.match(insn))
    rows = [(n, c["all"], c["neon"], c["dot"]) for n, c in stats.items() if c["all"]]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("art", nargs="?")
    ap.add_argument("--target", default="rpi5")
    ap.add_argument("--quant", default="q4")
    a = ap.parse_args()
    art = Path(a.art) if a.art else None
    if art is None:
        from llamac import bundled
        from llamac.compiler import compile_model

        art = compile_model(bundled.checkpoint(), a.target, quant=a.quant, out=Path(tempfile.mkdtemp()) / "art",
                            progress=False)
    rows = kernel_stats(art / "model.so")
    print(f"{art / 'model.so'} ({a.target}, {a.quant}): {sum(r[1] for r in rows)} instructions, "
          f"{sum(r[2] for r in rows)} NEON, {sum(r[3] for r in rows)} sdot/udot")
    print(f"{'kernel':60s} {'insns':>6s} {'NEON':>6s} {'dot':>5s}")
    for name, n, neon, dot in rows[:15]:
        print(f"{name[:60]:60s} {n:6d} {neon:6d} {dot:5d}")


if __name__ == "__main__":
    main()
