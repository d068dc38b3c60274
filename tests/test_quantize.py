"""Quantization schemes: sound on random weights, compact on disk, and the kernels compute exactly the numpy
dequantization (the same math `llamac inspect --dequantize` writes)."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from llamac.errors import InputError
from llamac.quantize import (SCHEMES, dequantize, dot_lanes, get_scheme, pack, packed_shapes, pick_lanes, quantize,
                             relative_error, unpack)

RNG = np.random.default_rng(0)
# [in, out] like the ONNX MatMul weights; 172 and 100 inputs are not multiples of the group size (nor of 8)
SHAPES = [(64, 64), (256, 96), (172, 64), (100, 20)]


@pytest.mark.parametrize("scheme,limit", [("q8", 0.015), ("q4", 0.12), ("q4-g64", 0.12), ("f16", 0.001)])
@pytest.mark.parametrize("shape", SHAPES)
def test_relative_weight_error(scheme, limit, shape):
    w = RNG.standard_normal(shape).astype(np.float32)
    assert relative_error(w, get_scheme(scheme)) <= limit


def test_scales_scale_with_the_weights():
    w = RNG.standard_normal((128, 32)).astype(np.float32)
    for name in ("q8", "q4"):
        a, b = relative_error(w, get_scheme(name)), relative_error(w * 1e-3, get_scheme(name))
        assert abs(a - b) < 0.01


@pytest.mark.parametrize("name", ["f32", "f16", "q8", "q4", "q4-g64-f32", "q8-g32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_roundtrip(name, shape):
    s = get_scheme(name)
    k, n = shape
    qt = quantize(RNG.standard_normal(shape).astype(np.float32), s)
    for lanes in (1, 4, 16):
        ln = pick_lanes(n, lanes)
        arrays = pack(qt, ln)
        assert {key: (a.shape, str(a.dtype)) for key, a in arrays.items()} == packed_shapes(s, k, n, ln)
        assert np.array_equal(dequantize(unpack(arrays, s, k, n)), dequantize(qt))


@pytest.mark.parametrize("name", ["q8", "q4", "q4-g64-f32", "q8-g32"])
@pytest.mark.parametrize("shape", [(64, 64), (172, 64), (100, 40), (96, 8), (64, 384)])
def test_dot_layout_roundtrip(name, shape):
    s = get_scheme(name)
    k, n = shape
    qt = quantize(RNG.standard_normal(shape).astype(np.float32), s)
    for tiles in (1, 4, 16):
        lanes = dot_lanes(n, tiles)
        assert lanes <= 8 * tiles and (n // 8) % (lanes // 8) == 0
        arrays = pack(qt, lanes, "dot")
        assert {key: (a.shape, str(a.dtype)) for key, a in arrays.items()} == packed_shapes(s, k, n, lanes, "dot")
        assert np.array_equal(dequantize(unpack(arrays, s, k, n, "dot")), dequantize(qt))


def test_q4_bytes_per_param():
    for k, n in [(1024, 1024), (1024, 2816), (172, 64)]:
        arrays = pack(quantize(RNG.standard_normal((k, n)).astype(np.float32), SCHEMES["q4"]), 16)
        assert sum(a.nbytes for a in arrays.values()) / (k * n) <= 0.6


def test_scheme_registry_and_variants():
    assert set(SCHEMES) == {"f32", "f16", "q8", "q4"}
    assert SCHEMES["q4"].group_size == 32 and SCHEMES["q4"].scale_dtype == "float16"
    assert SCHEMES["q8"].group_size is None           # one scale per output channel
    v = get_scheme("q4-g128-f32")
    assert (v.bits, v.group_size, v.scale_dtype) == (4, 128, "float32")
    assert v.doc == "int4 in groups of 128 inputs, f32 scales"      # what `llamac inspect` prints
    assert get_scheme("q8-f16").doc == "int8 per output channel, f16 scales"
    for bad in ("q3", "int4", "q4-g12", "q4-g0", ""):
        with pytest.raises(InputError):
            get_scheme(bad)


def test_zero_and_constant_groups():
    w = np.zeros((64, 8), np.float32)
    w[:, 3] = 0.5
    for name in ("q8", "q4"):
        assert np.allclose(dequantize(quantize(w, get_scheme(name))), w)


@pytest.mark.parametrize("name, big, fits", [("f16", 7e4, False), ("f16", 6e4, True), ("q4", 6e5, False),
                                             ("q4", 4e5, True), ("q8-g32-f16", 9e6, False), ("q8", 9e6, True),
                                             ("q4-g32-f32", 1e6, True), ("f32", 1e30, True)])
def test_values_beyond_float16_are_refused_not_stored_as_inf(name, big, fits):
    """float16 holds up to 65504: f16 weights, and q4/q8 scales (about |w| / 8 or / 127) stored in float16."""
    w = np.random.default_rng(7).standard_normal((64, 16)).astype(np.float32)   # not RNG: later tests' draws stay
    w[5, 3] = -big
    if fits:
        assert np.isfinite(dequantize(quantize(w, get_scheme(name)))).all()
    else:
        with pytest.raises(InputError, match="exceed the float16 range"):
            quantize(w, get_scheme(name))


# ---------------------------------------------------------------- kernels = numpy dequantization

@pytest.fixture(scope="module")
def build():
    import tvm

    from llamac import tvm_build

    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v2"})

    def _build(func):
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        return tvm_build.load(tvm.compile(mod, target=target))["main"], tvm
    return _build


@pytest.mark.parametrize("name,panels", [("f32", 1), ("f16", 1), ("q8", 1), ("q4", 1), ("q4-g64-f32", 1),
                                         ("f32", 4), ("f16", 4)])
@pytest.mark.parametrize("k,n,rows", [(172, 64, 1), (64, 96, 1), (72, 48, 1), (64, 48, 5), (100, 20, 3),
                                        (100, 32, 13)])
def test_linear_kernel_is_numpy_dequantization(build, name, panels, k, n, rows):
    """panels 4: float weights with up to 4 x 16 channels side by side (targets' `float_panels`), prefill tiles
    16 lanes wide inside them."""
    from llamac import tvm_kernels

    s = get_scheme(name)
    lanes = pick_lanes(n, 16 * panels)
    qt = quantize(RNG.standard_normal((k, n)).astype(np.float32), s)
    arrays = pack(qt, lanes)
    x = RNG.standard_normal((1, rows, k)).astype(np.float32)
    f, tvm = build(tvm_kernels.linear(s, k, n, lanes, 16))
    scale = arrays.get("scale", np.zeros((1, 1, 1), np.float32))
    y = tvm.runtime.tensor(np.zeros((1, rows, n), np.float32))
    f(tvm.runtime.tensor(x), tvm.runtime.tensor(arrays.get("w", arrays.get("q"))), tvm.runtime.tensor(scale), y)
    ref = x[0] @ dequantize(qt)
    assert np.abs(y.numpy()[0] - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["f32", "q8", "q4"])
def test_embedding_kernel_is_numpy_dequantization(build, name):
    from llamac import tvm_kernels

    s = get_scheme(name)
    k, n, lanes = 72, 48, 16
    qt = quantize(RNG.standard_normal((k, n)).astype(np.float32), s)
    arrays = pack(qt, lanes)
    ids = np.array([[0, 47, 5, 5, 30]], np.int64)
    f, tvm = build(tvm_kernels.embedding(s, k, n, lanes))
    out = tvm.runtime.tensor(np.zeros((1, 5, k), np.float32))
    scale = arrays.get("scale", np.zeros((1, 1, 1), np.float32))
    f(tvm.runtime.tensor(ids), tvm.runtime.tensor(arrays.get("w", arrays.get("q"))), tvm.runtime.tensor(scale), out)
    assert np.array_equal(out.numpy()[0], dequantize(qt).T[ids[0]])


def _on_threads(tvm, n: int, call):
    """call() from a new thread whose TVM pool has n threads; returns its result. TVM keeps one pool per launching
    thread, sized from TVM_NUM_THREADS when it starts: the pool of pytest's thread is already running at its
    default size (half the cores on x86, so one thread on a 2-core machine)."""
    result = {}

    def run():
        saved = os.environ.get("TVM_NUM_THREADS")
        os.environ["TVM_NUM_THREADS"] = str(n)
        try:
            tvm.get_global_func("runtime.config_threadpool")(0, n)
            result["value"] = call()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in pytest's thread
            result["error"] = e
        finally:
            if saved is None:
                os.environ.pop("TVM_NUM_THREADS", None)
            else:
                os.environ["TVM_NUM_THREADS"] = saved

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _extents(visible: np.ndarray) -> np.ndarray:
    """1 + the last visible key per query row, or all keys for a row that sees none (numpy reference)."""
    last = np.where(visible.any(-1), visible.shape[-1] - np.argmax(visible[..., ::-1], -1), visible.shape[-1])
    return last.reshape(-1).astype(np.int64)


@pytest.mark.parametrize("ext", [[5, 11, 8], [11, 11, 11], [1, 3, 2]])
def test_attention_kernels_read_only_the_valid_prefix(build, ext):
    """Scores for the keys before each query row's extent (later ones are masked, never read), P.V over them; rows
    are (groups, seq) flattened, so row r has the extent of position r % seq. Cache rows past total are NaN."""
    from llamac import tvm_kernels

    heads, cap, d, rows, total = 2, 40, 16, 6, 11
    ext = np.array(ext, np.int64)
    q = RNG.standard_normal((1, heads, rows, d)).astype(np.float32)
    cache = RNG.standard_normal((1, heads, cap, d)).astype(np.float32)
    cache[:, :, total:] = np.nan
    row_ext = ext[np.arange(rows) % len(ext)]
    f, tvm = build(tvm_kernels.attn_scores(heads, cap, d))
    out = tvm.runtime.tensor(np.full((1, heads, rows, total), np.nan, np.float32))
    f(tvm.runtime.tensor(q), tvm.runtime.tensor(cache), tvm.runtime.tensor(ext), out)
    ref = q @ cache[:, :, :total].transpose(0, 1, 3, 2)
    for r in range(rows):
        assert np.allclose(out.numpy()[:, :, r, :row_ext[r]], ref[:, :, r, :row_ext[r]], atol=1e-5)
    p = RNG.random((1, heads, rows, total)).astype(np.float32)
    p[:, :, np.arange(total)[None, :] >= row_ext[:, None]] = 0      # what the masked softmax leaves there
    f, tvm = build(tvm_kernels.attn_values(heads, cap, d))
    out = tvm.runtime.tensor(np.zeros((1, heads, rows, d), np.float32))
    f(tvm.runtime.tensor(p), tvm.runtime.tensor(cache), tvm.runtime.tensor(ext), out)
    assert np.allclose(out.numpy(), p @ cache[:, :, :total], atol=1e-5)


@pytest.mark.parametrize("seq,total,d", [(7, 20, 16), (1, 37, 16), (1, 37, 12), (16, 16, 16), (5, 50, 16)])
def test_fused_attention_kernel_is_softmax_of_where_times_v(build, seq, total, d):
    """One pass (scores, masked online softmax, P.V) = the graph's softmax(where(visible, q.K^T, f32 min)).V, for
    GQA rows (groups, seq) flattened, with a row that sees nothing (uniform over all keys, like the graph), a gap
    in the mask, partial key blocks, and NaN cache rows past total (never read). One query row (decode) takes dot
    products with the key rows when the head size is a multiple of 8, the transposed keys otherwise."""
    from llamac import tvm_kernels

    heads, cap, groups = 2, 64, 3
    rows = groups * seq
    q = RNG.standard_normal((1, heads, rows, d)).astype(np.float32)
    k = RNG.standard_normal((1, heads, cap, d)).astype(np.float32) * 2
    v = RNG.standard_normal((1, heads, cap, d)).astype(np.float32)
    k[:, :, total:] = np.nan
    v[:, :, total:] = np.nan
    visible = np.tril(np.ones((seq, total), bool), total - seq)
    visible[0, 1:4] = False
    if seq > 2:
        visible[1] = False
    ext = _extents(visible)
    f, tvm = build(tvm_kernels.attention(heads, cap, d))
    out = tvm.runtime.tensor(np.full((1, heads, rows, d), np.nan, np.float32))
    # the tasks come from a shared counter: each must be done once
    _on_threads(tvm, 3, lambda: f(tvm.runtime.tensor(q), tvm.runtime.tensor(k), tvm.runtime.tensor(v),
                                  tvm.runtime.tensor(visible[None]), tvm.runtime.tensor(ext), out))
    scores = q.astype(np.float64) @ k[:, :, :total].transpose(0, 1, 3, 2)
    w = np.where(visible[np.arange(rows) % seq][None, None], scores, np.finfo(np.float32).min)
    e = np.exp(w - w.max(-1, keepdims=True))
    ref = (e / e.sum(-1, keepdims=True)) @ v[:, :, :total]
    assert np.abs(out.numpy() - ref).max() < 1e-5


def test_visible_extent_kernel(build):
    from llamac import tvm_kernels

    seq, total = 7, 20
    visible = np.tril(np.ones((seq, total), bool), total - seq)
    visible[2] = False                                   # sees nothing: all keys (its softmax is uniform)
    visible[3, 10:] = False                              # a gap, then the causal edge
    visible[4, :] = False
    visible[4, 0] = True
    visible[5, 3:9] = False
    f, tvm = build(tvm_kernels.visible_extent())
    out = tvm.runtime.tensor(np.zeros(seq, np.int64))
    f(tvm.runtime.tensor(visible[None]), out)
    assert list(out.numpy()) == [14, 15, 20, 10, 1, 19, 20] == list(_extents(visible))
    f, tvm = build(tvm_kernels.all_keys())
    f(tvm.runtime.tensor(np.zeros((1, seq), np.int64)), total, out)
    assert list(out.numpy()) == [total] * seq


def test_kv_write_is_in_place_and_local(build):
    from llamac import tvm_kernels

    heads, cap, d = 2, 16, 8
    f, tvm = build(tvm_kernels.kv_write(heads, cap, d))
    cache = tvm.runtime.tensor(np.zeros((1, heads, cap, d), np.float32))
    new = RNG.standard_normal((1, heads, 3, d)).astype(np.float32)
    f(cache, tvm.runtime.tensor(new), 10)                 # total 10: rows 7, 8, 9
    c = cache.numpy()
    assert np.array_equal(c[:, :, 7:10], new) and not c[:, :, :7].any() and not c[:, :, 10:].any()


# ---------------------------------------------------------------- int8 dot-product kernels (activations quantized)

AVX2 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "mattr": ["+avx2", "+fma", "+f16c"]}
VNNI = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake",
        "mattr": ["+avx2", "+avx512f", "+avx512bw", "+avx512dq", "+avx512vl", "+avx512vnni", "+fma", "+f16c"]}
# (instruction set, tiles side by side): AVX2's with the x86_64-avx2 layout (4), VNNI's with x86_64-avx512-vnni's (16);
# AVX2's with x86_64-avx512's (16) on fewer shapes (the same code as the first, another layout)
DOT_KINDS = [("avx2", 4), ("vnni", 16)]
DOT_SHAPES = [(172, 64, 1), (64, 48, 5), (256, 96, 9), (100, 8, 3), (64, 256, 1), (96, 128, 2), (64, 512, 3)]


def q8_activations(x: np.ndarray) -> np.ndarray:
    """llama.cpp's Q8_0 for activations, written out: blocks of 32 inputs (zero-padded), m = max|x|,
    q = rint(x * (127 / m)), d = m / 127, all in float32 as the kernels compute them (in float64, x / d lands on the
    other side of a .5 for a few draws, and one code then differs); returns the dequantized activations d * q."""
    s, k = x.shape
    kp = -(-k // 32) * 32
    blocks = np.zeros((s, kp), np.float32)
    blocks[:, :k] = x
    blocks = blocks.reshape(s, -1, 32)
    m = np.abs(blocks).max(axis=2, keepdims=True)
    inv = np.divide(np.float32(127), m, out=np.zeros_like(m), where=m > 0)
    q = np.rint(blocks * inv)
    assert np.abs(q).max() <= 127
    return (q.astype(np.float64) * (m / np.float32(127)).astype(np.float64)).reshape(s, kp)[:, :k]


def _build_for(target_dict: dict, func):
    import tvm

    from llamac import tvm_build

    target = tvm.target.Target(target_dict)
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with target:
        return tvm.compile(mod, target=target), tvm_build, tvm


@pytest.fixture(scope="module")
def build_avx2():
    def _build(func):
        lib, tvm_build, tvm = _build_for(AVX2, func)
        return tvm_build.load(lib)["main"], tvm
    return _build


def build_dot(isa: str):
    """A builder for the kernels of one dot-product instruction set; VNNI kernels run only on a CPU that has it (the
    test that they are made of vpdpbusd instructions runs everywhere)."""
    from llamac.runtime.tvm_backend import missing_cpu_features

    target = VNNI if isa == "vnni" else AVX2
    missing = missing_cpu_features(target["mattr"], "x86_64")
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)} to run {isa} kernels")

    def _build(func):
        lib, tvm_build, tvm = _build_for(target, func)
        return tvm_build.load(lib)["main"], tvm
    return _build


@pytest.mark.parametrize("isa,tiles,k,n,rows", [kind + shape for kind in DOT_KINDS for shape in DOT_SHAPES]
                         + [("avx2", 16) + shape for shape in DOT_SHAPES[-3:]])
@pytest.mark.parametrize("name", ["q8", "q4", "q4-g64-f32", "q8-g32"])
def test_dot_kernel_is_int8_activations_times_dequantized_weights(isa, tiles, name, k, n, rows):
    from llamac import tvm_dot

    s = get_scheme(name)
    w = RNG.standard_normal((k, n)).astype(np.float32)
    qt = quantize(w, s)
    lanes = dot_lanes(n, tiles)
    arrays = pack(qt, lanes, "dot")
    x = RNG.standard_normal((1, rows, k)).astype(np.float32)
    x[0, 0, :5] = 0                                     # an all-zero block must not divide by zero
    if k >= 64:
        x[0, -1, 32:64] = 0
    f, tvm = build_dot(isa)(tvm_dot.linear(s, k, n, isa, lanes))
    y = tvm.runtime.tensor(np.zeros((1, rows, n), np.float32))
    f(tvm.runtime.tensor(x), tvm.runtime.tensor(arrays["q"]), tvm.runtime.tensor(arrays["scale"]), y)
    deq = dequantize(qt).astype(np.float64)
    ref = q8_activations(x[0]) @ deq
    assert np.abs(y.numpy()[0] - ref).max() <= 1e-5 * np.abs(ref).max()
    # and quantizing the activations costs little accuracy: against f32 activations times the same weights (the
    # weights' own rounding is tested above); 1.5 % at most over 1,050 random draws of these shapes, so 3 % holds
    # whatever the draw (a bound against x @ w would measure the q4 weight error, which some draws push past 20 %)
    exact = x[0].astype(np.float64) @ deq
    assert np.abs(y.numpy()[0] - exact).max() <= 0.03 * np.abs(exact).max()


@pytest.mark.parametrize("name", ["q4", "q8"])
def test_vnni_kernels_are_vpdpbusd(name):
    """Compiled for AVX-512 VNNI, the dot kernel's products are vpdpbusd (four byte products summed into each int32
    lane); for AVX2, vpmaddubsw. Read from the generated assembly, so this runs on any x86 host."""
    from llamac import tvm_dot

    asm = {}
    for isa, target in (("vnni", VNNI), ("avx2", AVX2)):
        lib, _, _ = _build_for(target, tvm_dot.linear(get_scheme(name), 256, 512, isa, 128))
        asm[isa] = lib.mod.inspect_source("asm")
    assert "vpdpbusd" in asm["vnni"] and "vpmaddubsw" not in asm["vnni"]
    assert "vpmaddubsw" in asm["avx2"] and "vpdpbusd" not in asm["avx2"]


@pytest.mark.parametrize("kernel,name", [("dense", "f16"), ("wide", "f16"), ("lanes", "q4"), ("dot", "q8"),
                                         ("dot", "q4")])
@pytest.mark.parametrize("rows", [1, 7])
def test_linear_kernels_on_several_threads_compute_every_tile_once(build_avx2, kernel, name, rows):
    """The parallel loops take their tasks from a shared counter: on 3 threads, every output tile is written (the
    output starts as NaN) with the single-threaded math."""
    from llamac import tvm_dot, tvm_kernels

    s = get_scheme(name)
    k, n = 64, 4096     # decode: enough tasks for chunks of several
    qt = quantize(RNG.standard_normal((k, n)).astype(np.float32), s)
    if kernel == "dot":
        arrays, func = pack(qt, 32, "dot"), tvm_dot.linear(s, k, n, "avx2", 32)
        ref = q8_activations
    else:
        lanes = 64 if kernel == "wide" else 16     # wide: 4 panels of 16 side by side
        arrays, func = pack(qt, lanes), tvm_kernels.linear(s, k, n, lanes, 16)
        ref = np.asarray
    x = RNG.standard_normal((1, rows, k)).astype(np.float32)
    f, tvm = build_avx2(func)
    y = tvm.runtime.tensor(np.full((1, rows, n), np.nan, np.float32))
    _on_threads(tvm, 3, lambda: f(tvm.runtime.tensor(x), tvm.runtime.tensor(arrays.get("w", arrays.get("q"))),
                                  tvm.runtime.tensor(arrays.get("scale", np.zeros((1, 1, 1), np.float32))), y))
    expected = ref(x[0]) @ dequantize(qt).astype(np.float64)
    assert np.abs(y.numpy()[0] - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("isa,tiles", DOT_KINDS + [("avx2", 16)])
@pytest.mark.parametrize("name", ["q4", "q8"])
@pytest.mark.parametrize("ns,rows", [((1024, 256, 256), 1), ((704, 704), 7)])
def test_linear_group_kernel_is_one_linear_per_weight(isa, tiles, name, ns, rows):
    """Sibling linear layers (q, k, v; gate, up) in one kernel: each output is x @ W_i with the int8 activations, every
    tile written once (outputs start as NaN), on 3 threads."""
    from llamac import tvm_dot

    s = get_scheme(name)
    k = 96
    qts = [quantize(RNG.standard_normal((k, n)).astype(np.float32), s) for n in ns]
    lanes = tuple(dot_lanes(n, tiles) for n in ns)
    arrays = [pack(qt, ln, "dot") for qt, ln in zip(qts, lanes)]
    x = RNG.standard_normal((1, rows, k)).astype(np.float32)
    f, tvm = build_dot(isa)(tvm_dot.linear_group(s, k, ns, isa, lanes))
    ys = [tvm.runtime.tensor(np.full((1, rows, n), np.nan, np.float32)) for n in ns]
    weights = [tvm.runtime.tensor(a[key]) for a in arrays for key in ("q", "scale")]
    _on_threads(tvm, 3, lambda: f(tvm.runtime.tensor(x), *weights, *ys))
    for y, qt in zip(ys, qts):
        expected = q8_activations(x[0]) @ dequantize(qt).astype(np.float64)
        assert np.abs(y.numpy()[0] - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("isa,tiles", DOT_KINDS)
@pytest.mark.parametrize("name", ["q4", "q8"])
@pytest.mark.parametrize("k,rows", [(100, 1), (256, 1), (100, 6)])
def test_gated_linear_kernel_is_silu_mul_then_linear(isa, tiles, name, k, rows):
    """SwiGLU's down projection with its gate * sigmoid(gate) * up computed inside (one kernel, no silu_mul in front):
    the same output, bit for bit, as the silu_mul kernel followed by the linear one (each checked against numpy
    above), and near numpy's float64 silu then the int8 dot products; on 3 threads."""
    from llamac import tvm_dot, tvm_kernels

    s = get_scheme(name)
    n = 64
    qt = quantize(RNG.standard_normal((k, n)).astype(np.float32), s)
    lanes = dot_lanes(n, tiles)
    arrays = pack(qt, lanes, "dot")
    g = (RNG.standard_normal((1, rows, k)) * 3).astype(np.float32)
    u = RNG.standard_normal((1, rows, k)).astype(np.float32)
    build = build_dot(isa)
    fused, tvm = build(tvm_dot.linear(s, k, n, isa, lanes, gated=True))
    silu, _ = build(tvm_kernels.silu_mul(k))
    linear, _ = build(tvm_dot.linear(s, k, n, isa, lanes))
    w, sc = tvm.runtime.tensor(arrays["q"]), tvm.runtime.tensor(arrays["scale"])
    y = tvm.runtime.tensor(np.full((1, rows, n), np.nan, np.float32))
    _on_threads(tvm, 3, lambda: fused(tvm.runtime.tensor(g), tvm.runtime.tensor(u), w, sc, y))
    x = tvm.runtime.tensor(np.zeros((1, rows, k), np.float32))
    silu(tvm.runtime.tensor(g), tvm.runtime.tensor(u), x)
    y2 = tvm.runtime.tensor(np.zeros((1, rows, n), np.float32))
    linear(x, w, sc, y2)
    assert np.array_equal(y.numpy(), y2.numpy())
    g64 = g[0].astype(np.float64)
    expected = (g64 / (1 + np.exp(-g64)) * u[0]) @ dequantize(qt).astype(np.float64)
    assert np.abs(y.numpy()[0] - expected).max() <= 2e-2 * np.abs(expected).max()


