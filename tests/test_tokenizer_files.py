"""A GGUF file's embedded vocabulary becomes a working tokenizer file on export (llama.cpp's own test vectors)."""
from __future__ import annotations

import pytest
from gguf import GGUFReader

from vocab_cache import llama_cpp_models_dir, read_vectors

from llamac.export.tokenizer_files import write_tokenizer
from llamac.runtime.tokenizer import load_tokenizer


@pytest.mark.parametrize("kind,filename", [("spm", "tokenizer.model"), ("bpe", "tokenizer.json")])
def test_rebuilt_tokenizer_passes_llama_cpp_vectors(kind, filename, tmp_path):
    path = write_tokenizer(GGUFReader(llama_cpp_models_dir() / f"ggml-vocab-llama-{kind}.gguf"), tmp_path)
    assert path.name == filename
    tok = load_tokenizer(tmp_path)
    cases = read_vectors(kind)
    assert len(cases) >= 46
    failures = [(text, tok.encode(text), ids) for text, ids in cases if tok.encode(text) != ids]
    assert not failures, failures[:3]


def write_llama2c_tokenizer_bin(spm_model, path) -> None:
    """llama2.c's tokenizer.py export format, from a sentencepiece model."""
    import struct

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    pieces = []
    for i in range(sp.get_piece_size()):
        t = {sp.bos_id(): "\n<s>\n", sp.eos_id(): "\n</s>\n"}.get(i, sp.id_to_piece(i)).replace("\u2581", " ")
        pieces.append((sp.get_score(i), t.encode("utf-8")))
    with open(path, "wb") as f:
        f.write(struct.pack("<I", max(len(b) for _, b in pieces)))
        for score, b in pieces:
            f.write(struct.pack("<fI", score, len(b)) + b)


def test_llama2c_tokenizer_bin_converts(tmp_path):
    from vocab_cache import llama2_spm_model

    from llamac.export.tokenizer_files import convert_llama2c_tokenizer

    write_llama2c_tokenizer_bin(llama2_spm_model(), tmp_path / "tokenizer.bin")
    convert_llama2c_tokenizer(tmp_path / "tokenizer.bin", tmp_path)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    failures = [(text, ids) for text, ids in read_vectors("spm") if tok.encode(text) != ids]
    assert not failures, failures[:3]
    assert tok.decode(tok.encode("In the beginning God")) == "In the beginning God"
