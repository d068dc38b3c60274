"""Weight quantization schemes: a small registry (data) plus the numpy math that defines each scheme.

A linear weight is seen the way the kernels see it: K inputs, N outputs, W[k, n] (the ONNX MatMul layout). A scheme
turns it into a `QuantTensor` in its *logical* form (codes and scales, rows = output channels); `pack` reorders that
into the *kernel layout* the artifact stores, and `unpack` + `dequantize` give back exactly the f32 weights the
kernels compute with: w = f32(code) * f32(scale), one scale per output channel (q8) or per group of inputs (q4).

Kernel layout ("lanes" L output channels side by side, so one SIMD load feeds L outputs):
  float:  w      [N/L, K, L]            f32 or f16
  q8:     q      [N/L, K, L]            int8 in [-127, 127]
  q4:     q      [N/L, ceil(K/8), L]    uint32, eight 4-bit codes (value + 8) per word, input k at bits 4*(k%8)
  int:    scale  [N/L, G, L]            f16 or f32, G = ceil(K / group_size) (1 for per-channel)

Layout "dot" (q4/q8 for targets with byte dot products, see `llamac.tvm_dot`): tiles of 8 channels x 4 inputs per
32-byte word, `lanes` channels (lanes / 8 tiles) side by side; `pack(t, 32, "dot")`, lanes from `dot_lanes`.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from llamac.errors import InputError


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    kind: str                    # "float" or "int"
    bits: int                    # 32, 16 (float); 8, 4 (int)
    group_size: int | None = None  # int schemes: inputs per scale; None = one scale per output channel
    scale_dtype: str = "float32"   # int schemes: how scales are stored
    doc: str = ""

    @property
    def weight_dtype(self) -> str:
        return {32: "float32", 16: "float16", 8: "int8", 4: "uint32"}[self.bits]

    def groups(self, k: int) -> int:
        return 1 if self.group_size is None else -(-k // self.group_size)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


SCHEMES: dict[str, Scheme] = {
    "f32": Scheme("f32", "float", 32, doc="float32 weights (reference)"),
    "f16": Scheme("f16", "float", 16, doc="float16 weights, f32 math"),
    "q8": Scheme("q8", "int", 8, None, "float32", doc="int8, one f32 scale per output channel"),
    "q4": Scheme("q4", "int", 4, 32, "float16", doc="int4 in groups of 32 inputs, f16 scales"),
}

_VARIANT = re.compile(r"^(q4|q8)(?:-g(\d+))?(?:-(f16|f32))?$")


def get_scheme(name: str) -> Scheme:
    """A registered scheme, or a q4/q8 variant spelled `q4-g64`, `q4-g128-f32`, `q8-g32-f16`."""
    if name in SCHEMES:
        return SCHEMES[name]
    m = _VARIANT.match(name or "")
    if not m:
        raise InputError(f"unknown quantization scheme {name!r} (known: {', '.join(SCHEMES)}; "
                         f"variants like q4-g64, q4-g32-f32)")
    base = SCHEMES[m.group(1)]
    group = int(m.group(2)) if m.group(2) else base.group_size
    if group is not None and (group < 8 or group % 8):
        raise InputError(f"quantization group size must be a multiple of 8, got {group}")
    sdt = {"f16": "float16", "f32": "float32", None: base.scale_dtype}[m.group(3)]
    where = f"in groups of {group} inputs" if group else "per output channel"
    doc = f"int{base.bits} {where}, {sdt.replace('float', 'f')} scales"
    return Scheme(name, "int", base.bits, group, sdt, doc=doc)


def scheme_from_json(d: dict) -> Scheme:
    return Scheme(**d)


@dataclasses.dataclass
class QuantTensor:
    """Logical form: rows are output channels. float: w [N, K]; int: q [N, K] (int8 values), scale [N, G]."""
    scheme: Scheme
    k: int
    n: int
    w: np.ndarray | None = None
    q: np.ndarray | None = None
    scale: np.ndarray | None = None


# ---------------------------------------------------------------- quantize / dequantize (logical form)

def quantize(weight_kn: np.ndarray, scheme: Scheme) -> QuantTensor:
    """Quantize a [K, N] f32 weight (ONNX MatMul layout)."""
    w = np.ascontiguousarray(np.asarray(weight_kn, dtype=np.float32).T)  # [N, K]
    n, k = w.shape
    if scheme.kind == "float":
        with np.errstate(over="ignore"):    # an overflow is reported by _in_range, as one clear error
            stored = w.astype(scheme.weight_dtype)
        return QuantTensor(scheme, k, n, w=_in_range(stored, w, scheme))
    gs = scheme.group_size or k
    g = scheme.groups(k)
    padded = np.zeros((n, g * gs), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, g, gs)
    if scheme.bits == 8:
        scale = _round_scale(np.abs(blocks).max(axis=2) / 127.0, scheme.scale_dtype)
        q = _codes(blocks, scale, -127, 127)
    else:
        scale = _search_q4_scales(blocks, scheme.scale_dtype)
        q = _codes(blocks, scale, -8, 7)
    return QuantTensor(scheme, k, n, q=q.reshape(n, g * gs)[:, :k].copy(), scale=_in_range(scale, w, scheme))


def _in_range(stored: np.ndarray, w: np.ndarray, scheme: Scheme) -> np.ndarray:
    """`stored` (weights or scales in the scheme's dtype), after checking that no value overflowed it: a float16
    overflow would make the whole model compute NaN."""
    if not np.isfinite(stored).all():
        raise InputError(f"values up to {np.abs(w).max():.3g} exceed the float16 range of {scheme.name}; "
                         f"compile with -q f32 (or a q4/q8 variant with f32 scales, e.g. q8-g32-f32)")
    return stored


def _round_scale(scale: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):        # an overflow is reported by _in_range, as one clear error
        return np.where(scale == 0, 1.0, scale).astype(dtype)


def _codes(blocks: np.ndarray, scale: np.ndarray, lo: int, hi: int) -> np.ndarray:
    s = scale.astype(np.float32)[:, :, None]
    return np.clip(np.rint(blocks / s), lo, hi).astype(np.int8)


def _search_q4_scales(blocks: np.ndarray, dtype: str) -> np.ndarray:
    """Round-to-nearest with an error-minimising scale per group: try a few divisors of the signed extreme.

    The value of largest magnitude maps to -8 (it may use the wider side of [-8, 7]) or to +/-7; of the candidates we
    keep the one with the least squared error in the group. Costs a few passes over the weights, no iteration.
    """
    idx = np.abs(blocks).argmax(axis=2)[..., None]
    extreme = np.take_along_axis(blocks, idx, axis=2)[..., 0]          # signed value of largest magnitude
    best_scale = None
    best_err = None
    for div in (-8.0, -7.5, 7.0, 7.5, -7.0, 6.5, -8.5, 8.0):
        scale = _round_scale(extreme / div, dtype)
        s = scale.astype(np.float32)[..., None]
        with np.errstate(over="ignore", invalid="ignore"):     # an overflowed scale: refused by _in_range
            err = ((np.clip(np.rint(blocks / s), -8, 7) * s - blocks) ** 2).sum(axis=2)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale = np.where(better, scale, best_scale)
            best_err = np.where(better, err, best_err)
    return best_scale


def dequantize(t: QuantTensor) -> np.ndarray:
    """The f32 weight [K, N] the kernels compute with."""
    if t.scheme.kind == "float":
        return t.w.astype(np.float32).T.copy()
    gs = t.scheme.group_size or t.k
    scale = np.repeat(t.scale.astype(np.float32), gs, axis=1)[:, :t.k]
    return (t.q.astype(np.float32) * scale).T.copy()


def relative_error(weight_kn: np.ndarray, scheme: Scheme) -> float:
    """||W - deq(quant(W))|| / ||W|| (Frobenius)."""
    w = np.asarray(weight_kn, np.float32)
    return float(np.linalg.norm(dequantize(quantize(w, scheme)) - w) / np.linalg.norm(w))


# ---------------------------------------------------------------- kernel layout

def pick_lanes(n: int, preferred: int) -> int:
    """Largest power of two <= preferred that divides the output count (kernels then have no tails)."""
    lanes = preferred
    while n % lanes:
        lanes //= 2
    return lanes


def pack(t: QuantTensor, lanes: int, layout: str = "lanes") -> dict[str, np.ndarray]:
    """Logical -> kernel layout arrays (see module doc; layout "dot": `llamac.tvm_dot`)."""
    if layout == "dot":
        return _pack_dot(t, lanes // 8)
    nb = t.n // lanes
    if t.scheme.kind == "float":
        return {"w": np.ascontiguousarray(t.w.reshape(nb, lanes, t.k).transpose(0, 2, 1))}
    scale = np.ascontiguousarray(t.scale.reshape(nb, lanes, -1).transpose(0, 2, 1))
    if t.scheme.bits == 8:
        q = np.ascontiguousarray(t.q.reshape(nb, lanes, t.k).transpose(0, 2, 1))
        return {"q": q, "scale": scale}
    kw = -(-t.k // 8)
    codes = np.full((t.n, kw * 8), 8, np.uint32)
    codes[:, :t.k] = t.q.astype(np.int32) + 8
    codes = codes.reshape(t.n, kw, 8)
    words = np.zeros((t.n, kw), np.uint32)
    for j in range(8):
        words |= codes[:, :, j] << np.uint32(4 * j)
    return {"q": np.ascontiguousarray(words.reshape(nb, lanes, kw).transpose(0, 2, 1)), "scale": scale}


def unpack(arrays: dict[str, np.ndarray], scheme: Scheme, k: int, n: int, layout: str = "lanes") -> QuantTensor:
    """Kernel layout arrays -> logical form (inverse of `pack`)."""
    if layout == "dot":
        return _unpack_dot(arrays, scheme, k, n)
    if scheme.kind == "float":
        w = arrays["w"]
        return QuantTensor(scheme, k, n, w=w.transpose(0, 2, 1).reshape(n, k))
    scale = arrays["scale"].transpose(0, 2, 1).reshape(n, -1)
    q = arrays["q"]
    if scheme.bits == 8:
        return QuantTensor(scheme, k, n, q=q.transpose(0, 2, 1).reshape(n, k), scale=scale)
    words = q.transpose(0, 2, 1).reshape(n, -1)
    codes = np.stack([(words >> np.uint32(4 * j)) & np.uint32(15) for j in range(8)], axis=2).reshape(n, -1)
    return QuantTensor(scheme, k, n, q=(codes[:, :k].astype(np.int16) - 8).astype(np.int8), scale=scale)


def packed_shapes(scheme: Scheme, k: int, n: int, lanes: int,
                  layout: str = "lanes") -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of `pack`'s arrays, without packing anything (the compiler declares kernel params)."""
    if layout == "dot":
        kp, ti = dot_padded_k(scheme, k), lanes // 8
        cols = kp // 8 if scheme.bits == 4 else kp // 4
        return {"q": ((n // 8 // ti, cols, 32 * ti), "uint8" if scheme.bits == 4 else "int8"),
                "scale": ((n // 8 // ti, kp // (scheme.group_size or kp), 8 * ti), scheme.scale_dtype)}
    nb = n // lanes
    if scheme.kind == "float":
        return {"w": ((nb, k, lanes), scheme.weight_dtype)}
    kq = k if scheme.bits == 8 else -(-k // 8)
    return {"q": ((nb, kq, lanes), scheme.weight_dtype), "scale": ((nb, scheme.groups(k), lanes), scheme.scale_dtype)}


# ---------------------------------------------------------------- dot layout (int8 dot-product kernels)

def dot_padded_k(scheme: Scheme, k: int) -> int:
    """K rounded up to the weight group (or to the 32-input activation block for per-channel scales)."""
    step = scheme.group_size or 32
    return -(-k // step) * step


def dot_lanes(n: int, tiles: int) -> int:
    """Output channels stored side by side in the dot layout: up to `tiles` (the target's) tiles of 8 that divide N.
    A decode task reads its tiles as one sequential stream, which the hardware prefetchers follow (separate
    4 KiB streams per tile defeat them)."""
    nb = n // 8
    return 8 * next(t for t in (16, 8, 4, 2, 1) if t <= tiles and nb % t == 0)


def _interleave(a: np.ndarray, ti: int) -> np.ndarray:
    """[NB, C, W] -> [NB/ti, C, ti*W]: tile b of group i at columns b*W .. b*W+W-1."""
    nb, c, w = a.shape
    return np.ascontiguousarray(a.reshape(nb // ti, ti, c, w).transpose(0, 2, 1, 3).reshape(nb // ti, c, ti * w))


def _deinterleave(a: np.ndarray, ti: int) -> np.ndarray:
    ng, c, tw = a.shape
    return a.reshape(ng, c, ti, tw // ti).transpose(0, 2, 1, 3).reshape(ng * ti, c, tw // ti)


def _pack_dot(t: QuantTensor, ti: int) -> dict[str, np.ndarray]:
    """Tiles of 8 channels x 4 inputs (q8: one byte each; q4: two nibbles, inputs j and j + 4 of 8), `ti` tiles
    interleaved."""
    kp, nb = dot_padded_k(t.scheme, t.k), t.n // 8
    scale = _interleave(t.scale.reshape(nb, 8, -1).transpose(0, 2, 1), ti)
    if t.scheme.bits == 8:
        q = np.zeros((t.n, kp), np.int8)
        q[:, :t.k] = t.q
        return {"q": _interleave(q.reshape(nb, 8, kp // 4, 4).transpose(0, 2, 1, 3).reshape(nb, -1, 32), ti),
                "scale": scale}
    codes = np.full((t.n, kp), 8, np.uint8)
    codes[:, :t.k] = (t.q.astype(np.int16) + 8).astype(np.uint8)
    c = codes.reshape(nb, 8, kp // 8, 2, 4)                      # [tile, channel, 8 inputs = 2 halves x 4]
    byte = c[:, :, :, 0, :] | (c[:, :, :, 1, :] << np.uint8(4))  # [tile, channel, col, 4]
    return {"q": _interleave(byte.transpose(0, 2, 1, 3).reshape(nb, kp // 8, 32), ti), "scale": scale}


def _unpack_dot(arrays: dict[str, np.ndarray], scheme: Scheme, k: int, n: int) -> QuantTensor:
    ti, nb = arrays["q"].shape[2] // 32, n // 8
    q = _deinterleave(arrays["q"], ti)
    scale = _deinterleave(arrays["scale"], ti).transpose(0, 2, 1).reshape(n, -1)
    if scheme.bits == 8:
        logical = q.reshape(nb, -1, 8, 4).transpose(0, 2, 1, 3).reshape(n, -1)
        return QuantTensor(scheme, k, n, q=np.ascontiguousarray(logical[:, :k]), scale=scale)
    byte = q.reshape(nb, -1, 8, 4).transpose(0, 2, 1, 3)             # [tile, channel, col, 4]
    codes = np.stack([byte & np.uint8(15), byte >> np.uint8(4)], axis=3).reshape(n, -1)
    return QuantTensor(scheme, k, n, q=(codes[:, :k].astype(np.int16) - 8).astype(np.int8), scale=scale)