@pytest.mark.parametrize("isa,tiles", DOT_KINDS)
@pytest.mark.parametrize("name", ["q4", "q8"])
@pytest.mark.parametrize("k,ns,rows", [(100, (64, 32, 32), 1), (256, (64, 128), 1), (100, (64,), 6)])
def test_normed_linear_group_kernel_is_add_rms_norm_then_linears(isa, tiles, name, k, ns, rows):
    """The residual add and RMSNorm in front of q, k, v (or gate, up) inside their kernel: the sum, the normalized
    rows and every output the same, bit for bit, as the add_rms_norm kernel followed by the group kernel (each
    checked against numpy), and the outputs near numpy's float64 norm then the int8 dot products; on 3 threads."""
    from llamac import tvm_dot, tvm_kernels

    s = get_scheme(name)
    eps = 1e-5
    qts = [quantize(RNG.standard_normal((k, n)).astype(np.float32), s) for n in ns]
    lanes = tuple(dot_lanes(n, tiles) for n in ns)
    arrays = [pack(qt, ln, "dot") for qt, ln in zip(qts, lanes)]
    a = RNG.standard_normal((1, rows, k)).astype(np.float32)
    b = RNG.standard_normal((1, rows, k)).astype(np.float32)
    nw = (RNG.random(k) + 0.5).astype(np.float32)
    build = build_dot(isa)
    fused, tvm = build(tvm_dot.linear_group(s, k, ns, isa, lanes, norm_eps=eps))
    norm, _ = build(tvm_kernels.rms_norm(k, eps, True))
    group, _ = build(tvm_dot.linear_group(s, k, ns, isa, lanes))
    weights = [tvm.runtime.tensor(arr[key]) for arr in arrays for key in ("q", "scale")]
    t = tvm.runtime.tensor
    outs = [t(np.full((1, rows, n), np.nan, np.float32)) for n in (k, k) + ns]
    _on_threads(tvm, 3, lambda: fused(t(a), t(b), t(nw), *weights, *outs))
    ref = [t(np.zeros((1, rows, n), np.float32)) for n in (k, k) + ns]
    norm(t(a), t(b), t(nw), ref[0], ref[1])
    group(ref[1], *weights, *ref[2:])
    for o, r in zip(outs, ref):
        assert np.array_equal(o.numpy(), r.numpy())
    h = a[0].astype(np.float64) + b[0]
    x = h / np.sqrt((h * h).mean(axis=1, keepdims=True) + eps) * nw
    assert np.allclose(outs[1].numpy()[0], x, rtol=1e-5, atol=1e-6)
    for o, qt in zip(outs[2:], qts):
        expected = q8_activations(x.astype(np.float32)) @ dequantize(qt).astype(np.float64)
        assert np.abs(o.numpy()[0] - expected).max() <= 1e-2 * np.abs(expected).max()


