"""Tokenizers against llama.cpp's published vectors, the reference libraries, and the streaming contract.

llama.cpp's test-tokenizer-0 tokenizes each case with add_special=false (no BOS) and parse_special=false; for the
sentencepiece vocabulary its tokenizer adds the dummy-prefix space, as sentencepiece itself does, so the expected ids
are exactly what encode(text) must return.
"""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

import vocab_cache as vc
from llamac.errors import InputError
from llamac.runtime.tokenizer import (ByteBPETokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer,
                                      load_tokenizer)

N_CASES = 46  # the .inp files hold 46 cases (47 separators-or-lines counting the trailing one)


@pytest.fixture(scope="module")
def spm_tokenizers() -> dict[str, Tokenizer]:
    return {"tokenizer.model": load_tokenizer(vc.or_skip(vc.llama2_spm_model)),
            "tokenizer.json": load_tokenizer(vc.or_skip(vc.llama2_tokenizer_json))}


@pytest.fixture(scope="module")
def llama3_tokenizers() -> dict[str, Tokenizer]:
    d = vc.or_skip(vc.llama3_dir)
    return {"tiktoken": load_tokenizer(d / "tokenizer.model"), "tokenizer.json": load_tokenizer(d / "tokenizer.json")}


def _check_vectors(tok: Tokenizer, kind: str) -> None:
    cases = vc.or_skip(lambda: vc.read_vectors(kind))
    assert len(cases) == N_CASES
    wrong = [(text, tok.encode(text), ids) for text, ids in cases if tok.encode(text) != ids]
    assert not wrong, wrong[:3]
    not_round_trip = [text for text, ids in cases if tok.decode(ids) != text]
    assert not not_round_trip, not_round_trip[:3]


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_llama2_sentencepiece_matches_llama_cpp_vectors(spm_tokenizers, name):
    _check_vectors(spm_tokenizers[name], "spm")


@pytest.mark.parametrize("name", ["tiktoken", "tokenizer.json"])
def test_llama3_bpe_matches_llama_cpp_vectors(llama3_tokenizers, name):
    _check_vectors(llama3_tokenizers[name], "bpe")


def test_backends_are_picked_from_the_file(spm_tokenizers, llama3_tokenizers):
    assert isinstance(spm_tokenizers["tokenizer.model"], SentencePieceTokenizer)
    assert isinstance(spm_tokenizers["tokenizer.json"], HFTokenizer)  # sentencepiece-style json: `tokenizers`
    assert all(isinstance(t, ByteBPETokenizer) for t in llama3_tokenizers.values())  # pure Python


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcXYZ 019'\n\t\r.,!?-_(){}<>|") + ["é", "ß", "ж", "中", "文", "😀", "🦙", "\u200d", "ー"]
    alphabet += ["  ", "\n\n", "'s", "'LL", "<|eot_id|>", "</s>", "<s>"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_llama3_agrees_with_the_tokenizers_library(llama3_tokenizers):
    from tokenizers import Tokenizer as HF

    ref = HF.from_file(str(vc.llama3_dir() / "tokenizer.json"))
    for text in _random_texts(400):
        ref.encode_special_tokens = False
        with_specials = ref.encode(text, add_special_tokens=False).ids
        ref.encode_special_tokens = True
        as_text = ref.encode(text, add_special_tokens=False).ids
        for tok in llama3_tokenizers.values():
            assert tok.encode(text, allow_special=True) == with_specials, text
            assert tok.encode(text) == as_text, text
            assert tok.decode(with_specials) == ref.decode(with_specials, skip_special_tokens=False)
            assert tok.decode(with_specials, skip_special=True) == ref.decode(with_specials, skip_special_tokens=True)


def test_sentencepiece_decode_agrees_with_sentencepiece(spm_tokenizers):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(vc.llama2_spm_model()))
    rng = random.Random(1)
    # Random ids: pieces, control tokens, the bare "▁", a <0x20> byte, whole characters as byte tokens. (Invalid
    # UTF-8 is left out: sentencepiece writes one U+FFFD per bad byte, Python one per maximal bad subsequence.)
    choices = [lambda: rng.randrange(259, 32000), lambda: rng.randrange(3), lambda: 29871, lambda: 3 + 0x20,
               lambda: [3 + b for b in rng.choice("é中🦙").encode()]]
    for _ in range(500):
        ids = []
        for _ in range(rng.randint(0, 10)):
            i = rng.choice(choices)()
            ids += i if isinstance(i, list) else [i]
        for tok in spm_tokenizers.values():
            assert tok.decode(ids, skip_special=True) == sp.decode(ids), ids
    for text in _random_texts(300):
        assert spm_tokenizers["tokenizer.model"].encode(text) == sp.encode(text)
        assert spm_tokenizers["tokenizer.json"].encode(text) == sp.encode(text)


