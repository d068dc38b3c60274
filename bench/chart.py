"""Bar chart of a harness results JSON: pp and tg per peer (bar = best, tick = median, ring = decode roofline).

    python bench/chart.py RESULTS.json OUT.png      (run by bench/harness.py with the bench tools venv: matplotlib)
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"llama.cpp": "#4c72b0", "ORT GenAI": "#dd8452", "PyTorch eager": "#8c8c8c", "llamac": "#55a868"}


def main(src: str, dst: str) -> None:
    res = json.loads(open(src).read())
    rows = [r for r in res["rows"].values() if "tg_best" in r]
    labels = [f"{r['peer']} {r['format']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 2.2), sharey=True)
    for ax, (kind, title) in zip(axes, (("pp", f"prefill pp{res['p']}"), ("tg", f"decode tg{res['n']}"))):
        y = range(len(rows))
        ax.barh(y, [r[f"{kind}_best"] for r in rows], color=[COLORS.get(r["peer"], "#999") for r in rows])
        ax.plot([r[f"{kind}_median"] for r in rows], y, "|", color="black", markersize=12, label="median")
        if kind == "tg":
            roof = [(i, r["roofline_tok_s"]) for i, r in enumerate(rows) if "roofline_tok_s" in r]
            if roof:
                ax.plot([x for _, x in roof], [i for i, _ in roof], "o", mfc="none", mec="crimson",
                        label="roofline (bandwidth / bytes per token)")
        for i, r in enumerate(rows):
            ax.text(r[f"{kind}_best"], i, f" {r[f'{kind}_best']:.0f}", va="center", fontsize=8)
        ax.set_title(f"{title}, tok/s (bar: best of {res['rounds']})")
        ax.set_yticks(list(y), labels)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].invert_yaxis()  # shared y axis: invert once, first row on top
    m = res["machine"]
    loads = [x["load_before"] for r in rows for x in r.get("runs", [])]
    fig.suptitle(f"{res['shape']} model, {res['threads']} threads, {m.get('cpu')} ({m.get('cores')} cores), "
                 f"bandwidth {res.get('bandwidth_best_gbs') or 0:.1f} GB/s, load {min(loads, default=0):.1f}–"
                 f"{max(loads, default=0):.1f}, {res['when']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
