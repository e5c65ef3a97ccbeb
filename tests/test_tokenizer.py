"""Our CLIP BPE and A1111 chunker against ids recorded from transformers 4.30.2, open_clip 2.20 and A1111 1.10.1."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from reference import load_json, reference_dir
from trainer.models.tokenizer import (ChunkedPrompt, ClipTokenizer, TokenizerNotFoundError, bytes_to_unicode,
                                      parse_prompt_attention)

DATA = load_json("tokenizer/tokens.json")
RECORDS = DATA["records"]
TEXTS = [r["text"] for r in RECORDS]
IDS = [f"{i:02d}" for i in range(len(RECORDS))]


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer.from_folder(reference_dir() / "tokenizer")


def assert_chunks(got: ChunkedPrompt, expected: dict) -> None:
    assert got.token_count == expected["token_count"]
    assert len(got) == len(expected["chunks"])
    for chunk, ref in zip(got, expected["chunks"]):
        assert chunk.tokens == ref["tokens"]
        assert len(chunk.multipliers) == 77
        assert chunk.multipliers == pytest.approx(ref["multipliers"], abs=1e-6)


def test_record_set_is_complete():
    assert len(RECORDS) == 31


def test_specials_and_comma_come_from_vocab(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (49406, 49407, 49407, 49407)
    assert tok.vocab_size == 49408 and tok.comma_id == 267 and len(tok.ranks) == 48894


def test_load_is_fast():
    best = min(_timed(lambda: ClipTokenizer.from_folder(reference_dir() / "tokenizer")) for _ in range(2))
    assert best < 1.0


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_tokenising_all_prompts_is_fast(tok):
    tok._cache.clear()

    def run():
        for text in TEXTS:
            tok.encode(text)
            tok.tokenize_open_clip(text)
            tok.chunk(text, tok.eos_id)
            tok.chunk(text, 0)

    assert _timed(run) < 1.0


@pytest.mark.parametrize("i", range(len(RECORDS)), ids=IDS)
def test_encode_matches_hf_slow(tok, i):
    assert tok.encode(RECORDS[i]["text"]) == RECORDS[i]["ids"]


@pytest.mark.parametrize("i", range(len(RECORDS)), ids=IDS)
def test_tokenize_sd1(tok, i):
    assert tok.tokenize_sd1(RECORDS[i]["text"]) == RECORDS[i]["sd1_77"]


@pytest.mark.parametrize("i", range(len(RECORDS)), ids=IDS)
def test_tokenize_open_clip(tok, i):
    """Our open_clip front end matches open_clip on every prompt, the documented one included."""
    r = RECORDS[i]
    assert tok.tokenize_open_clip(r["text"]) == r["open_clip_77"]
    assert tok.encode(r["text"], open_clip=True) == r.get("ids_open_clip", r["ids"])


def test_hf_and_open_clip_differ_exactly_where_documented(tok):
    """HF ids padded the open_clip way differ from open_clip only on the literal-special-token prompt."""
    differing = [r["text"] for r in RECORDS if tok.pad77(tok.encode(r["text"]), 0) != r["open_clip_77"]]
    assert differing == DATA["differences"]["ids_open_clip"]
    assert differing == ["<|startoftext|> special tokens in text <|endoftext|>"]
    assert [r["text"] for r in RECORDS if "ids_open_clip" in r] == differing


@pytest.mark.parametrize("i", range(len(RECORDS)), ids=IDS)
def test_chunk_a1111_sd1(tok, i):
    assert_chunks(tok.chunk(RECORDS[i]["text"], pad_id=49407), RECORDS[i]["a1111_sd1"])


@pytest.mark.parametrize("i", range(len(RECORDS)), ids=IDS)
def test_chunk_a1111_open_clip(tok, i):
    assert_chunks(tok.chunk(RECORDS[i]["text"], pad_id=0), RECORDS[i]["a1111_sd2_sdxl_te2"])


@pytest.mark.parametrize("i", range(len(RECORDS)), ids=IDS)
def test_parse_prompt_attention(i):
    got = parse_prompt_attention(RECORDS[i]["text"])
    expected = RECORDS[i]["a1111_parse_prompt_attention"]
    assert [p[0] for p in got] == [p[0] for p in expected]
    assert [p[1] for p in got] == pytest.approx([p[1] for p in expected], abs=1e-6)


def test_parse_prompt_attention_semantics():
    assert parse_prompt_attention("") == [["", 1.0]]
    assert parse_prompt_attention("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    assert parse_prompt_attention(r"\(literal\]") == [["(literal]", 1.0]]
    assert parse_prompt_attention("a [b") == [["a ", 1.0], ["b", 1 / 1.1]]
    assert parse_prompt_attention("a) b]") == [["a) b]", 1.0]]
    assert parse_prompt_attention("x:1.2) y") == [["x:1.2) y", 1.0]]
    assert parse_prompt_attention("a BREAK b") == [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]
    # inside brackets BREAK is scaled, so the chunker no longer recognises it (as in A1111)
    assert parse_prompt_attention("(a BREAK b)") == [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]
    got = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert got == [["a ", 1.0], ["house", 1.1 * 1.1 * 1.3], [" ", 1.1], ["on", 1.0], [" a ", 1.1],
                   ["hill", 0.55], [", sun, ", 1.1], ["sky", 1.1 * 1.1 * 1.1 * 1.1], [".", 1.1]]
    assert parse_prompt_attention("(a:.)") == [["a", 1.0]]  # A1111 raises ValueError here


def test_chunk_emphasis_off_keeps_text_literal(tok):
    text = "(masterpiece:1.2) BREAK [x]"
    chunks = tok.chunk(text, tok.eos_id, emphasis=False)
    ids = tok.encode(text)
    assert len(chunks) == 1 and chunks.token_count == len(ids)
    assert chunks[0].tokens[1:1 + len(ids)] == ids
    assert set(chunks[0].multipliers) == {1.0}


def test_backtracking_boundary(tok):
    # the 76th token is itself a comma: no backtracking, the next chunk starts with the comma
    text = "cat " * 75 + ", dog"
    chunks = tok.chunk(text, tok.eos_id)
    assert chunks[0].tokens[1:76] == [2368] * 75
    assert chunks[1].tokens[1:3] == [tok.comma_id, 1929]
    # a comma 15 tokens before the end moves the 14 tokens after it into the next chunk
    text = "cat " * 60 + "," + " cat" * 20
    chunks = tok.chunk(text, tok.eos_id)
    assert chunks[0].tokens[60:63] == [2368, tok.comma_id, tok.eos_id]
    assert chunks[1].tokens[1:21] == [2368] * 20 and chunks.token_count == 75 + 20
    assert len(tok.chunk(text, tok.eos_id, comma_backtrack=0)[0].tokens) == 77
    assert tok.chunk(text, tok.eos_id, comma_backtrack=0)[1].tokens[1:7] == [2368] * 6
    assert tok.chunk(text, tok.eos_id, comma_backtrack=14)[1].tokens[1:7] == [2368] * 6


def test_chunk_pad_after_first_eos(tok):
    """With a non-EOS pad, everything after the first EOS becomes pad, even prompt tokens (A1111's rule)."""
    chunks = tok.chunk("a <|endoftext|> b", pad_id=0, open_clip=False)
    assert chunks[0].tokens[:4] == [tok.bos_id, 320, tok.eos_id, 0]
    assert set(chunks[0].tokens[3:]) == {0}


def test_empty_and_count(tok):
    chunks = tok.chunk("", tok.eos_id)
    assert len(chunks) == 1 and chunks.token_count == 0
    assert chunks[0].tokens == [tok.bos_id] + [tok.eos_id] * 76
    assert tok.count_tokens("a cat BREAK a dog") == 77


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        ClipTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt") as info:
        ClipTokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_from_pretrained_local_folder_and_subfolder(tmp_path):
    folder = reference_dir() / "tokenizer"
    assert ClipTokenizer.from_pretrained(folder).eos_id == 49407
    assert ClipTokenizer.from_pretrained(folder.parent, subfolder="tokenizer").bos_id == 49406
    with pytest.raises(FileNotFoundError):
        ClipTokenizer.from_pretrained(tmp_path / "nope")


def test_from_pretrained_offline_unknown_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("from_pretrained touched the network while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.perf_counter()
    with pytest.raises(TokenizerNotFoundError) as info:
        ClipTokenizer.from_pretrained("shinkansen-test/no-such-tokenizer-4f2a", subfolder="tokenizer")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert isinstance(info.value, OSError) and "\n" not in message
    assert "could not be found locally" in message and "vocab.json" in message


def _tiny_folder(path: Path) -> dict[str, int]:
    """A 268-entry vocabulary: bytes, a few end-of-word symbols, two merges, specials with non-CLIP ids."""
    tokens = list(bytes_to_unicode().values())
    tokens += [c + "</w>" for c in "acts,"] + ["ca", "cat</w>"] + ["<|startoftext|>", "<|endoftext|>"]
    tokens += [f"filler{i}" for i in range(300 - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n", encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>"}), encoding="utf-8")
    return vocab


def test_tiny_vocab_roundtrip(tmp_path):
    vocab = _tiny_folder(tmp_path / "tiny")
    tok = ClipTokenizer.from_pretrained(tmp_path, subfolder="tiny")
    assert tok.vocab_size == 300
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["<|startoftext|>"], vocab["<|endoftext|>"],
                                                    vocab["<|endoftext|>"])
    assert tok.comma_id == vocab[",</w>"]
    assert tok.encode("Cat") == [vocab["cat</w>"]]
    assert tok.decode(tok.encode("cat")) == "cat"
    assert tok.encode("cats") == [vocab["ca"], vocab["t"], vocab["s</w>"]]
    assert tok.decode(tok.encode("cats, cat")) == "cats , cat"
    assert tok.encode("dog") == [vocab["d"], vocab["o"], tok.unk_id]  # no "g</w>" in this vocab
    assert tok.tokenize_sd1("cat")[:3] == [tok.bos_id, vocab["cat</w>"], tok.eos_id]
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    chunks = tok.chunk("cat " * 60 + "," + " cat" * 20, pad_id=tok.eos_id)
    assert chunks[0].tokens[61:63] == [tok.comma_id, tok.eos_id] and chunks.token_count == 95
    assert chunks[0].tokens[0] == tok.bos_id and chunks[1].tokens[21:] == [tok.eos_id] * 56
