"""Hand-scheduled TIR kernels for the parts of a Llama step that matter on a CPU.

Each generator returns a PrimFunc with static weight shapes and a symbolic token count, already scheduled (parallel
outer loop, vectorized inner loop, accumulators in registers): the pipeline builds them as they are. Prefill tiles
and attention rows are handed out from a shared counter (`for_each_task`), decode tiles in chunks (`for_each_chunk`).
The math of every kernel is the numpy math of `llamac.quantize.dequantize` (w = f32(code) * f32(scale)); only the
order of additions differs, so the artifact computes what `llamac inspect --dequantize` writes.

- `linear`: y[1, S, N] = x[1, S, K] @ W, W in the packed layout of `quantize.pack`; dequantization happens in registers
  inside the loop (no f32 weight copy exists). One row (decode) reads whole weight panels (one DRAM stream per
  panel; float panels may be several vectors wide, the target's `float_panels`); more rows (prefill) run in tiles of
  ROWS / FLOAT_ROWS rows x one vector width that reuse each weight vector.
- `embedding`: rows of the same packed weights, gathered by token id (tied embeddings share the lm_head weights).
- `kv_write`: writes the new K or V rows into the fixed-capacity cache, in place (Relax call_tir_inplace).
- `attn_scores` / `attn_values`: q.K^T and P.V reading only the valid prefix [0, total) of the cache, and per
  query row only the keys up to its last visible one (`visible_extent`): a causal prefill does half the work.
- `attention`: the three in one pass (online softmax), used when the graph's mask is recognised; the others
  remain for graphs where it is not. `masked_softmax`: softmax(where(visible, scores, f32 min)) over the same keys.
- `rms_norm`: RMSNorm per row, with the residual add in front of it; `silu_mul`: SwiGLU's gate * sigmoid(gate) * up.
"""
from __future__ import annotations

from tvm.script import tirx as T

from llamac.quantize import Scheme

OPAQUE = 8      # relax OpPatternKind kOpaque: FuseOps leaves these kernels alone
LOW = -3.4028234663852886e38    # the graph's mask fill (float32 min): a row that sees no key averages all of them
ROWS = 4        # prefill tile: rows sharing one dequantized weight vector (q8/q4)
FLOAT_ROWS = 6  # f32/f16 prefill tile: 6 rows x 2 vectors = 12 accumulators, the most that fit 16 AVX registers
WORKERS = 64    # slots of a parallel loop that takes its tasks from a shared counter (at least the core count)


def next_task(counter):
    """The next task index from a shared counter (`next_task.c`, linked into the library)."""
    return T.call_extern("int32", "llamac_next_task", T.address_of(counter[0]))


@T.macro(hygienic=False)
def for_each_task(n, body, workers=WORKERS, next_task=next_task):
    """body(i) for every i < n over the cores: each of WORKERS parallel slots takes tasks from one shared counter until
    they run out, so a core slowed down by other work takes fewer (a plain parallel loop splits them evenly, and the
    others wait for the slowest core at its end). Prefill tiles and attention rows use it; decode takes chunks
    (`for_each_chunk`), which keep each core's weight stream contiguous.

    Macros are expanded where they are called. This one and each `body` are not hygienic, so that the body sees the
    kernel's buffers; both take the constants and macros they need from where they are defined as default arguments
    (the kernel may not name them); the names here (counter, claimed, slot) must not be the kernel's."""
    counter = T.alloc_buffer((1,), "int32")
    counter[0] = 0
    for slot in T.parallel(workers):
        claimed = T.alloc_buffer((1,), "int32")
        claimed[0] = next_task(counter)
        while T.Cast("int64", claimed[0]) < n:
            body(T.Cast("int64", claimed[0]))
            claimed[0] = next_task(counter)


def next_chunk(counter, n, parts, chunk):
    """chunk[0:2] = the next chunk [start, end) of n tasks from a shared counter (`next_task.c`)."""
    return T.call_extern("int32", "llamac_next_chunk", T.address_of(counter[0]), n, parts, T.address_of(chunk[1]))


@T.macro(hygienic=False)
def for_each_chunk(n, body, workers=WORKERS, next_chunk=next_chunk):
    """body(i) for every i < n over the cores, in contiguous chunks from one shared counter: each chunk is 1 / (2 x
    threads) of the tasks left, so each core streams long runs of the weights and still none waits long for the
    others at the end (a core that starts late or runs slow takes less). Decode uses it: there a plain parallel loop
    left the main thread waiting for the worker at the end of every linear layer, and single tasks from a counter
    (`for_each_task`) interleave the cores' weight streams (both slower). Same naming rules as `for_each_task`."""
    chunk_counter = T.alloc_buffer((1,), "int32")
    chunk_counter[0] = 0
    parts = T.call_extern("int32", "llamac_threads") * 2    # here, on the launching thread (see next_task.c)
    for chunk_slot in T.parallel(workers):
        chunk = T.alloc_buffer((2,), "int32")
        chunk[0] = next_chunk(chunk_counter, T.int32(n), parts, chunk)
        while chunk[0] < n:
            for chunk_task in range(chunk[0], chunk[1]):
                body(T.Cast("int64", chunk_task))
            chunk[0] = next_chunk(chunk_counter, T.int32(n), parts, chunk)


def tile_scope(rows: int) -> str:
    """Storage of a linear tile's accumulators. TVM lowers "global" scratch of constant size under 1 KiB to a stack
    array that LLVM keeps in registers, and any "local" buffer to a heap workspace (an allocator call per task).
    The stack suits the one-row decode tile (q4 decode 10 % faster, f16 5 %); the multi-row prefill tiles and the
    attention kernels measured faster with workspaces (q4 prefill 23 %, attention 35 % slower on the stack)."""
    return "global" if rows == 1 else "local"


