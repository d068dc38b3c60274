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


@pytest.mark.parametrize("variant", ["digits", "lowercase", "nfkc", "prefix space"])
def test_byte_level_bpe_with_other_steps_encodes_as_the_tokenizers_library(variant, tmp_path):
    """Llama 3's tokenizer.json with a normalizer or pre-tokenizer step our byte-level BPE does not run: the ids are
    the `tokenizers` library's (they were silently different), and decoding still gives the text's bytes back."""
    import copy
    import json

    from tokenizers import Tokenizer
    from vocab_cache import llama3_dir

    spec = copy.deepcopy(json.loads((llama3_dir() / "tokenizer.json").read_text()))
    if variant == "digits":
        spec["pre_tokenizer"]["pretokenizers"].insert(0, {"type": "Digits", "individual_digits": True})
    elif variant == "lowercase":
        spec["normalizer"] = {"type": "Lowercase"}
    elif variant == "nfkc":
        spec["normalizer"] = {"type": "NFKC"}
    else:
        spec["pre_tokenizer"]["pretokenizers"][-1]["add_prefix_space"] = True
    f = tmp_path / "tokenizer.json"
    f.write_text(json.dumps(spec))
    ref, tok = Tokenizer.from_file(str(f)), load_tokenizer(f)
    for text in ("Year 1234567 ok", "Hello WORLD Ünïcode", "ﬁne café 日本"):
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == ref.decode(ids), text


def test_llama3_tokenizer_json_keeps_its_own_encoder(tmp_path):
    """The plain Llama 3 tokenizer.json (one Split regex, then ByteLevel) stays on the built-in byte-level BPE."""
    from vocab_cache import llama3_dir

    assert getattr(load_tokenizer(llama3_dir() / "tokenizer.json"), "_library", None) is None
