"""Int8 dot-product kernels for q4/q8 linear layers: activations quantized on the fly, integer multiply-adds.

On CPUs with byte dot products (AVX2 `vpmaddubsw`, AVX-512 VNNI `vpdpbusd`, Arm `sdot`) a quantized linear layer is
cheapest as an integer dot product: the input row is quantized to int8 in blocks of 32 (one f32 scale per block,
computed in the kernel), multiplied with the integer weight codes in 32-bit (or 16-bit, AVX2 q4) accumulators, and
scaled to f32 once per block. Four to eight times fewer instructions per weight than dequantizing to f32, and it is
the math llama.cpp's Q4_0/Q8_0 use. The result is exactly

    y[s, n] = sum_blocks  dx[s, a] * s_w[n, g(a)] * sum_{k in a} xq[s, k] * q[n, k]      (q4: q = code - 8)

with xq = rint(x * 127 / max|x over the block|), dx = max|x| / 127 (tests/test_quantize.py checks this in numpy).

Weight layout ("dot", packed by `llamac.quantize`): channel tile b holds 8 output channels; in each weight column a
32-byte word holds 4 consecutive inputs per channel, so one broadcast of 4 activation bytes feeds 8 outputs.
  q8: byte 4*c + j of column t = input 4*t + j of channel c (int8)
  q4: low nibble of byte 4*c + j of column t = input 8*t + j, high nibble = input 8*t + 4 + j (uint8, codes value + 8)
TI = lanes / 8 tiles (`dot_lanes`: the target's `dot_tiles` when N allows) are stored side by side, so that a decode
task reads one stream:
  q [N/8/TI, KP/4 (q8) or KP/8 (q4), 32*TI], scales [N/8/TI, G, 8*TI]; KP = K rounded up to the weight group (or 32).
"""
from __future__ import annotations

from tvm.script import tirx as T

from llamac.quantize import Scheme, dot_padded_k
from llamac.targets import DOT_ISAS
from llamac.tvm_kernels import for_each_chunk, for_each_task, group_kernel, rms_norm_row, silu_mul_row, tile_scope

OPAQUE = 8      # relax OpPatternKind kOpaque
BLOCK = 32      # inputs per activation scale
LANES = 8       # output channels per tile


def supports(scheme: Scheme, k: int, n: int) -> bool:
    """Whether the dot layout applies: int weights, 8 | N, weight groups a multiple of the activation block."""
    return scheme.kind == "int" and n % LANES == 0 and (scheme.group_size is None or scheme.group_size % BLOCK == 0)


def _decode_tiles(nb: int, ti: int, most: int) -> int:
    """Channel tiles per decode task: up to `most` (whole interleave groups), keeping at least two tasks. More tiles
    per task = more cache lines in flight per step; decode is bound by memory latency, not by arithmetic."""
    for m in (4, 2, 1):
        if ti * m <= most and nb % (ti * m) == 0 and nb // (ti * m) >= 2:
            return ti * m
    return ti


def _abs8(v):
    return T.max(v, T.broadcast(T.float32(0), 8) - v)


def _wload(w, tile, ti, col, byte, dtype: str):
    """A vector of the weights of channel tile `tile` (dot layout, `ti` tiles interleaved) at column `col`."""
    return w.vload([tile // ti, col, tile % ti * 32 + byte], dtype)


def _xbcast(xq32, row, word, copies: int):
    """Four activation bytes (one int32 word of the quantized row) repeated over a vector of 4 * copies bytes."""
    return T.reinterpret(T.broadcast(xq32[row, word], copies), dtype=f"int8x{4 * copies}")


def _pmaddubsw(u8, i8):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), u8, i8, dtype="int16x16")


def _pmaddwd(a, b):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a, b, dtype="int32x8")


def _psign(a, b):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"), a, b, dtype="int8x32")