def linear(scheme: Scheme, k: int, n: int, lanes: int, tile_lanes: int | None = None):
    """Kernel for weights in the "lanes" layout, `lanes` output channels side by side; `tile_lanes` (the target's
    lanes, default `lanes`): the width of the float kernels' prefill tiles, which must fit the vector registers."""
    if scheme.kind == "float" or scheme.bits == 8:
        return linear_group(scheme, k, (n,), (lanes,), tile_lanes)
    return _linear_q4(k, n, lanes, scheme.scale_dtype, scheme.group_size)


def linear_group(scheme: Scheme, k: int, ns: tuple[int, ...], lanes: tuple[int, ...], tile_lanes: int | None = None):
    """y_i[1, S, N_i] = x[1, S, K] @ W_i for one to three f32 / f16 / q8 weights in the "lanes" layout that share
    their input (q, k, v; gate, up): one parallel loop over the panels of every weight, one thread-pool launch and one
    longer read stream instead of one per weight (f16 123M decode: q, k and v 67 -> 54 us per layer)."""
    assert 1 <= len(ns) == len(lanes) <= 3 and (scheme.kind == "float" or scheme.bits == 8)
    tl = min([tile_lanes or min(lanes)] + list(lanes))
    if scheme.kind == "float":
        return _linear_dense(k, ns, lanes, tl, scheme.weight_dtype, None, k)
    return _linear_dense(k, ns, lanes, tl, "int8", scheme.scale_dtype, scheme.group_size or k)