def test_special_tokens(spm_tokenizers, llama3_tokenizers):
    for tok in llama3_tokenizers.values():
        assert tok.vocab_size == 128256 and tok.bos_id == 128000
        assert {128001, 128009} <= set(tok.eos_ids)
        assert tok.token_to_id("<|start_header_id|>") == 128006
        assert tok.encode("<|eot_id|>hi", allow_special=True) == [128009, 6151]
        assert 128009 not in tok.encode("<|eot_id|>hi")  # plain text unless asked
        assert tok.decode([128000, 9906]) == "<|begin_of_text|>Hello"
        assert tok.decode([128000, 9906], skip_special=True) == "Hello"
    tiktoken = llama3_tokenizers["tiktoken"]  # Llama 3.1 names for the 256 specials of the tiktoken file
    assert tiktoken.token_to_id("<|eom_id|>") == 128008 and 128008 in tiktoken.eos_ids
    assert tiktoken.token_to_id("<|reserved_special_token_247|>") is None
    assert tiktoken.token_to_id("<|reserved_special_token_246|>") == 128255
    for tok in spm_tokenizers.values():
        assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (32000, 1, [2])
        assert tok.encode("<s>Hi</s>", allow_special=True) == [1, *tok.encode("Hi"), 2]
        assert 1 not in tok.encode("<s>Hi")
        assert tok.token_to_id("</s>") == 2 and tok.token_to_id("no such piece") is None


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    s = tok.stream()
    return [s.put(i) for i in ids] + [s.flush()]


def test_stream_emits_multibyte_characters_whole(spm_tokenizers, llama3_tokenizers):
    # llama.cpp's vectors: the llama emoji is 4 byte-fallback tokens (spm) / a token ending mid-character (bpe).
    spm = spm_tokenizers["tokenizer.model"]
    assert _stream(spm, [29871, 445, 338, 29871, 243, 162, 169, 156, 29889, 8223]) == \
        ["", " this", " is", " ", "", "", "", "🦙", ".", "cpp", ""]
    bpe = llama3_tokenizers["tiktoken"]
    assert _stream(bpe, [420, 374, 11410, 99, 247, 13, 11055]) == [" this", " is", " ", "", "🦙", ".", "cpp", ""]
    text = "Grüße 👋🏽 世界 — 😶\u200d🌫️ ok\n中文字符 and Ελληνικά 🦙🦙"
    for tok in [*spm_tokenizers.values(), *llama3_tokenizers.values()]:
        pieces = _stream(tok, tok.encode(text))
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == tok.decode(tok.encode(text))


def test_stream_strips_the_dummy_prefix_once(spm_tokenizers):
    for tok in spm_tokenizers.values():
        ids = tok.encode("Hello world")  # "▁Hello", "▁world"
        assert _stream(tok, ids) == ["Hello", " world", ""]
        assert _stream(tok, [tok.bos_id, *ids]) == ["<s>", "Hello", " world", ""]  # BOS is no text
        s = tok.stream(skip_special=True)
        assert [s.put(i) for i in [tok.bos_id, *ids, 2]] == ["", "Hello", " world", ""]


def test_stream_never_emits_broken_utf8(llama3_tokenizers, spm_tokenizers):
    bpe, spm = llama3_tokenizers["tiktoken"], spm_tokenizers["tokenizer.model"]
    lead_byte = bpe.encode("🦙")[0]  # a token holding only the first bytes of the emoji
    s = bpe.stream()
    assert s.put(lead_byte) == "" and s.put(9906) == "\ufffdHello" and s.flush() == ""
    s = spm.stream()
    assert s.put(3 + 0xF0) == "" and s.flush() == "\ufffd"  # a dangling lead byte at the end of generation
    assert spm.decode([3 + 0xF0]) == "\ufffd"


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(InputError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 definitely not a tokenizer")
    with pytest.raises(InputError, match="cannot read"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read"):
        load_tokenizer(tmp_path / "bad.json")


def test_directory_prefers_sentencepiece_model_then_json(tmp_path):
    spm, l3 = vc.or_skip(vc.llama2_spm_model), vc.or_skip(vc.llama3_dir)
    a = tmp_path / "spm_and_json"
    a.mkdir()
    (a / "tokenizer.model").symlink_to(spm)
    (a / "tokenizer.json").symlink_to(vc.llama2_tokenizer_json())
    assert isinstance(load_tokenizer(a), SentencePieceTokenizer)
    b = tmp_path / "tiktoken_and_json"
    b.mkdir()
    (b / "tokenizer.model").symlink_to(l3 / "tokenizer.model")
    (b / "tokenizer.json").symlink_to(l3 / "tokenizer.json")
    tok = load_tokenizer(b)  # the json wins: it names this model's specials (Llama 3.0 here)
    assert tok.token_to_id("<|reserved_special_token_4|>") == 128008
    (b / "tokenizer.json").unlink()
    assert load_tokenizer(b).token_to_id("<|eom_id|>") == 128008


def test_runtime_import_stays_light():
    code = ("import sys, llamac.runtime.tokenizer, llamac.runtime.sampling, llamac.runtime.chat_template;"
            "print(sorted(m for m in ('sentencepiece', 'tokenizers', 'regex', 'torch', 'onnx', 'tvm', "
            "'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