def _vpdpbusd(acc, u8, i8, lanes: int = 8):
    """acc + the sums of four u8 x i8 products per int32 lane (AVX-512 VNNI; 8 lanes: one tile, 16: two)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"), acc, u8, i8,
                                   dtype=f"int32x{lanes}")


def _q4_vpdpbusd(acc, w, tile, ti, col, xq32, row, word, lanes: int):
    """acc + the products of one q4 weight column (both nibbles) of `lanes` / 8 tiles with activation words `word`
    (low nibbles) and `word` + 1 (high ones); the codes are unsigned, vpdpbusd's u8 operand as they are."""
    codes = _wload(w, tile, ti, col, 0, f"uint8x{4 * lanes}")
    return _vpdpbusd(_vpdpbusd(acc, T.bitwise_and(codes, T.broadcast(T.uint8(15), 4 * lanes)),
                               _xbcast(xq32, row, word, lanes), lanes),
                     T.shift_right(codes, T.broadcast(T.uint8(4), 4 * lanes)), _xbcast(xq32, row, word + 1, lanes),
                     lanes)


def _q8_signed(w, tile, ti, col, xq32, row, word):
    """One q8 weight column and activation word as the x86 byte products need them: the sign moved onto the
    weights, |x| (u8) and sign(x) * w (i8)."""
    x = _xbcast(xq32, row, word, 8)
    return _psign(x, x), _psign(_wload(w, tile, ti, col, 0, "int8x32"), x)


def _sdot(acc, a, b):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), acc, a, b,
                                   dtype="int32x4")


def linear(scheme: Scheme, k: int, n: int, isa: str, lanes: int, gated: bool = False):
    """y[1, S, N] = x[1, S, K] @ W for W in the dot layout (`lanes` channels side by side); `isa` is a DOT_ISAS key.
    gated: the kernel takes SwiGLU's gate and up [1, S, K] instead of x, x = gate * sigmoid(gate) * up
    (`tvm_kernels.silu_mul`'s math) computed where x is quantized: the down projection without a kernel of its own
    in front of it."""
    return linear_group(scheme, k, (n,), isa, (lanes,), gated)