@pytest.mark.parametrize("name", ["f32", "f16", "q8"])
@pytest.mark.parametrize("ns,lanes,rows", [((1024, 256, 256), (64, 64, 64), 1), ((192, 64), (64, 16), 7),
                                           ((96, 48, 32), (32, 16, 32), 13)])
def test_lanes_linear_group_kernel_is_one_linear_per_weight(build_avx2, name, ns, lanes, rows):
    """Sibling linear layers in the "lanes" layout (targets without byte dot products; f32 and f16 everywhere) in one
    kernel: each output is x @ W_i, every panel written once (outputs start as NaN), on 3 threads, with panels of
    different widths in one group."""
    from llamac import tvm_kernels

    s = get_scheme(name)
    k = 80
    qts = [quantize(RNG.standard_normal((k, n)).astype(np.float32), s) for n in ns]
    arrays = [pack(qt, ln) for qt, ln in zip(qts, lanes)]
    x = RNG.standard_normal((1, rows, k)).astype(np.float32)
    f, tvm = build_avx2(tvm_kernels.linear_group(s, k, ns, lanes, 16))
    ys = [tvm.runtime.tensor(np.full((1, rows, n), np.nan, np.float32)) for n in ns]
    weights = [tvm.runtime.tensor(a) for arr in arrays
               for a in (arr.get("w", arr.get("q")), arr.get("scale", np.zeros((1, 1, 1), np.float32)))]
    _on_threads(tvm, 3, lambda: f(tvm.runtime.tensor(x), *weights, *ys))
    for y, qt in zip(ys, qts):
        expected = x[0].astype(np.float64) @ dequantize(qt).astype(np.float64)
        assert np.abs(y.numpy()[0] - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("threads", [1, 3])
def test_kernels_see_the_thread_pool_size(build_avx2, threads):
    """Decode chunks are 1 / (2 x threads) of the tasks left: the kernels' helper reads the pool size from the TVM
    runtime (a weak symbol; were it not found, every pool would look like one thread)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def pool_size(out: T.Buffer((1,), "int32")):
        out[0] = T.call_extern("int32", "llamac_threads")

    f, tvm = build_avx2(pool_size)
    out = tvm.runtime.tensor(np.zeros(1, np.int32))
    _on_threads(tvm, threads, lambda: f(out))
    assert out.numpy()[0] == threads


@pytest.mark.parametrize("lanes", [8, 32, 128])
@pytest.mark.parametrize("name", ["q8", "q4"])
def test_dot_embedding_kernel_is_numpy_dequantization(build_avx2, name, lanes):
    from llamac import tvm_dot

    s = get_scheme(name)
    k, n = 72, 256
    qt = quantize(RNG.standard_normal((k, n)).astype(np.float32), s)
    arrays = pack(qt, lanes, "dot")
    ids = np.array([[0, 255, 5, 5, 130]], np.int64)
    f, tvm = build_avx2(tvm_dot.embedding(s, k, n, lanes))
    out = tvm.runtime.tensor(np.zeros((1, 5, k), np.float32))
    f(tvm.runtime.tensor(ids), tvm.runtime.tensor(arrays["q"]), tvm.runtime.tensor(arrays["scale"]), out)
    assert np.array_equal(out.numpy()[0], dequantize(qt).T[ids[0]])


@pytest.mark.parametrize("seq,total", [(5, 13), (1, 77), (16, 16), (3, 40)])
def test_masked_softmax_kernel_is_softmax_of_where(build, seq, total):
    """The fused kernel = softmax(where(visible, scores, f32 min)) as the graph computes it, including a query row
    with no visible key (uniform, like the graph) and scores far apart (exp underflows to 0)."""
    from llamac import tvm_kernels

    rows = 6
    scores = (RNG.standard_normal((1, rows, seq, total)) * 30).astype(np.float32)
    visible = np.tril(np.ones((seq, total), bool), total - seq)[None]
    visible[0, :, 0] = False
    visible[0, -1, :] = seq < 3                          # the last query sees nothing (unless that hides all rows)
    ext = _extents(visible[0])
    scores[..., np.arange(total)[None, :] >= ext[:, None]] = np.nan    # past the extents: never read
    f, tvm = build(tvm_kernels.masked_softmax(rows))
    out = tvm.runtime.tensor(np.full_like(scores, np.nan))
    f(tvm.runtime.tensor(scores), tvm.runtime.tensor(visible), tvm.runtime.tensor(ext), out)
    w = np.where(visible[:, None], scores, np.finfo(np.float32).min).astype(np.float64)
    e = np.exp(w - w.max(-1, keepdims=True))
    assert np.abs(out.numpy() - e / e.sum(-1, keepdims=True)).max() < 1e-6


@pytest.mark.parametrize("rows,width", [(1, 64), (5, 44), (3, 8)])
def test_silu_mul_kernel(build, rows, width):
    """gate * sigmoid(gate) * up, including gates far enough out that exp over- or underflows."""
    from llamac import tvm_kernels

    gate = (RNG.standard_normal((1, rows, width)) * 8).astype(np.float32)
    gate[0, 0, :4] = [-200.0, 200.0, 0.0, -0.0]
    up = RNG.standard_normal((1, rows, width)).astype(np.float32)
    f, tvm = build(tvm_kernels.silu_mul(width))
    out = tvm.runtime.tensor(np.zeros_like(gate))
    f(tvm.runtime.tensor(gate), tvm.runtime.tensor(up), out)
    g = gate.astype(np.float64)
    ref = g / (1 + np.exp(-g)) * up
    assert np.abs(out.numpy() - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("rows,width", [(1, 64), (5, 100), (3, 8)])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_kernel(build, rows, width, residual):
    """x / sqrt(mean(x^2) + eps) * w per row, with x = a + b (also written out) for the residual form; a width that
    is not a multiple of 8 takes the scalar tail, and an all-zero row gives zeros (eps keeps it finite)."""
    from llamac import tvm_kernels

    rng = np.random.default_rng(7)
    a = (rng.standard_normal((1, rows, width)) * 3).astype(np.float32)
    b = rng.standard_normal((1, rows, width)).astype(np.float32)
    w = rng.standard_normal(width).astype(np.float32)
    if rows > 1:
        a[0, 1], b[0, 1] = 0, 0
    eps = 1e-5
    x = (a + b) if residual else a
    f, tvm = build(tvm_kernels.rms_norm(width, eps, residual))
    y = tvm.runtime.tensor(np.full_like(a, np.nan))
    if residual:
        xo = tvm.runtime.tensor(np.full_like(a, np.nan))
        f(tvm.runtime.tensor(a), tvm.runtime.tensor(b), tvm.runtime.tensor(w), xo, y)
        assert np.array_equal(xo.numpy(), x)
    else:
        f(tvm.runtime.tensor(a), tvm.runtime.tensor(w), y)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * w
    assert np.abs(y.numpy() - ref).max() <= 1e-6 * np.abs(ref).max()