def _linear_dense(K: int, ns: tuple[int, ...], Ls: tuple[int, ...], TL: int, wdtype: str, sdtype: str | None,
                  GS: int):
    """f32 / f16 / int8 weights W_o [N_o/L_o, K, L_o]; int8 has scales [N_o/L_o, G, L_o] applied once per group. A
    panel of L_o channels is one read stream; prefill works through it TL lanes at a time (L_o a multiple of TL).
    Tasks of weight o follow those of weight o - 1 in one parallel loop."""
    NB = [n // L for n, L in zip(ns, Ls)]
    G = -(-K // GS)
    scaled = sdtype is not None
    # panels per decode task: up to 4 x TL channels (2 x for int8), so a core has that many loads in flight
    DG = [next(d for d in ((4, 2, 1) if not scaled else (2, 1)) if nb % d == 0 and d * L <= 4 * TL)
          for nb, L in zip(NB, Ls)]
    DT0 = [sum(nb // d for nb, d in zip(NB[:o], DG[:o])) for o in range(len(ns))]     # first decode task of W_o
    DT1 = [DT0[o] + NB[o] // DG[o] for o in range(len(ns))]
    PT0 = [sum(NB[:o]) for o in range(len(ns))]                                        # prefill: one per panel
    PT1 = [PT0[o] + NB[o] for o in range(len(ns))]
    sdt = sdtype or "float32"
    TB = ROWS if scaled else FLOAT_ROWS

    @T.macro
    def tile(x, w, sc, y, nb0, l0, r0, S, TB, NP, LW, L):
        """TB rows x NP weight panels, lanes l0 .. l0 + LW of each. Prefill: 6 rows share each weight vector (12
        accumulators). Decode: one row, NP whole panels at once, so that a core has NP x L channels' loads in flight
        (one narrow stream cannot keep enough DRAM reads outstanding); NP x L/8 accumulator chains also hide the
        FMA latency."""
        acc = T.alloc_buffer((TB, NP, LW), "float32", scope=tile_scope(TB))
        gacc = T.alloc_buffer((TB, NP, LW), "float32", scope=tile_scope(TB))
        for t in T.unroll(TB):
            for p in T.unroll(NP):
                for l in T.vectorized(LW):
                    acc[t, p, l] = T.float32(0)
        for g in range(G):
            for t in T.unroll(TB):
                for p in T.unroll(NP):
                    for l in T.vectorized(LW):
                        gacc[t, p, l] = T.float32(0)
            for kk in range(T.min(GS, K - g * GS)):
                for t in T.unroll(TB):
                    for p in T.unroll(NP):
                        for l in T.vectorized(LW):
                            gacc[t, p, l] = gacc[t, p, l] + x[T.min(r0 + t, S - 1), g * GS + kk] * T.Cast(
                                "float32", w[nb0 + p, g * GS + kk, l0 + l])
            for t in T.unroll(TB):
                for p in T.unroll(NP):
                    for l in T.vectorized(LW):
                        if scaled:
                            acc[t, p, l] = acc[t, p, l] + gacc[t, p, l] * T.Cast("float32", sc[nb0 + p, g, l0 + l])
                        else:
                            acc[t, p, l] = acc[t, p, l] + gacc[t, p, l]
        for t in T.unroll(TB):
            if r0 + t < S:
                for p in T.unroll(NP):
                    for l in T.vectorized(LW):
                        y[r0 + t, (nb0 + p) * L + l0 + l] = acc[t, p, l]

    @T.macro
    def panel(x, w, sc, y, nb, S, L):     # prefill: every row of weight panel nb, TB rows x TL lanes at a time
        for sub in range(L // TL):
            for sb in range((S + TB - 1) // TB):
                tile(x, w, sc, y, nb, sub * TL, sb * TB, S, TB, 1, TL, L)

    @T.macro(hygienic=False)
    def decode_task(i, tile=tile, DG=DG, DT0=DT0, DT1=DT1, Ls=Ls):   # decode: DG_o panels of W_o, the one row
        if i < DT1[0]:
            tile(x, w0, sc0, y0, i * DG[0], 0, T.int64(0), S, 1, DG[0], Ls[0], Ls[0])
        if len(Ls) > 1:
            if DT0[1] <= i and i < DT1[1]:
                tile(x, w1, sc1, y1, (i - DT0[1]) * DG[1], 0, T.int64(0), S, 1, DG[1], Ls[1], Ls[1])
        if len(Ls) > 2:
            if DT0[2] <= i:
                tile(x, w2, sc2, y2, (i - DT0[2]) * DG[2], 0, T.int64(0), S, 1, DG[2], Ls[2], Ls[2])

    @T.macro(hygienic=False)
    def prefill_task(i, panel=panel, PT0=PT0, PT1=PT1, Ls=Ls):
        if i < PT1[0]:
            panel(x, w0, sc0, y0, i, S, Ls[0])
        if len(Ls) > 1:
            if PT0[1] <= i and i < PT1[1]:
                panel(x, w1, sc1, y1, i - PT0[1], S, Ls[1])
        if len(Ls) > 2:
            if PT0[2] <= i:
                panel(x, w2, sc2, y2, i - PT0[2], S, Ls[2])

    @T.macro(hygienic=False)
    def body(x3, decode_task=decode_task, prefill_task=prefill_task, DT1=DT1, PT1=PT1):
        x = T.decl_buffer((S, K), "float32", data=x3.data)    # [1, seq, K] as the graph has it: no reshape
        if S == 1:
            for_each_chunk(DT1[-1], decode_task)
        else:
            for_each_task(T.int64(PT1[-1]), prefill_task)

    def wshape(o):
        return NB[o], K, Ls[o]

    def sshape(o):
        return (NB[o], G, Ls[o]) if scaled else (1, 1, 1)    # float weights: an unused placeholder scale

    return group_kernel(K, ns, wshape, sshape, wdtype, sdt, body)


def group_kernel(K: int, ns: tuple[int, ...], wshape, sshape, wdtype: str, sdt: str, body):
    """The PrimFunc of a linear kernel on one to three weights sharing the input x [1, S, K]: parameters x, (w_o,
    sc_o) for each weight (shapes wshape(o), sshape(o)), then y_o [1, S, N_o]; its body is `body(x3)`, a macro that
    sees S, x3, w_o, sc_o and y_o [S, N_o]. TVMScript takes a fixed parameter list: one signature per weight count.
    `tvm_dot` uses it too."""
    if len(ns) == 1:
        @T.prim_func(private=True)
        def linear(x_h: T.handle, w0: T.Buffer(wshape(0), wdtype), sc0: T.Buffer(sshape(0), sdt),
                   y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "llamac.kernel": "linear", "op_pattern": OPAQUE})
            S = T.int64()
            x3 = T.match_buffer(x_h, (1, S, K), "float32")
            y03 = T.match_buffer(y_h, (1, S, ns[0]), "float32")
            y0 = T.decl_buffer((S, ns[0]), "float32", data=y03.data)
            body(x3)
    elif len(ns) == 2:
        @T.prim_func(private=True)
        def linear(x_h: T.handle, w0: T.Buffer(wshape(0), wdtype), sc0: T.Buffer(sshape(0), sdt),
                   w1: T.Buffer(wshape(1), wdtype), sc1: T.Buffer(sshape(1), sdt), y0_h: T.handle,
                   y1_h: T.handle):
            T.func_attr({"tirx.noalias": True, "llamac.kernel": "linear", "op_pattern": OPAQUE})
            S = T.int64()
            x3 = T.match_buffer(x_h, (1, S, K), "float32")
            y03 = T.match_buffer(y0_h, (1, S, ns[0]), "float32")
            y13 = T.match_buffer(y1_h, (1, S, ns[1]), "float32")
            y0 = T.decl_buffer((S, ns[0]), "float32", data=y03.data)
            y1 = T.decl_buffer((S, ns[1]), "float32", data=y13.data)
            body(x3)
    else:
        @T.prim_func(private=True)
        def linear(x_h: T.handle, w0: T.Buffer(wshape(0), wdtype), sc0: T.Buffer(sshape(0), sdt),
                   w1: T.Buffer(wshape(1), wdtype), sc1: T.Buffer(sshape(1), sdt),
                   w2: T.Buffer(wshape(2), wdtype), sc2: T.Buffer(sshape(2), sdt),
                   y0_h: T.handle, y1_h: T.handle, y2_h: T.handle):
            T.func_attr({"tirx.noalias": True, "llamac.kernel": "linear", "op_pattern": OPAQUE})
            S = T.int64()
            x3 = T.match_buffer(x_h, (1, S, K), "float32")
            y03 = T.match_buffer(y0_h, (1, S, ns[0]), "float32")
            y13 = T.match_buffer(y1_h, (1, S, ns[1]), "float32")
            y23 = T.match_buffer(y2_h, (1, S, ns[2]), "float32")
            y0 = T.decl_buffer((S, ns[0]), "float32", data=y03.data)
            y1 = T.decl_buffer((S, ns[1]), "float32", data=y13.data)
            y2 = T.decl_buffer((S, ns[2]), "float32", data=y23.data)
            body(x3)

    return linear


def _linear_q4(K: int, N: int, L: int, sdtype: str, GS: int):
    """4-bit codes, 8 per uint32 word [N/L, ceil(K/8), L], scales [N/L, G, L].

    Per group: sum_k x_k * (c_k - 8) * s = s * (sum_k x_k * c_k - 8 * sum_k x_k); the second sum is per input row
    and shared by all outputs, so it is computed once (xs). Inputs past K (padding codes are 8) read x[K-1] in both
    sums and cancel exactly.
    """
    NB = N // L
    KW = -(-K // 8)
    G = -(-K // GS)
    WPG = GS // 8

    @T.macro
    def tile(x, w, sc, xs, y, nb, r0, S, TB, A):
        acc = T.alloc_buffer((TB, L), "float32", scope=tile_scope(TB))
        gacc = T.alloc_buffer((TB, A, L), "float32", scope=tile_scope(TB))
        for t in T.unroll(TB):
            for l in T.vectorized(L):
                acc[t, l] = T.float32(0)
        for g in range(G):
            for t in T.unroll(TB):
                for a in T.unroll(A):
                    for l in T.vectorized(L):
                        gacc[t, a, l] = T.float32(0)
            for kw in range(T.min(WPG, KW - g * WPG)):
                for j in T.unroll(8):
                    for t in T.unroll(TB):
                        for l in T.vectorized(L):
                            gacc[t, j % A, l] = gacc[t, j % A, l] + x[
                                T.min(r0 + t, S - 1), T.min(g * GS + kw * 8 + j, K - 1)] * T.Cast(
                                "float32", T.bitwise_and(T.shift_right(w[nb, g * WPG + kw, l], T.uint32(4 * j)),
                                                         T.uint32(15)))
            for t in T.unroll(TB):
                for l in T.vectorized(L):
                    acc[t, l] = acc[t, l] - xs[T.min(r0 + t, S - 1), g] * T.Cast("float32", sc[nb, g, l])
                for a in T.unroll(A):
                    for l in T.vectorized(L):
                        acc[t, l] = acc[t, l] + gacc[t, a, l] * T.Cast("float32", sc[nb, g, l])
        for t in T.unroll(TB):
            if r0 + t < S:
                for l in T.vectorized(L):
                    y[r0 + t, nb * L + l] = acc[t, l]

    @T.macro(hygienic=False)
    def panel(nb, tile=tile):   # prefill: every row of weight panel nb, ROWS rows at a time
        for sb in range((S + ROWS - 1) // ROWS):
            tile(x, w, sc, xs, y, nb, sb * ROWS, S, ROWS, 1)

    @T.macro(hygienic=False)
    def one_panel(nb, tile=tile):   # decode: weight panel nb, the one row
        tile(x, w, sc, xs, y, nb, T.int64(0), S, 1, 2)

    @T.prim_func(private=True)
    def linear_q4(x_h: T.handle, w: T.Buffer((NB, KW, L), "uint32"), sc: T.Buffer((NB, G, L), sdtype),
                  y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "llamac.kernel": "linear", "op_pattern": OPAQUE})
        S = T.int64()
        x3 = T.match_buffer(x_h, (1, S, K), "float32")      # [1, seq, K] as the graph has it: no reshape
        y3 = T.match_buffer(y_h, (1, S, N), "float32")
        x = T.decl_buffer((S, K), "float32", data=x3.data)
        y = T.decl_buffer((S, N), "float32", data=y3.data)
        xs = T.alloc_buffer((S, G), "float32")
        for r in T.parallel(S):
            for g in range(G):
                xs[r, g] = T.float32(0)
                for e in range(T.min(GS, KW * 8 - g * GS)):
                    xs[r, g] = xs[r, g] + x[r, T.min(g * GS + e, K - 1)] * T.float32(8)
        if S == 1:
            for_each_chunk(NB, one_panel)
        else:
            for_each_task(T.int64(NB), panel)

    return linear_q4


def embedding(scheme: Scheme, k: int, n: int, lanes: int):
    """out[0, s, :] = column ids[0, s] of the packed [K, N] weight (K = hidden, N = vocab)."""
    K, N, L = k, n, lanes
    NB = N // L
    if scheme.kind == "float" or scheme.bits == 8:
        wdtype = scheme.weight_dtype if scheme.kind == "float" else "int8"
        scaled = scheme.kind != "float"
        GS = scheme.group_size or K
        sshape = (NB, -(-K // GS), L) if scaled else (1, 1, 1)
        sdt = scheme.scale_dtype if scaled else "float32"

        @T.prim_func(private=True)
        def embed_dense(ids_h: T.handle, w: T.Buffer((NB, K, L), wdtype), sc: T.Buffer(sshape, sdt),
                        out_h: T.handle):
            T.func_attr({"tirx.noalias": True, "llamac.kernel": "embedding", "op_pattern": OPAQUE})
            S = T.int64()
            ids = T.match_buffer(ids_h, (1, S), "int64")
            out = T.match_buffer(out_h, (1, S, K), "float32")
            for s in T.parallel(S):
                for h in range(K):
                    if scaled:
                        out[0, s, h] = T.Cast("float32", w[ids[0, s] // L, h, ids[0, s] % L]) * T.Cast(
                            "float32", sc[ids[0, s] // L, h // GS, ids[0, s] % L])
                    else:
                        out[0, s, h] = T.Cast("float32", w[ids[0, s] // L, h, ids[0, s] % L])

        return embed_dense

    GS = scheme.group_size
    G = -(-K // GS)
    KW = -(-K // 8)

    @T.prim_func(private=True)
    def embed_q4(ids_h: T.handle, w: T.Buffer((NB, KW, L), "uint32"), sc: T.Buffer((NB, G, L), scheme.scale_dtype),
                 out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "llamac.kernel": "embedding", "op_pattern": OPAQUE})
        S = T.int64()
        ids = T.match_buffer(ids_h, (1, S), "int64")
        out = T.match_buffer(out_h, (1, S, K), "float32")
        for s in T.parallel(S):
            for h in range(K):
                out[0, s, h] = (T.Cast("float32", T.bitwise_and(T.shift_right(
                    w[ids[0, s] // L, h // 8, ids[0, s] % L], T.Cast("uint32", 4 * (h % 8))), T.uint32(15)))
                    - T.float32(8)) * T.Cast("float32", sc[ids[0, s] // L, h // GS, ids[0, s] % L])

    return embed_q4


def kv_write(kv_heads: int, capacity: int, head_dim: int):
    """cache[0, h, total - S + i, :] = new[0, h, i, :]; the cache is updated in place (call_tir_inplace)."""
    H, C, D = kv_heads, capacity, head_dim

    @T.prim_func(private=True)
    def kv_write(cache: T.Buffer((1, H, C, D), "float32"), new_h: T.handle, total: T.int64):
        T.func_attr({"tirx.noalias": True, "llamac.kernel": "kv_write", "op_pattern": OPAQUE})
        S = T.int64()
        new = T.match_buffer(new_h, (1, H, S, D), "float32")
        for h in range(H):          # a copy of S x H x D floats: a thread-pool launch would cost more
            for i in range(S):
                for d in T.vectorized(D):
                    cache[0, h, total - S + i, d] = new[0, h, i, d]

    return kv_write


@T.macro
def tile_extent(hi, ext, r0, R, S, RB):
    """hi[0] = the largest key extent of query rows r0 .. r0 + RB - 1 (row r is position r % S): keys past it are
    masked for every row of the tile."""
    hi[0] = T.int64(0)
    for t in T.unroll(RB):
        hi[0] = T.max(hi[0], ext[T.min(r0 + t, R - 1) % S])


@T.macro
def transpose_keys(k, kt, total, H, C, D, JB):
    """kt[h, d, j] = k[0, h, j, d] for the valid keys j < total, zero up to the next multiple of JB: a tile of JB keys
    is then one vector per (head, d) for broadcast FMAs."""
    for hj in T.parallel(H * ((total + JB - 1) // JB)):
        for d in range(D):
            for jj in range(JB):
                kt[hj // ((total + JB - 1) // JB), d, hj % ((total + JB - 1) // JB) * JB + jj] = T.if_then_else(
                    hj % ((total + JB - 1) // JB) * JB + jj < total,
                    k[0, hj // ((total + JB - 1) // JB), T.min(hj % ((total + JB - 1) // JB) * JB + jj, C - 1), d],
                    T.float32(0))


def attn_scores(kv_heads: int, capacity: int, head_dim: int):
    """out[0, h, r, j] = q[0, h, r, :] . k[0, h, j, :] for j < ext[r % S] (R query rows per kv head: GQA groups x
    seq S; ext from `visible_extent`). Scores of keys past a row's extent are masked later, so they are not computed
    (left unwritten): that is the causal half of a prefill.

    The valid keys are first transposed into a [D, keys] workspace per head, so that a tile of RB query rows times
    JB keys is RB x JB/8 vector accumulators updated by broadcast FMAs (no horizontal sums per score)."""
    H, C, D = kv_heads, capacity, head_dim
    JB, RB = 16, 4

    @T.prim_func(private=True)
    def attn_scores(q_h: T.handle, k: T.Buffer((1, H, C, D), "float32"), ext_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "llamac.kernel": "attn_scores", "op_pattern": OPAQUE})
        R = T.int64()
        S = T.int64()
        total = T.int64()
        q = T.match_buffer(q_h, (1, H, R, D), "float32")
        ext = T.match_buffer(ext_h, (S,), "int64")
        out = T.match_buffer(out_h, (1, H, R, total), "float32")
        kt = T.alloc_buffer((H, D, (total + JB - 1) // JB * JB), "float32")
        transpose_keys(k, kt, total, H, C, D, JB)
        for hr in T.parallel(H * ((R + RB - 1) // RB)):
            acc = T.alloc_buffer((RB, JB), "float32", scope="local")
            h = hr // ((R + RB - 1) // RB)
            r0 = hr % ((R + RB - 1) // RB) * RB
            hi = T.alloc_buffer((1,), "int64", scope="local")
            tile_extent(hi, ext, r0, R, S, RB)
            for jb in range((hi[0] + JB - 1) // JB):
                for t in T.unroll(RB):
                    for jj in T.vectorized(JB):
                        acc[t, jj] = T.float32(0)
                for d in range(D):
                    for t in T.unroll(RB):
                        for jj in T.vectorized(JB):
                            acc[t, jj] = acc[t, jj] + q[0, h, T.min(r0 + t, R - 1), d] * kt[h, d, jb * JB + jj]
                for t in T.unroll(RB):
                    if r0 + t < R:
                        if jb * JB + JB <= total:
                            for jj in T.vectorized(JB):
                                out[0, h, r0 + t, jb * JB + jj] = acc[t, jj]
                        else:
                            for jj in range(JB):
                                if jb * JB + jj < total:
                                    out[0, h, r0 + t, jb * JB + jj] = acc[t, jj]

    return attn_scores


def attn_values(kv_heads: int, capacity: int, head_dim: int):
    """out[0, h, r, :] = sum_j p[0, h, r, j] * v[0, h, j, :] for j < ext[r % S] (p is 0 past a row's extent: those
    keys are masked); tasks of RB rows x DC columns (RB x DC/8 vector accumulators, each loaded V row feeding RB
    rows)."""
    H, C, D = kv_heads, capacity, head_dim
    RB = 2
    DC = 32 if D % 32 == 0 else D
    ND = D // DC

    @T.prim_func(private=True)
    def attn_values(p_h: T.handle, v: T.Buffer((1, H, C, D), "float32"), ext_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "llamac.kernel": "attn_values", "op_pattern": OPAQUE})
        R = T.int64()
        S = T.int64()
        total = T.int64()
        p = T.match_buffer(p_h, (1, H, R, total), "float32")
        ext = T.match_buffer(ext_h, (S,), "int64")
        out = T.match_buffer(out_h, (1, H, R, D), "float32")
        for task in T.parallel(H * ((R + RB - 1) // RB) * ND):
            acc = T.alloc_buffer((RB, DC), "float32", scope="local")
            h = task // (((R + RB - 1) // RB) * ND)
            r0 = task // ND % ((R + RB - 1) // RB) * RB
            c0 = task % ND * DC
            hi = T.alloc_buffer((1,), "int64", scope="local")
            tile_extent(hi, ext, r0, R, S, RB)
            for t in T.unroll(RB):
                for c in T.vectorized(DC):
                    acc[t, c] = T.float32(0)
            for j in range(hi[0]):
                for t in T.unroll(RB):
                    for c in T.vectorized(DC):
                        acc[t, c] = acc[t, c] + p[0, h, T.min(r0 + t, R - 1), j] * v[0, h, j, c0 + c]
            for t in T.unroll(RB):
                if r0 + t < R:
                    for c in T.vectorized(DC):
                        out[0, h, r0 + t, c0 + c] = acc[t, c]

    return attn_values


def attention(kv_heads: int, capacity: int, head_dim: int):
    """out[0, h, r, :] = softmax_j(where(visible[r % S, j], q[0, h, r, :] . k[0, h, j, :], f32 min)) . v[0, h, j, :]
    over j < total: scores, masked softmax and P.V in one pass over the keys (online softmax), so that no score
    matrix is written or read back; keys past the tile's extents (`visible_extent`) are skipped.

    A task is RB query rows of one kv head (GQA: the rows of its query heads share every K and V load). Per block of
    JB keys: RB x JB scores (prefill: broadcast FMAs on keys transposed once per call, as in `attn_scores`; decode:
    dot products with the key rows, since transposing the whole cache every step would cost more than the step's
    attention), the running max and sum per row, then acc = acc * exp(old max - new max) + p . V in chunks of DV
    columns kept in registers."""
    H, C, D = kv_heads, capacity, head_dim
    RB, JB = 4, 16
    DV = 16 if D % 16 == 0 else D
    DIRECT = D % 8 == 0              # decode computes scores from the key rows (8-lane products)

    @T.macro
    def task(q, k, v, vis, ext, out, kt, hr, R, S, total, direct):
        sc = T.alloc_buffer((RB, JB), "float32", scope="local")
        acc = T.alloc_buffer((RB, D), "float32", scope="local")
        part = T.alloc_buffer((RB, DV), "float32", scope="local")
        m = T.alloc_buffer((8,), "float32", scope="local")       # running max per row (lanes past RB unused)
        mnew = T.alloc_buffer((8,), "float32", scope="local")
        alpha = T.alloc_buffer((8,), "float32", scope="local")
        lsum = T.alloc_buffer((RB,), "float32", scope="local")
        hi = T.alloc_buffer((1,), "int64", scope="local")
        h = hr // ((R + RB - 1) // RB)
        r0 = hr % ((R + RB - 1) // RB) * RB
        tile_extent(hi, ext, r0, R, S, RB)
        m[0:8] = _bc(LOW)
        mnew[0:8] = _bc(LOW)
        for t in T.unroll(RB):
            lsum[t] = T.float32(0)
            for d in T.vectorized(D):
                acc[t, d] = T.float32(0)
        for jb in range((hi[0] + JB - 1) // JB):
            for t in T.unroll(RB):
                for jj in T.vectorized(JB):
                    sc[t, jj] = T.float32(0)
            if direct:      # one query row per head: dot products with the key rows, no transposed copy
                for jj in range(JB):
                    for t in T.unroll(RB):
                        sc[t, jj] = _hsum8(_dot8(q, k, h, T.min(r0 + t, R - 1), T.min(jb * JB + jj, total - 1), D))
            else:
                for d in range(D):
                    for t in T.unroll(RB):
                        for jj in T.vectorized(JB):
                            sc[t, jj] = sc[t, jj] + q[0, h, T.min(r0 + t, R - 1), d] * kt[h, d, jb * JB + jj]
            for t in T.unroll(RB):
                if jb * JB + JB <= total:
                    for j8 in T.unroll(JB // 8):
                        sc[t, j8 * 8:j8 * 8 + 8] = T.Select(
                            vis.vload([0, T.min(r0 + t, R - 1) % S, jb * JB + j8 * 8], "boolx8"),
                            sc.vload([t, j8 * 8], "float32x8"), _bc(LOW))
                else:
                    for jj in range(JB):
                        sc[t, jj] = T.Select(jb * JB + jj < total and vis[
                            0, T.min(r0 + t, R - 1) % S, T.min(jb * JB + jj, total - 1)], sc[t, jj], T.float32(LOW))
                mnew[t] = m[t]
                for jj in range(JB):
                    mnew[t] = T.max(mnew[t], sc[t, jj])
            alpha[0:8] = _exp8(m.vload([0], "float32x8") - mnew.vload([0], "float32x8"))
            for t in T.unroll(RB):
                for j8 in T.unroll(JB // 8):
                    sc[t, j8 * 8:j8 * 8 + 8] = _exp8(sc.vload([t, j8 * 8], "float32x8") - T.broadcast(mnew[t], 8))
                lsum[t] = lsum[t] * alpha[t]
                for jj in range(T.min(JB, total - jb * JB)):   # past total, p is exp(0) in a row that sees none
                    lsum[t] = lsum[t] + sc[t, jj]
                m[t] = mnew[t]
            for dc in range(D // DV):
                for t in T.unroll(RB):
                    for c in T.vectorized(DV):
                        part[t, c] = acc[t, dc * DV + c] * alpha[t]
                for jj in range(T.min(JB, total - jb * JB)):     # keys past total: never read (not even p = 0)
                    for t in T.unroll(RB):
                        for c in T.vectorized(DV):
                            part[t, c] = part[t, c] + sc[t, jj] * v[0, h, jb * JB + jj, dc * DV + c]
                for t in T.unroll(RB):
                    for c in T.vectorized(DV):
                        acc[t, dc * DV + c] = part[t, c]
        for t in T.unroll(RB):
            if r0 + t < R:
                for d in T.vectorized(D):
                    out[0, h, r0 + t, d] = acc[t, d] / lsum[t]

    @T.macro(hygienic=False)
    def row_tile(hr, task=task):    # prefill: RB query rows of one kv head
        task(q, k, v, vis, ext, out, kt, hr, R, S, total, False)

    @T.prim_func(private=True)
    def attention(q_h: T.handle, k: T.Buffer((1, H, C, D), "float32"), v: T.Buffer((1, H, C, D), "float32"),
                  vis_h: T.handle, ext_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "llamac.kernel": "attention", "op_pattern": OPAQUE})
        R = T.int64()
        S = T.int64()
        total = T.int64()
        q = T.match_buffer(q_h, (1, H, R, D), "float32")
        vis = T.match_buffer(vis_h, (1, S, total), "bool")
        ext = T.match_buffer(ext_h, (S,), "int64")
        out = T.match_buffer(out_h, (1, H, R, D), "float32")
        if S == 1 and DIRECT:       # decode
            for hr in T.parallel(H * ((R + RB - 1) // RB)):
                task(q, k, v, vis, ext, out, k, hr, R, S, total, True)
        else:
            kt = T.alloc_buffer((H, D, (total + JB - 1) // JB * JB), "float32")
            transpose_keys(k, kt, total, H, C, D, JB)
            for_each_task(H * ((R + RB - 1) // RB), row_tile)

    return attention


def _dot8(q, k, h, row, key, d: int):
    """q[0, h, row, :] . k[0, h, key, :] as the 8 lanes of a vector sum of products (d a multiple of 8)."""
    parts = [q.vload([0, h, row, i], "float32x8") * k.vload([0, h, key, i], "float32x8") for i in range(0, d, 8)]
    while len(parts) > 1:       # a tree: independent multiply-adds
        parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def _hsum8(v):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.vector.reduce.fadd"), T.float32(0), v,
                                   dtype="float32")


def _bc(value: float, dtype: str = "float32"):
    return T.broadcast(T.float32(value) if dtype == "float32" else T.int32(value), 8)


def _exp8(x):
    """exp of 8 lanes of x <= 0, as vector arithmetic (libm's expf would be called lane by lane): 2^n * 2^f with
    n = rint(x log2 e), |f| <= 1/2 and 2^f by its degree-7 Taylor polynomial (relative error < 1e-8); 0 below -87."""
    t = T.max(x, _bc(-87.0)) * _bc(1.4426950408889634)
    n = T.nearbyint(t)
    f = (t - n) * _bc(0.6931471805599453)
    p = _bc(1.0 / 5040)
    for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * f + _bc(c)
    scale = T.reinterpret(T.shift_left(T.Cast("int32x8", n) + _bc(127, "int32"), _bc(23, "int32")),
                          dtype="float32x8")
    return T.Select(x < _bc(-87.0), _bc(0.0), p * scale)


def _sigmoid8(x):
    """1 / (1 + exp(-x)) on 8 lanes, from e = exp(-|x|) <= 1 so that nothing overflows."""
    e = _exp8(T.min(x, _bc(0.0) - x))
    return T.Select(x >= _bc(0.0), _bc(1.0) / (_bc(1.0) + e), e / (_bc(1.0) + e))


def visible_extent():
    """ext[s] = 1 + the last key that query row s may see, for visible [1, S, total] (total when it sees none: such
    a row's softmax is uniform over all keys). Keys past a row's extent are masked, so the attention kernels skip
    them: for a causal mask, half of a prefill's attention."""

    # s_tir with a root block: Relax asks every one-input kernel whether it is a reshape, by reading its blocks
    @T.prim_func(private=True, s_tir=True)
    def visible_extent(vis_h: T.handle, ext_h: T.handle):
        T.func_attr({"tirx.noalias": True, "llamac.kernel": "visible_extent", "op_pattern": OPAQUE})
        S = T.int64()
        total = T.int64()
        vis = T.match_buffer(vis_h, (1, S, total), "bool")
        ext = T.match_buffer(ext_h, (S,), "int64")
        with T.sblock("root"):
            n = T.sblock_alloc_buffer((1,), "int64", scope="local")
            for s in range(S):      # causal: S - s steps back per row, too little for a thread-pool launch
                n[0] = total
                while n[0] > 0 and not vis[0, s, T.max(n[0] - 1, 0)]:
                    n[0] = n[0] - 1
                ext[s] = T.if_then_else(n[0] == 0, total, n[0])

    return visible_extent


def all_keys():
    """ext[s] = total for ids [1, S]: the extents when the compiler cannot see the graph's mask (nothing skipped)."""

    @T.prim_func(private=True, s_tir=True)
    def all_keys(ids_h: T.handle, total: T.int64, ext_h: T.handle):
        T.func_attr({"tirx.noalias": True, "llamac.kernel": "all_keys", "op_pattern": OPAQUE})
        S = T.int64()
        ids = T.match_buffer(ids_h, (1, S), "int64")
        ext = T.match_buffer(ext_h, (S,), "int64")
        with T.sblock("root"):
            for s in range(S):
                ext[s] = total

    return all_keys


def masked_softmax(rows: int):
    """out = softmax(where(visible, scores, f32 min), axis=-1) for scores [1, rows, S, T], visible [1, S, T] (the
    attention mask, shared by all rows) and ext [S] from `visible_extent`: 8-lane passes for the max, exp and sum,
    and the scaling, over the keys before the row's extent only (past it, out is 0 and scores are not read)."""
    R = rows

    @T.prim_func(private=True)
    def masked_softmax(s_h: T.handle, vis_h: T.handle, ext_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "llamac.kernel": "masked_softmax", "op_pattern": OPAQUE})
        S = T.int64()
        total = T.int64()
        sc = T.match_buffer(s_h, (1, R, S, total), "float32")
        vis = T.match_buffer(vis_h, (1, S, total), "bool")
        ext = T.match_buffer(ext_h, (S,), "int64")
        out = T.match_buffer(out_h, (1, R, S, total), "float32")
        for rs in T.parallel(R * S):
            acc = T.alloc_buffer((8,), "float32", scope="local")
            tail = T.alloc_buffer((8,), "float32", scope="local")   # the last e % 8 scores, padded with LOW
            r = rs // S
            s = rs % S
            e = ext[s]
            for v in range(8):
                tail[v] = T.float32(LOW)
            for j in range(e // 8 * 8, e):
                tail[j % 8] = T.Select(vis[0, s, j], sc[0, r, s, j], T.float32(LOW))
            acc[0:8] = tail.vload([0], "float32x8")
            for j0 in range(e // 8):
                acc[0:8] = T.max(acc.vload([0], "float32x8"), T.Select(
                    vis.vload([0, s, j0 * 8], "boolx8"), sc.vload([0, r, s, j0 * 8], "float32x8"), _bc(LOW)))
            for v in range(1, 8):
                acc[0] = T.max(acc[0], acc[v])
            m = T.alloc_buffer((1,), "float32", scope="local")
            m[0] = acc[0]
            acc[0:8] = _bc(0.0)
            for j0 in range(e // 8):
                out[0, r, s, j0 * 8:j0 * 8 + 8] = _exp8(T.Select(
                    vis.vload([0, s, j0 * 8], "boolx8"), sc.vload([0, r, s, j0 * 8], "float32x8"), _bc(LOW))
                    - T.broadcast(m[0], 8))
                acc[0:8] = acc.vload([0], "float32x8") + out.vload([0, r, s, j0 * 8], "float32x8")
            tail[0:8] = _exp8(tail.vload([0], "float32x8") - T.broadcast(m[0], 8))
            for j in range(e // 8 * 8, e):
                out[0, r, s, j] = tail[j % 8]
                acc[0] = acc[0] + tail[j % 8]
            for v in range(1, 8):
                acc[0] = acc[0] + acc[v]
            for j0 in range(e // 8):
                out[0, r, s, j0 * 8:j0 * 8 + 8] = out.vload([0, r, s, j0 * 8], "float32x8") * T.broadcast(
                    T.float32(1) / acc[0], 8)
            for j in range(e // 8 * 8, e):
                out[0, r, s, j] = out[0, r, s, j] * (T.float32(1) / acc[0])
            for j in range(e, T.min((e + 7) // 8 * 8, total)):
                out[0, r, s, j] = T.float32(0)
            for j0 in range((e + 7) // 8, total // 8):
                out[0, r, s, j0 * 8:j0 * 8 + 8] = _bc(0.0)
            for j in range(T.max(total // 8 * 8, (e + 7) // 8 * 8), total):
                out[0, r, s, j] = T.float32(0)

    return masked_softmax


@T.macro
def rms_norm_row(a, b, x, w, y, s, W, eps, residual):
    """Row s of [1, S, W]: y = x / sqrt(mean(x^2) + eps) * w, with x = a + b written first when `residual`."""
    acc = T.alloc_buffer((8,), "float32")
    r = T.alloc_buffer((1,), "float32")
    acc[0:8] = _bc(0.0)
    for i in range(W // 8):
        if residual:
            x[0, s, i * 8:i * 8 + 8] = a.vload([0, s, i * 8], "float32x8") + b.vload([0, s, i * 8], "float32x8")
        acc[0:8] = acc.vload([0], "float32x8") + x.vload([0, s, i * 8], "float32x8") * x.vload(
            [0, s, i * 8], "float32x8")
    r[0] = _hsum8(acc.vload([0], "float32x8"))
    for i in range(W // 8 * 8, W):
        if residual:
            x[0, s, i] = a[0, s, i] + b[0, s, i]
        r[0] = r[0] + x[0, s, i] * x[0, s, i]
    r[0] = T.sqrt(r[0] / T.float32(W) + T.float32(eps))
    for i in range(W // 8):
        y[0, s, i * 8:i * 8 + 8] = x.vload([0, s, i * 8], "float32x8") / T.broadcast(r[0], 8) * w.vload(
            [i * 8], "float32x8")
    for i in range(W // 8 * 8, W):
        y[0, s, i] = x[0, s, i] / r[0] * w[i]


def rms_norm(width: int, eps: float, residual: bool):
    """The exporter's RMSNorm over each row of [1, S, width], in f32: y = x / sqrt(mean(x^2) + eps) * w. With
    `residual`, x = a + b first (the residual add in front of every norm but the first) and x is a second output,
    the stream the next block adds to. One kernel where the generic path runs three (the add, x * x, the rest) and a
    VM allocation for each; 8 lanes at a time, and one row needs no thread-pool launch."""
    W = width

    @T.macro
    def row(a, b, x, w, y, s):
        rms_norm_row(a, b, x, w, y, s, W, eps, residual)

    attrs = {"tirx.noalias": True, "llamac.kernel": "rms_norm", "op_pattern": OPAQUE}
    if residual:
        @T.prim_func(private=True)
        def add_rms_norm(a_h: T.handle, b_h: T.handle, w: T.Buffer((W,), "float32"), x_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            S = T.int64()
            a = T.match_buffer(a_h, (1, S, W), "float32")
            b = T.match_buffer(b_h, (1, S, W), "float32")
            x = T.match_buffer(x_h, (1, S, W), "float32")
            y = T.match_buffer(y_h, (1, S, W), "float32")
            if S == 1:
                row(a, b, x, w, y, T.int64(0))
            else:
                for s in T.parallel(S):
                    row(a, b, x, w, y, s)

        return add_rms_norm

    @T.prim_func(private=True)
    def rms_norm(x_h: T.handle, w: T.Buffer((W,), "float32"), y_h: T.handle):
        T.func_attr(attrs)
        S = T.int64()
        x = T.match_buffer(x_h, (1, S, W), "float32")
        y = T.match_buffer(y_h, (1, S, W), "float32")
        if S == 1:
            row(x, x, x, w, y, T.int64(0))
        else:
            for s in T.parallel(S):
                row(x, x, x, w, y, s)

    return rms_norm


@T.macro
def silu_mul_row(g, u, o, s, so, F):
    """o[0, so, :F] = g * sigmoid(g) * u of row s of g, u [1, S, F] (o: [1, S', F]), 8 lanes at a time."""
    for f0 in range(F // 8):
        o[0, so, f0 * 8:f0 * 8 + 8] = (g.vload([0, s, f0 * 8], "float32x8") * u.vload([0, s, f0 * 8], "float32x8")
                                       * _sigmoid8(g.vload([0, s, f0 * 8], "float32x8")))
    for f in range(F // 8 * 8, F):
        o[0, so, f] = g[0, s, f] * u[0, s, f] * T.sigmoid(g[0, s, f])


def silu_mul(width: int):
    """out = gate * sigmoid(gate) * up for [1, S, width] (SwiGLU's middle): sigmoid from _exp8 of -|gate| (never
    overflows), 8 lanes at a time; one row needs no thread-pool launch."""
    F = width

    @T.macro
    def row(g, u, o, s):
        silu_mul_row(g, u, o, s, s, F)

    @T.prim_func(private=True)
    def silu_mul(g_h: T.handle, u_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "llamac.kernel": "silu_mul", "op_pattern": OPAQUE})
        S = T.int64()
        g = T.match_buffer(g_h, (1, S, F), "float32")
        u = T.match_buffer(u_h, (1, S, F), "float32")
        o = T.match_buffer(o_h, (1, S, F), "float32")
        if S == 1:
            row(g, u, o, T.int64(0))
        else:
            for s in T.parallel(S):
                row(g, u, o, s)

    return silu_mul