def linear_group(scheme: Scheme, k: int, ns: tuple[int, ...], isa: str, lanes: tuple[int, ...],
                 gated: bool = False, norm_eps: float | None = None):
    """y_i[1, S, N_i] = x[1, S, K] @ W_i for one to three weights in the dot layout that share their input (q, k, v;
    gate, up): x is quantized once and one parallel loop runs the tiles of every weight, one thread-pool launch
    instead of one per weight (q, k and v of the 123M model: 36 -> 28 us per decode step and layer).
    norm_eps: x is the residual add and RMSNorm in front (`tvm_kernels.rms_norm`'s math) of inputs a, b [1, S, K]
    and the norm's weight [K]: h = a + b and x come out first, then the y_i (no norm kernel in front)."""
    assert isa in DOT_ISAS and 1 <= len(ns) == len(lanes) <= 3 and all(supports(scheme, k, n) for n in ns)
    assert not gated or (len(ns) == 1 and norm_eps is None)
    normed = norm_eps is not None
    K = k
    KP = dot_padded_k(scheme, K)
    NA = KP // BLOCK                     # activation blocks
    GS = scheme.group_size or KP
    G = KP // GS
    APG = GS // BLOCK                    # activation blocks per weight group
    q4 = scheme.bits == 4
    WCOLS = KP // 8 if q4 else KP // 4
    wdtype = "uint8" if q4 else "int8"
    sdt = scheme.scale_dtype
    avx2, vnni = isa == "avx2", isa == "vnni"
    # VNNI q4 decode takes two tiles (side by side in memory) per 512-bit instruction: fewer instructions, +2-3 %
    wide = vnni and q4 and all(ln % 16 == 0 for ln in lanes)
    TBP = 4                              # prefill tile: 4 rows x NTP channel tiles
    # per weight: channel tiles, tiles stored side by side (w[tile // TI, col, tile % TI * 32 + byte]), tiles per
    # decode task and per prefill task, and the tasks of each weight, which follow those of the one before
    NB = [n // LANES for n in ns]
    TI = [ln // LANES for ln in lanes]
    NTD = [_decode_tiles(nb, ti, 8 if isa == "sdot" else 16) for nb, ti in zip(NB, TI)]
    NTP = [min(ti, 2) for ti in TI]
    DT = [nb // t for nb, t in zip(NB, NTD)]
    PT = [nb // t for nb, t in zip(NB, NTP)]

    @T.macro
    def block_dot(w, xq32, isum, nt, a, r0, S, TB, NT, TI):
        # isum[t, b, 0:8] = sum over activation block a of xq[row t] * code[channel tile b] (int32)
        if avx2 and q4:
            a16 = T.alloc_buffer((TB, NT, 16), "int16", scope=tile_scope(TB))
            for t in T.unroll(TB):
                for b in T.unroll(NT):
                    a16[t, b, T.ramp(0, 1, 16)] = T.broadcast(T.int16(0), 16)
            for c in T.unroll(4):       # 16-bit sums of 8 products stay below 8 * 2 * 15 * 127 < 2^15
                for t in T.unroll(TB):
                    for b in T.unroll(NT):
                        a16[t, b, T.ramp(0, 1, 16)] = a16[t, b, T.ramp(0, 1, 16)] + _pmaddubsw(
                            T.bitwise_and(_wload(w, nt * NT + b, TI, a * 4 + c, 0, "uint8x32"),
                                          T.broadcast(T.uint8(15), 32)),
                            _xbcast(xq32, T.min(r0 + t, S - 1), a * 8 + c * 2, 8)) + _pmaddubsw(
                            T.shift_right(_wload(w, nt * NT + b, TI, a * 4 + c, 0, "uint8x32"),
                                          T.broadcast(T.uint8(4), 32)),
                            _xbcast(xq32, T.min(r0 + t, S - 1), a * 8 + c * 2 + 1, 8))
            for t in T.unroll(TB):
                for b in T.unroll(NT):
                    isum[t, b, T.ramp(0, 1, 8)] = _pmaddwd(a16[t, b, T.ramp(0, 1, 16)],
                                                           T.broadcast(T.int16(1), 16))
        else:       # 32-bit sums
            for t in T.unroll(TB):
                for b in T.unroll(NT):
                    isum[t, b, T.ramp(0, 1, 8)] = T.broadcast(T.int32(0), 8)
            for c in T.unroll(4 if q4 else 8):
                for t in T.unroll(TB):
                    for b in T.unroll(NT):
                        if wide and TB == 1:
                            if b % 2 == 0:      # tiles b and b + 1 at once: their rows of isum are adjacent
                                isum[t, b, T.ramp(0, 1, 16)] = _q4_vpdpbusd(
                                    isum[t, b, T.ramp(0, 1, 16)], w, nt * NT + b, TI, a * 4 + c, xq32,
                                    T.min(r0 + t, S - 1), a * 8 + c * 2, 16)
                        elif vnni and q4:
                            isum[t, b, T.ramp(0, 1, 8)] = _q4_vpdpbusd(
                                isum[t, b, T.ramp(0, 1, 8)], w, nt * NT + b, TI, a * 4 + c, xq32,
                                T.min(r0 + t, S - 1), a * 8 + c * 2, 8)
                        elif vnni:
                            isum[t, b, T.ramp(0, 1, 8)] = _vpdpbusd(isum[t, b, T.ramp(0, 1, 8)], *_q8_signed(
                                w, nt * NT + b, TI, a * 8 + c, xq32, T.min(r0 + t, S - 1), a * 8 + c))
                        elif avx2:
                            isum[t, b, T.ramp(0, 1, 8)] = isum[t, b, T.ramp(0, 1, 8)] + _pmaddwd(_pmaddubsw(
                                *_q8_signed(w, nt * NT + b, TI, a * 8 + c, xq32, T.min(r0 + t, S - 1), a * 8 + c)),
                                T.broadcast(T.int16(1), 16))
                        else:
                            for h in T.unroll(2):       # sdot: two 128-bit halves, channels 0-3, 4-7
                                if q4:
                                    isum[t, b, T.ramp(h * 4, 1, 4)] = _sdot(_sdot(
                                        isum[t, b, T.ramp(h * 4, 1, 4)],
                                        T.reinterpret(T.bitwise_and(
                                            _wload(w, nt * NT + b, TI, a * 4 + c, h * 16, "uint8x16"),
                                            T.broadcast(T.uint8(15), 16)), dtype="int8x16"),
                                        _xbcast(xq32, T.min(r0 + t, S - 1), a * 8 + c * 2, 4)),
                                        T.reinterpret(T.shift_right(
                                            _wload(w, nt * NT + b, TI, a * 4 + c, h * 16, "uint8x16"),
                                            T.broadcast(T.uint8(4), 16)), dtype="int8x16"),
                                        _xbcast(xq32, T.min(r0 + t, S - 1), a * 8 + c * 2 + 1, 4))
                                else:
                                    isum[t, b, T.ramp(h * 4, 1, 4)] = _sdot(
                                        isum[t, b, T.ramp(h * 4, 1, 4)],
                                        _wload(w, nt * NT + b, TI, a * 8 + c, h * 16, "int8x16"),
                                        _xbcast(xq32, T.min(r0 + t, S - 1), a * 8 + c, 4))

    @T.macro
    def tile(w, sc, xq32, dx, xs8, y, nt, r0, S, TB, NT, TI):
        acc = T.alloc_buffer((TB, NT, 8), "float32", scope=tile_scope(TB))
        gacc = T.alloc_buffer((TB, NT, 8), "float32", scope=tile_scope(TB))
        isum = T.alloc_buffer((TB, NT, 8), "int32", scope=tile_scope(TB))
        for t in T.unroll(TB):
            for b in T.unroll(NT):
                acc[t, b, T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
        for g in range(G):
            for t in T.unroll(TB):
                for b in T.unroll(NT):
                    gacc[t, b, T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
            for ab in range(APG):
                block_dot(w, xq32, isum, nt, g * APG + ab, r0, S, TB, NT, TI)
                for t in T.unroll(TB):
                    for b in T.unroll(NT):
                        gacc[t, b, T.ramp(0, 1, 8)] = gacc[t, b, T.ramp(0, 1, 8)] + T.Cast(
                            "float32x8", isum[t, b, T.ramp(0, 1, 8)] - T.broadcast(
                                xs8[T.min(r0 + t, S - 1), g * APG + ab], 8)) * T.broadcast(
                            dx[T.min(r0 + t, S - 1), g * APG + ab], 8)
            for t in T.unroll(TB):
                for b in T.unroll(NT):
                    acc[t, b, T.ramp(0, 1, 8)] = acc[t, b, T.ramp(0, 1, 8)] + gacc[t, b, T.ramp(0, 1, 8)] * T.Cast(
                        "float32x8", sc.vload([(nt * NT + b) // TI, g, (nt * NT + b) % TI * 8], sdt + "x8"))
        for t in T.unroll(TB):
            if r0 + t < S:
                for b in T.unroll(NT):
                    y[r0 + t, T.ramp((nt * NT + b) * 8, 1, 8)] = acc[t, b, T.ramp(0, 1, 8)]

    @T.macro
    def quantize_row(x, xq, dx, xs8, r):
        # xq = rint(x * 127 / max|x|) per block of 32 inputs (zero past K); dx = max|x| / 127; q4: xs8 = 8 * sum(xq)
        for a in range(NA):
            m = T.alloc_buffer((8,), "float32")
            s = T.alloc_buffer((8,), "int32")
            if (a + 1) * BLOCK <= K:        # a whole block: four 8-lane vectors
                m[0:8] = T.max(T.max(_abs8(x.vload([r, a * BLOCK], "float32x8")),
                                     _abs8(x.vload([r, a * BLOCK + 8], "float32x8"))),
                               T.max(_abs8(x.vload([r, a * BLOCK + 16], "float32x8")),
                                     _abs8(x.vload([r, a * BLOCK + 24], "float32x8"))))
                for v in range(1, 8):
                    m[0] = T.max(m[0], m[v])
                s[0:8] = T.broadcast(T.int32(0), 8)
                for i in T.unroll(4):
                    s[0:8] = s.vload([0], "int32x8") + T.Cast("int32x8", T.nearbyint(
                        x.vload([r, a * BLOCK + i * 8], "float32x8") * T.broadcast(
                            T.if_then_else(m[0] > T.float32(0), T.float32(127) / m[0], T.float32(0)), 8)))
                    xq[r, a * BLOCK + i * 8:a * BLOCK + i * 8 + 8] = T.Cast("int8x8", T.Cast("int32x8", T.nearbyint(
                        x.vload([r, a * BLOCK + i * 8], "float32x8") * T.broadcast(
                            T.if_then_else(m[0] > T.float32(0), T.float32(127) / m[0], T.float32(0)), 8))))
                for v in range(1, 8):
                    s[0] = s[0] + s[v]
            else:                           # the last, partial block: scalar, zero past K
                m[0] = T.float32(0)
                s[0] = 0
                for e in range(BLOCK):
                    if a * BLOCK + e < K:
                        m[0] = T.max(m[0], T.fabs(x[r, a * BLOCK + e]))
                for e in range(BLOCK):
                    xq[r, a * BLOCK + e] = T.Cast("int8", T.if_then_else(
                        a * BLOCK + e < K and m[0] > T.float32(0),
                        T.nearbyint(x[r, T.min(a * BLOCK + e, K - 1)] * (T.float32(127) / m[0])), T.float32(0)))
                    s[0] = s[0] + T.Cast("int32", xq[r, a * BLOCK + e])
            dx[r, a] = m[0] / T.float32(127)
            xs8[r, a] = s[0] * 8 if q4 else 0

    @T.macro(hygienic=False)
    def task(i, S1, TB, T0, T1, NT, tile=tile, TI=TI):
        # tiles i - T0[o] of weight o (tasks of NT[o] channel tiles), rows TB at a time: T0 = first task of each
        # weight, T1 = the one after the last; all the weights' buffers are the kernel's (w0, sc0, y0, ...)
        if i < T1[0]:
            for sb in range((S1 + TB - 1) // TB):
                tile(w0, sc0, xq32, dx, xs8, y0, i, sb * TB, S, TB, NT[0], TI[0])
        if len(TI) > 1:
            if T0[1] <= i and i < T1[1]:
                for sb in range((S1 + TB - 1) // TB):
                    tile(w1, sc1, xq32, dx, xs8, y1, i - T0[1], sb * TB, S, TB, NT[1], TI[1])
        if len(TI) > 2:
            if T0[2] <= i:
                for sb in range((S1 + TB - 1) // TB):
                    tile(w2, sc2, xq32, dx, xs8, y2, i - T0[2], sb * TB, S, TB, NT[2], TI[2])

    DT0, DT1 = [sum(DT[:o]) for o in range(len(ns))], [sum(DT[:o + 1]) for o in range(len(ns))]
    PT0, PT1 = [sum(PT[:o]) for o in range(len(ns))], [sum(PT[:o + 1]) for o in range(len(ns))]

    @T.macro(hygienic=False)
    def decode_task(i, task=task, DT0=DT0, DT1=DT1, NTD=NTD):     # decode: the one row
        task(i, T.int64(1), 1, DT0, DT1, NTD)

    @T.macro(hygienic=False)
    def prefill_task(i, task=task, PT0=PT0, PT1=PT1, NTP=NTP, TBP=TBP):      # prefill: every row, TBP at a time
        task(i, S, TBP, PT0, PT1, NTP)

    @T.macro(hygienic=False)
    def body(x3, quantize_row=quantize_row, decode_task=decode_task, prefill_task=prefill_task, K=K, KP=KP, NA=NA,
             DT=DT, PT=PT, gated=gated, normed=normed, norm_eps=norm_eps):
        x = T.decl_buffer((S, K), "float32", data=x3.data)
        xq = T.alloc_buffer((S, KP), "int8")
        xq32 = T.decl_buffer((S, KP // 4), "int32", data=xq.data)
        dx = T.alloc_buffer((S, NA), "float32")
        xs8 = T.alloc_buffer((S, NA), "int32")      # q4: 8 * sum of the block's xq (the codes' offset); q8: 0
        if S == 1:              # decode: one row, not worth a thread-pool launch
            if gated:
                silu_mul_row(g3, u3, x3, T.int64(0), T.int64(0), K)
            if normed:
                rms_norm_row(a3, b3, h3, nw, x3, T.int64(0), K, norm_eps, True)
            quantize_row(x, xq, dx, xs8, T.int64(0))
        else:
            for r in T.parallel(S):
                if gated:
                    silu_mul_row(g3, u3, x3, r, r, K)
                if normed:
                    rms_norm_row(a3, b3, h3, nw, x3, r, K, norm_eps, True)
                quantize_row(x, xq, dx, xs8, r)
        if S == 1:
            for_each_chunk(sum(DT), decode_task)
        else:
            for_each_task(T.int64(sum(PT)), prefill_task)

    def wshape(o):
        return NB[o] // TI[o], WCOLS, 32 * TI[o]

    def sshape(o):
        return NB[o] // TI[o], G, 8 * TI[o]

    attrs = {"tirx.noalias": True, "llamac.kernel": "linear", "op_pattern": OPAQUE}
    # TVMScript takes a fixed parameter list: one signature per variant and weight count, the same body
    if gated:
        @T.prim_func(private=True)
        def linear_dot(g_h: T.handle, u_h: T.handle, w0: T.Buffer(wshape(0), wdtype), sc0: T.Buffer(sshape(0), sdt),
                       y_h: T.handle):
            T.func_attr(attrs)
            S = T.int64()
            g3 = T.match_buffer(g_h, (1, S, K), "float32")
            u3 = T.match_buffer(u_h, (1, S, K), "float32")
            x3 = T.alloc_buffer((1, S, K), "float32")
            y03 = T.match_buffer(y_h, (1, S, ns[0]), "float32")
            y0 = T.decl_buffer((S, ns[0]), "float32", data=y03.data)
            body(x3)
    elif normed and len(ns) == 1:
        @T.prim_func(private=True)
        def linear_dot(a_h: T.handle, b_h: T.handle, nw: T.Buffer((K,), "float32"), w0: T.Buffer(wshape(0), wdtype),
                       sc0: T.Buffer(sshape(0), sdt), h_h: T.handle, x_h: T.handle, y0_h: T.handle):
            T.func_attr(attrs)
            S = T.int64()
            a3 = T.match_buffer(a_h, (1, S, K), "float32")
            b3 = T.match_buffer(b_h, (1, S, K), "float32")
            h3 = T.match_buffer(h_h, (1, S, K), "float32")
            x3 = T.match_buffer(x_h, (1, S, K), "float32")
            y03 = T.match_buffer(y0_h, (1, S, ns[0]), "float32")
            y0 = T.decl_buffer((S, ns[0]), "float32", data=y03.data)
            body(x3)
    elif normed and len(ns) == 2:
        @T.prim_func(private=True)
        def linear_dot(a_h: T.handle, b_h: T.handle, nw: T.Buffer((K,), "float32"), w0: T.Buffer(wshape(0), wdtype),
                       sc0: T.Buffer(sshape(0), sdt), w1: T.Buffer(wshape(1), wdtype), sc1: T.Buffer(sshape(1), sdt),
                       h_h: T.handle, x_h: T.handle, y0_h: T.handle, y1_h: T.handle):
            T.func_attr(attrs)
            S = T.int64()
            a3 = T.match_buffer(a_h, (1, S, K), "float32")
            b3 = T.match_buffer(b_h, (1, S, K), "float32")
            h3 = T.match_buffer(h_h, (1, S, K), "float32")
            x3 = T.match_buffer(x_h, (1, S, K), "float32")
            y03 = T.match_buffer(y0_h, (1, S, ns[0]), "float32")
            y13 = T.match_buffer(y1_h, (1, S, ns[1]), "float32")
            y0 = T.decl_buffer((S, ns[0]), "float32", data=y03.data)
            y1 = T.decl_buffer((S, ns[1]), "float32", data=y13.data)
            body(x3)
    elif normed:
        @T.prim_func(private=True)
        def linear_dot(a_h: T.handle, b_h: T.handle, nw: T.Buffer((K,), "float32"), w0: T.Buffer(wshape(0), wdtype),
                       sc0: T.Buffer(sshape(0), sdt), w1: T.Buffer(wshape(1), wdtype), sc1: T.Buffer(sshape(1), sdt),
                       w2: T.Buffer(wshape(2), wdtype), sc2: T.Buffer(sshape(2), sdt),
                       h_h: T.handle, x_h: T.handle, y0_h: T.handle, y1_h: T.handle, y2_h: T.handle):
            T.func_attr(attrs)
            S = T.int64()
            a3 = T.match_buffer(a_h, (1, S, K), "float32")
            b3 = T.match_buffer(b_h, (1, S, K), "float32")
            h3 = T.match_buffer(h_h, (1, S, K), "float32")
            x3 = T.match_buffer(x_h, (1, S, K), "float32")
            y03 = T.match_buffer(y0_h, (1, S, ns[0]), "float32")
            y13 = T.match_buffer(y1_h, (1, S, ns[1]), "float32")
            y23 = T.match_buffer(y2_h, (1, S, ns[2]), "float32")
            y0 = T.decl_buffer((S, ns[0]), "float32", data=y03.data)
            y1 = T.decl_buffer((S, ns[1]), "float32", data=y13.data)
            y2 = T.decl_buffer((S, ns[2]), "float32", data=y23.data)
            body(x3)
    else:
        return group_kernel(K, ns, wshape, sshape, wdtype, sdt, body)
    return linear_dot


def embedding(scheme: Scheme, k: int, n: int, lanes: int):
    """out[0, s, :] = dequantized row ids[0, s] of the dot-layout weight (tied embeddings share the lm_head's)."""
    K, N = k, n
    KP = dot_padded_k(scheme, K)
    GS = scheme.group_size or KP
    G = KP // GS
    NB = N // LANES
    q4 = scheme.bits == 4
    WCOLS = KP // 8 if q4 else KP // 4
    wdtype = "uint8" if q4 else "int8"
    TI = lanes // LANES

    @T.prim_func(private=True)
    def embed_dot(ids_h: T.handle, w: T.Buffer((NB // TI, WCOLS, 32 * TI), wdtype),
                  sc: T.Buffer((NB // TI, G, 8 * TI), scheme.scale_dtype),
                  out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "llamac.kernel": "embedding", "op_pattern": OPAQUE})
        S = T.int64()
        ids = T.match_buffer(ids_h, (1, S), "int64")
        out = T.match_buffer(out_h, (1, S, K), "float32")
        for s in T.parallel(S):
            for h in range(K):
                # channel ids[0, s] = tile * 8 + c; input h sits in byte 4 * c + h % 4 of its column
                if q4:
                    out[0, s, h] = (T.Cast("float32", T.bitwise_and(T.shift_right(
                        w[ids[0, s] // 8 // TI, h // 8, ids[0, s] // 8 % TI * 32 + ids[0, s] % 8 * 4 + h % 4],
                        T.Cast("uint8", h % 8 // 4 * 4)), T.uint8(15))) - T.float32(8)) * T.Cast(
                        "float32", sc[ids[0, s] // 8 // TI, h // GS, ids[0, s] // 8 % TI * 8 + ids[0, s] % 8])
                else:
                    out[0, s, h] = T.Cast("float32", w[
                        ids[0, s] // 8 // TI, h // 4, ids[0, s] // 8 % TI * 32 + ids[0, s] % 8 * 4 + h % 4]) * T.Cast(
                        "float32", sc[ids[0, s] // 8 // TI, h // GS, ids[0, s] // 8 % TI * 8 + ids[0, s] % 8])

    return embed_dot

