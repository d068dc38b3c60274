"""Run a compiled artifact with TVM's runtime library only (no compiler, no onnx, no torch).

An artifact directory holds manifest.json, the compiled step function (model.so), the packed weights (weights.bin,
read into huge pages or memory-mapped: `map_weights`) and the tokenizer. Before anything runs, the manifest's format
version and the sha256 of every file it lists are checked: a tampered or truncated artifact is refused with an
InputError.

The step function is main(input_ids [1, S], attention_mask [1, T], position_ids [1, S], cache_k_0, cache_v_0, ...,
params) -> logits [1, 1, vocab]. The caches are fixed-capacity buffers [1, kv_heads, max_seq_len, head_dim] that the
step updates in place (rows T-S .. T), so a session only keeps the count of filled rows.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from llamac.errors import InputError
from llamac.export.config import ModelConfig

from .prompt import check_ids

FORMAT = "llamac-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREFILL_CHUNK = 256     # prompt tokens per step call: bounds the [heads, chunk, context] attention temporaries
HUGE_PAGE = 2 << 20
_HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def read_manifest(path: Path) -> dict:
    """The artifact's manifest, after checking that this runtime understands its format."""
    f = Path(path) / MANIFEST
    try:
        m = json.loads(f.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not a compiled artifact (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{f}: unreadable manifest ({e})") from None
    if is_webgpu_manifest(m):
        raise InputError(f"{path} is a WebGPU artifact: run it with `llamac run --browser` or serve its page with "
                         f"`llamac serve`")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(f"{f}: not a llamac artifact manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: artifact format version {m.get('format_version')} is not supported by this "
                         f"runtime (version {FORMAT_VERSION}); recompile it with this llamac")
    for key in ("files", "weights", "library", "model", "max_seq_len", "target", "entry", "kv_cache"):
        if key not in m:
            raise InputError(f"{f}: manifest lacks {key!r}")
    _check_manifest(m, f)
    return m


def _check_manifest(m: dict, f: Path) -> None:
    """The fields the runtime acts on have their types, and agree (a context past the KV cache's capacity would
    make the step write past its buffers); the library is one of the checksummed files."""
    def positive_ints(v, n=None):
        return isinstance(v, list) and (n is None or len(v) == n) and all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)

    kv, weights, entry = m["kv_cache"], m["weights"], m["entry"]
    problems = [
        (isinstance(m["files"], dict), "files"), (isinstance(m["model"], dict), "model"),
        (isinstance(m["target"], dict), "target"),
        (isinstance(weights, dict) and isinstance(weights.get("file"), str)
         and isinstance(weights.get("tensors"), list), "weights"),
        (isinstance(entry, dict) and isinstance(entry.get("function"), str), "entry"),
        (isinstance(kv, dict) and positive_ints(kv.get("shape"), 4) and positive_ints([kv.get("count")]), "kv_cache"),
        (isinstance(m["library"], str) and isinstance(m["files"], dict) and m["library"] in m["files"], "library"),
    ]
    for ok, key in problems:
        if not ok:
            raise InputError(f"{f}: malformed manifest ({key})")
    if not positive_ints([m["max_seq_len"]]) or m["max_seq_len"] > kv["shape"][2]:
        raise InputError(f"{f}: malformed manifest (max_seq_len {m['max_seq_len']!r} against a KV cache of "
                         f"{kv['shape'][2]} positions)")
    _check_against_files(m, f)


def _check_against_files(m: dict, f: Path) -> None:
    """The manifest is not checksummed itself: what the runtime takes from it must agree with checksummed files.
    The model config must equal config.json (a larger vocab_size let ids past the embedding table through), the
    weights file must be checksummed, every tensor must lie inside it and the KV cache must fit the model."""
    for name in (m["weights"]["file"], "config.json"):
        if name not in m["files"]:
            raise InputError(f"{f}: malformed manifest ({name} is not among the checksummed files)")
    try:
        config = json.loads((f.parent / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = None       # verify_files reports it
    if config is not None and config != m["model"]:
        raise InputError(f"{f}: the manifest's model differs from config.json (an edited manifest?)")
    info = m["files"][m["weights"]["file"]]
    size = info.get("size") if isinstance(info, dict) else None     # checksummed: verify_files checks the file
    if not isinstance(size, int):
        size = None
    for t in m["weights"]["tensors"]:
        try:
            shape, offset, nbytes = list(t["shape"]), int(t["offset"]), int(t["nbytes"])
            need = int(np.prod(shape, dtype=np.int64)) * np.dtype(t["dtype"]).itemsize
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InputError(f"{f}: malformed manifest (weights tensor {t!r:.80})") from None
        if offset < 0 or nbytes < need or (size is not None and offset + nbytes > size):
            raise InputError(f"{f}: malformed manifest (weights tensor {t.get('name')} does not lie inside "
                             f"{m['weights']['file']})")
    model, kv = m["model"], m["kv_cache"]
    heads = model.get("num_attention_heads") or 1
    want = [1, model.get("num_key_value_heads") or heads, kv["shape"][2],
            model.get("head_dim") or (model.get("hidden_size") or 0) // heads]
    if kv["shape"] != want or kv["count"] != 2 * (model.get("num_hidden_layers") or 0):
        raise InputError(f"{f}: malformed manifest (kv_cache {kv['shape']} x {kv['count']} does not fit the model)")


def is_webgpu_manifest(m) -> bool:
    """A WebGPU artifact's manifest (llamac.web.build writes its own: wasm host, GPU kernels, its own runtime)."""
    return isinstance(m, dict) and isinstance(m.get("target"), dict) and m["target"].get("kind") == "webgpu" \
        and "web" in m


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest lists exists, has its size and its sha256."""
    root = Path(path).resolve()
    for name, info in manifest["files"].items():
        f = (root / name).resolve()
        if root not in f.parents:
            raise InputError(f"{path}: manifest lists a file outside the artifact ({name})")
        if not f.is_file():
            raise InputError(f"{path}: {name} is missing")
        if f.stat().st_size != info.get("size") or sha256_file(f) != info.get("sha256"):
            raise InputError(f"{path}: {name} does not match its checksum (corrupt or modified artifact)")


def _huge_pages_offered() -> bool:
    """Whether Linux backs an anonymous region that asks for it with transparent huge pages ('always', 'madvise')."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode and hasattr(mmap, "MADV_HUGEPAGE")


def _mem_available() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def map_weights(file: Path) -> np.ndarray:
    """The weights file as a writable uint8 array (DLPack refuses read-only memory).

    Decode reads every weight once per token. Where Linux offers transparent huge pages, the file is read into
    anonymous memory that asks for 2 MiB pages: through the file's 4 KiB pages every 4 KiB of weights costs a TLB
    miss, and decode of the 123M model ran 3 % faster at q4 and 4.6 % at q8 (interleaved A/B). Elsewhere, when the
    copy would take more than 3/4 of the available memory (a model that only fits by paging from its file), or with
    LLAMAC_WEIGHTS=mmap, a copy-on-write map of the file: pages come from the page cache and are never written."""
    size = file.stat().st_size
    how = os.environ.get("LLAMAC_WEIGHTS", "")
    if how not in ("", "mmap"):     # a typo would quietly keep the default
        raise InputError(f"LLAMAC_WEIGHTS must be 'mmap' or unset, got {how!r}")
    if (how == "mmap" or size < HUGE_PAGE or not _huge_pages_offered()
            or size > _mem_available() * 3 // 4):
        return np.memmap(file, dtype=np.uint8, mode="c")
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    whole = np.frombuffer(region, dtype=np.uint8)       # keeps the region alive
    start = -whole.ctypes.data % HUGE_PAGE              # huge pages need 2 MiB-aligned ranges
    blob = whole[start:start + size]
    view, done = memoryview(blob), 0
    with open(file, "rb") as fh:
        while done < size:
            n = fh.readinto(view[done:])
            if not n:
                raise InputError(f"{file}: shorter than its {size} bytes while reading")
            done += n
    return blob


# LLVM target features -> the flag Linux lists for them in /proc/cpuinfo ("flags" on x86, "Features" on arm64)
_CPUINFO_FLAG = {"+avx2": "avx2", "+fma": "fma", "+f16c": "f16c", "+avx512f": "avx512f", "+avx512bw": "avx512bw",
                 "+avx512dq": "avx512dq", "+avx512vl": "avx512vl", "+avx512vnni": "avx512_vnni",
                 "+avxvnni": "avx_vnni", "+neon": "asimd", "+dotprod": "asimddp", "+fullfp16": "asimdhp",
                 "+crc": "crc32"}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def missing_cpu_features(mattr: Sequence[str], arch: str) -> list[str]:
    """The target features an artifact for `arch` was compiled with that this CPU does not report (running its
    kernels would die of SIGILL). Empty where /proc/cpuinfo cannot tell: another OS, or an emulator (qemu-user shows
    the host's cpuinfo, x86 "flags" under an aarch64 guest)."""
    key_for_arch = {"x86_64": "flags", "aarch64": "Features"}.get(arch)
    flags: set[str] = set()
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == key_for_arch:
            flags.update(value.split())
    if not flags:
        return []
    return [f.lstrip("+") for f in mattr if f in _CPUINFO_FLAG and _CPUINFO_FLAG[f] not in flags]


def _import_tvm_runtime():
    """Import TVM with only libtvm_runtime loaded. tvm_ffi imports torch when it is installed (5 s, 1 GB): hide it
    for the duration of the import, since nothing here exchanges tensors with torch."""
    # Set for the import only: child processes (a compile started from an app) must get the full library.
    saved = {k: os.environ.get(k) for k in ("TVM_USE_RUNTIME_LIB", "TVM_FFI_DISABLE_TORCH_C_DLPACK")}
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import tvm
        import tvm.runtime.vm  # noqa: F401
    finally:
        if hide:
            del sys.modules["torch"]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return tvm


class TVMModel:
    """A loaded artifact: the VM, the memory-mapped weights and the config. `session()` makes a KV cache."""

    def __init__(self, path: Path, threads: int | None = None, verify: bool = True):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        if verify:
            verify_files(self.path, m)
        arch = m["target"].get("arch")
        host = _HOST_ARCH.get(platform.machine().lower(), platform.machine())
        if arch == "wasm32":
            raise InputError(f"{self.path} is a WebGPU artifact: run it with `llamac run --browser` or serve its page "
                             f"with `llamac serve`")
        if arch != host:
            raise InputError(f"{self.path}: artifact is for {arch} ({m['target'].get('name')}); this machine is "
                             f"{host} (run it there, or with --emulate)")
        missing = missing_cpu_features(m["target"].get("mattr", []), arch)
        if missing:
            raise InputError(f"{self.path}: artifact is for {m['target'].get('name')}, which needs CPU features this "
                             f"machine lacks ({', '.join(missing)}); compile it for another --target")
        self.config = ModelConfig.from_hf_dict(m["model"])
        self.max_seq_len = int(m["max_seq_len"])
        # TVM's default pool on x86 is half the CPUs (it assumes hyper-threads): ask for every usable core
        self.threads = threads = int(threads or _USER_THREADS or _CORES)
        if _POOL["threads"] is None:
            # TVM reads TVM_NUM_THREADS at every parallel launch (1: no pool) and makes its pool, once, that large:
            # room for every core, so that a later model may use more threads than this one
            os.environ["TVM_NUM_THREADS"] = str(max(threads, _CORES))
        tvm = _import_tvm_runtime()
        self._tvm = tvm
        self._config_pool = tvm.get_global_func("runtime.config_threadpool", True)
        self._use_threads()
        self._dev = tvm.cpu()
        lib = tvm.runtime.load_module(str(self.path / m["library"]))
        self._vm = tvm.runtime.vm.VirtualMachine(lib, self._dev)
        try:
            self._main = self._vm[m["entry"]["function"]]
            decode = m["entry"].get("decode")
            self._decode = self._vm[decode] if decode else self._main     # same signature, seq fixed to 1
        except AttributeError:      # TVM: "Module has no function ..."
            raise InputError(f"{self.path}: malformed manifest (entry names a function {m['library']} lacks)") \
                from None
        self._params = self._load_weights(m["weights"])
        kv = m["kv_cache"]
        self._kv_shape = tuple(kv["shape"])
        self._n_caches = int(kv["count"])

    def _load_weights(self, w: dict):
        tvm = self._tvm
        blob = map_weights(self.path / w["file"])
        tensors = []
        for t in w["tensors"]:
            count = int(np.prod(t["shape"])) if t["shape"] else 1
            arr = blob[t["offset"]:t["offset"] + t["nbytes"]].view(np.dtype(t["dtype"]))[:count].reshape(t["shape"])
            try:
                tensors.append(tvm.runtime.from_dlpack(arr))
            except Exception:     # an older DLPack path that rejects this buffer: fall back to a copy
                tensors.append(tvm.runtime.tensor(np.ascontiguousarray(arr), self._dev))
        self._blob = blob
        return tvm.runtime.convert(tensors)     # one FFI array, built once (a list is converted on every call)

    def _use_threads(self) -> None:
        """Size TVM's thread pool (one per process, shared by every model) to this model's thread count."""
        if _POOL["threads"] == self.threads or self._config_pool is None:
            return
        if _AFFINITY:       # configuring binds the calling thread to as many cores as the pool has threads
            os.sched_setaffinity(0, _AFFINITY)
        self._config_pool(0, self.threads)
        _POOL["threads"] = self.threads

    def session(self) -> "TVMSession":
        return TVMSession(self)

    def step(self, ids: np.ndarray, n_past: int, caches: list, stage: "_Inputs") -> np.ndarray:
        self._use_threads()
        total = n_past + ids.shape[1]
        f = self._decode if ids.shape[1] == 1 else self._main
        try:
            return _last_logits(f(*stage.tensors(ids, n_past, total), *caches, self._params))
        except (ValueError, RuntimeError) as e:
            raise _shape_error(self.path, e) from None

    def step_token(self, token: int, n_past: int, caches: list, stage: "_Inputs") -> np.ndarray:
        """`step` for one token that the caller has checked (the decode loop's path: no array is built)."""
        if _POOL["threads"] != self.threads:
            self._use_threads()
        try:
            return _last_logits(self._decode(*stage.one_token(token, n_past), *caches, self._params))
        except (ValueError, RuntimeError) as e:
            raise _shape_error(self.path, e) from None


def _shape_error(path: Path, e: Exception) -> Exception:
    """TVM's check of the step's arguments failing: the manifest's cache or weights disagree with the library (the
    library is checksummed, the manifest is not). Any other error as it was."""
    if "Check failed" in str(e) and "ErrorContext(fn=" in str(e):
        return InputError(f"{path}: the library does not accept the KV cache or weights the manifest describes (an "
                          f"edited manifest?)")
    return e


_POOL = {"threads": None}    # the size TVM's pool was last given (by the model that ran last)
# taken at import, before a model sets TVM_NUM_THREADS or TVM binds this thread to the pool's cores
_USER_THREADS = os.environ.get("TVM_NUM_THREADS")
_AFFINITY = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
_CORES = usable_cores()


def _last_logits(out) -> np.ndarray:
    # a zero-copy view that keeps the VM's output tensor alive (the VM allocates a fresh one per call): .numpy()
    # allocated and copied 128 KB per token, ~0.2 ms of a 4 ms decode step with the caches cold from the weights
    return np.from_dlpack(out)[0, -1].astype(np.float32, copy=False)


def _aligned(n: int, dtype=np.int64) -> np.ndarray:
    """A 64-byte aligned buffer: DLPack hands it to TVM without a copy (TVM requires that alignment)."""
    item = np.dtype(dtype).itemsize
    raw = np.zeros(n + 64 // item, dtype)
    start = (-raw.ctypes.data % 64) // item
    return raw[start:start + n]


class _Inputs:
    """Staging buffers for the step's small int64 inputs, passed to TVM zero-copy (tvm.runtime.tensor() costs
    ~100 us per call in Python; a DLPack view ~1 us)."""

    def __init__(self, tvm, capacity: int, chunk: int):
        self._from_dlpack = tvm.runtime.from_dlpack
        self.ids = _aligned(chunk)
        self.ones = _aligned(capacity)
        self.ones[:] = 1
        self.pos = _aligned(chunk)
        f = self._from_dlpack
        self._one_token = f(self.ids[:1].reshape(1, 1)), f(self.pos[:1].reshape(1, 1))   # decode's, made once

    def one_token(self, token: int, n_past: int) -> list:
        self.ids[0] = token
        self.pos[0] = n_past
        return [self._one_token[0], self._from_dlpack(self.ones[:n_past + 1].reshape(1, n_past + 1)), self._one_token[1]]

    def tensors(self, ids: np.ndarray, n_past: int, total: int) -> list:
        s = ids.shape[1]
        if s == 1:
            return self.one_token(ids[0, 0], n_past)
        f = self._from_dlpack
        mask = f(self.ones[:total].reshape(1, total))
        self.ids[:s] = ids[0]
        self.pos[:s] = np.arange(n_past, total)
        return [f(self.ids[:s].reshape(1, s)), mask, f(self.pos[:s].reshape(1, s))]


class TVMSession:
    """One sequence: fixed-capacity K/V buffers that the step function fills in place."""

    def __init__(self, model: TVMModel):
        self._m = model
        self.max_seq_len = model.max_seq_len
        tvm = model._tvm
        self._caches = [tvm.runtime.empty(model._kv_shape, "float32", model._dev) for _ in range(model._n_caches)]
        self._inputs = _Inputs(tvm, model.max_seq_len, PREFILL_CHUNK)
        self._vocab = model.config.vocab_size
        self.n_past = 0

    def reset(self) -> None:
        self.n_past = 0      # rows past n_past are never read, and each step writes its rows before reading them

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        ids = check_ids(ids, self.n_past, self.max_seq_len, self._m.config.vocab_size)
        logits = None
        for start in range(0, ids.shape[1], PREFILL_CHUNK):
            chunk = ids[:, start:start + PREFILL_CHUNK]
            logits = self._m.step(chunk, self.n_past, self._caches, self._inputs)
            self.n_past += chunk.shape[1]
        return logits

    def decode(self, token: int) -> np.ndarray:
        # the common case checked inline: check_ids' arrays cost 84 us of a ~2.8 ms step (123M q4, caches cold);
        # anything else takes prefill's path, which raises the same errors as for a prompt
        if (type(token) is int or isinstance(token, np.integer)) and 0 <= token < self._vocab \
                and self.n_past < self.max_seq_len:
            logits = self._m.step_token(int(token), self.n_past, self._caches, self._inputs)
            self.n_past += 1
            return logits
        return self.prefill([token])
