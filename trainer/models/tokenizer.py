"""CLIP byte-level BPE tokenizer and A1111-compatible prompt chunking, without ``transformers``.

Why not ``transformers.CLIPTokenizer``: the trainer runs both inside the AUTOMATIC1111 WebUI (transformers
4.30.2) and standalone (transformers 5.x), and the tokenizer backends changed in between; the fast tokenizer
also never matched the slow one (no HTML unescaping, no ligature / full-width folding). Owning the code
below makes the ids identical everywhere.

Two text front-ends exist because SD checkpoints were trained with two different CLIP tokenizers:

* Hugging Face slow ``CLIPTokenizer`` (SD1 text encoder, SDXL text encoder 1, kohya): literal
  ``<|startoftext|>`` / ``<|endoftext|>`` in the text are split out first and become the special ids; every
  other stretch goes through ``ftfy.fix_text`` on its own (ftfy's HTML unescaping is skipped for a stretch that
  contains ``<``), whitespace collapsing and lower-casing. This is ``encode(text)``.
* ``open_clip`` (SD2, SDXL text encoder 2 in A1111): ``ftfy.fix_text``, ``html.unescape`` twice, strip,
  whitespace collapsing, lower-casing of the whole text; its specials are spelled ``<start_of_text>`` /
  ``<end_of_text>``, so a literal ``<|startoftext|>`` is ordinary text. This is ``encode(text, open_clip=True)``.

Without ftfy (it is a dependency; this is a degraded path) both front-ends fall back to ``html.unescape``
twice: ids then differ from the reference for mojibake, ligatures and full-width forms.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import regex

from ..errors import UserError
from .prompt_parser import parse_prompt_attention

try:
    import ftfy
except ImportError:  # pragma: no cover - ftfy is a declared dependency
    ftfy = None

__all__ = ["ClipTokenizer", "Chunk", "ChunkedPrompt", "TokenizerNotFoundError", "parse_prompt_attention",
           "bytes_to_unicode"]

HAVE_FTFY = ftfy is not None
END_OF_WORD = "</w>"
CHUNK_LENGTH = 75
# Hugging Face's slow CLIPTokenizer reads at most this many merges (49152 - 256 bytes - 2 specials).
MAX_MERGES = 49152 - 256 - 2
OPEN_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")
_WORD_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_WHITESPACE = regex.compile(r"\s+")
_BPE_CACHE_LIMIT = 100_000


class TokenizerNotFoundError(UserError, OSError):
    """A tokenizer named by hub id is neither in the local cache nor downloadable."""


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character table of GPT-2/CLIP byte-level BPE.

    BPE merges are stored as text, so each byte needs a visible, non-whitespace stand-in: printable Latin-1
    bytes stand for themselves, the remaining 68 bytes get code points 256, 257, ... in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _fix_text(text: str) -> str:
    """Hugging Face's cleaning step: ftfy only (its own HTML unescaping is skipped when ``<`` is present)."""
    return ftfy.fix_text(text) if ftfy is not None else html.unescape(html.unescape(text))


def _basic_clean(text: str) -> str:
    """open_clip's cleaning step: ftfy, then unconditional double HTML unescaping."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


@dataclass
class Chunk:
    """One 77-token window: BOS, 75 prompt/padding tokens, EOS (+ the final padding rule), one multiplier each."""
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


class ChunkedPrompt(list):
    """``list[Chunk]`` that also carries A1111's ``token_count`` (what the WebUI shows as "n/75").

    A plain list subclass so callers that only want the chunks can index / iterate it directly.
    """

    def __init__(self, chunks: Iterable[Chunk] = (), token_count: int = 0):
        super().__init__(chunks)
        self.token_count = token_count

    def __repr__(self) -> str:
        return f"ChunkedPrompt({len(self)} chunks, token_count={self.token_count})"


def _special_name(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # serialised AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


class ClipTokenizer:
    """OpenAI CLIP BPE over a Hugging Face tokenizer folder (``vocab.json`` + ``merges.txt``).

    Special ids, the pad id and the comma id used for A1111's backtracking are all looked up in the vocab, so a
    reduced vocabulary (e.g. a tiny test model) works the same way as the real 49,408-entry one.
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
                 unk_token: str | None = None, pad_token: str | None = None, model_max_length: int = 77):
        for name in (bos_token, eos_token):
            if name not in vocab:
                raise ValueError(f"special token {name!r} is not in the vocabulary")
        self.vocab = dict(vocab)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id: int = self.vocab[bos_token]
        self.eos_id: int = self.vocab[eos_token]
        self.unk_id: int = self.vocab.get(unk_token or eos_token, self.eos_id)
        # HF pads with its pad token (the EOS for OpenAI CLIP; "!" = 0 for the SD2 / SDXL-te2 folders).
        self.pad_id: int = self.vocab.get(pad_token or eos_token, self.eos_id)
        self.comma_id: int | None = self.vocab.get("," + END_OF_WORD)
        self.vocab_size: int = len(self.vocab)
        self.model_max_length = model_max_length
        self._byte_chars = [bytes_to_unicode()[b] for b in range(256)]
        self._byte_values = {c: b for b, c in enumerate(self._byte_chars)}
        self._cache: dict[str, tuple[int, ...]] = {}

        hf_specials = sorted({n for n in (bos_token, eos_token, unk_token, pad_token) if n in self.vocab},
                             key=len, reverse=True)
        self._hf_split = regex.compile("(" + "|".join(regex.escape(n) for n in hf_specials) + ")")
        self._hf_specials = {n: self.vocab[n] for n in hf_specials}
        self._hf_pattern = regex.compile(
            "|".join(regex.escape(n) for n in (bos_token, eos_token)) + "|" + _WORD_PATTERN, regex.IGNORECASE)
        self._oc_specials = dict(zip(OPEN_CLIP_SPECIALS, (self.bos_id, self.eos_id)))
        self._oc_pattern = regex.compile(
            "|".join(regex.escape(n) for n in OPEN_CLIP_SPECIALS) + "|" + _WORD_PATTERN, regex.IGNORECASE)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write a Hugging Face ``CLIPTokenizer`` folder (vocab.json, merges.txt, special tokens)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                    "unk_token": self.id_to_token[self.unk_id], "pad_token": self.id_to_token[self.pad_id]}
        merges = sorted(self.ranks, key=self.ranks.__getitem__)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                           encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"model_max_length": self.model_max_length, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
             "errors": "replace", "add_prefix_space": False, **specials}, indent=2), encoding="utf-8")
        return folder

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "ClipTokenizer":
        """Load a Hugging Face CLIPTokenizer folder; special token names come from its json configs."""
        folder = Path(path)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"CLIP tokenizer folder {folder} has no {name}")
        with open(folder / "vocab.json", encoding="utf-8") as f:
            vocab = json.load(f)
        with open(folder / "merges.txt", encoding="utf-8") as f:
            lines = f.read().strip().split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(line.split()) for line in lines[:MAX_MERGES] if line.strip()]
        config: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map overrides, as in HF
            if (folder / name).is_file():
                with open(folder / name, encoding="utf-8") as f:
                    config.update(json.load(f))
        max_len = config.get("model_max_length")
        try:
            return cls(vocab, merges,
                       bos_token=_special_name(config, "bos_token") or "<|startoftext|>",
                       eos_token=_special_name(config, "eos_token") or "<|endoftext|>",
                       unk_token=_special_name(config, "unk_token"),
                       pad_token=_special_name(config, "pad_token"),
                       model_max_length=max_len if isinstance(max_len, int) and max_len < 10**6 else 77)
        except ValueError as e:
            raise ValueError(f"CLIP tokenizer folder {folder}: {e}") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, subfolder: str | None = None) -> "ClipTokenizer":
        """A local folder, or a Hugging Face hub id (e.g. ``"runwayml/stable-diffusion-v1-5", "tokenizer"``).

        The hub cache is tried first without network; the network only when neither ``HF_HUB_OFFLINE`` nor
        ``TRANSFORMERS_OFFLINE`` is set. Failure is a :class:`TokenizerNotFoundError` (an ``OSError``).
        """
        root = Path(name_or_path)
        local = root / subfolder if subfolder else root
        if local.is_dir():
            return cls.from_folder(local)
        text = str(name_or_path)
        if root.exists() or text.startswith((".", "/", "~", "\\")) or os.path.isabs(text) or text.count("/") > 1:
            raise FileNotFoundError(f"CLIP tokenizer folder {local} does not exist")
        return cls.from_folder(_hub_folder(text, subfolder))

    # ------------------------------------------------------------------ encoding
    def _bpe_ids(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-token (already byte-mapped): apply the lowest-ranked merge until none applies."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        symbols = [*piece[:-1], piece[-1] + END_OF_WORD]
        ranks = self.ranks
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, MAX_MERGES * 10))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = tuple(self.vocab.get(s, self.unk_id) for s in symbols)
        if len(self._cache) >= _BPE_CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def _encode_clean(self, text: str, pattern: regex.Pattern, specials: dict[str, int], out: list[int]) -> None:
        for m in pattern.finditer(text):
            piece = m.group(0)
            special = specials.get(piece)
            if special is not None:
                out.append(special)
            else:
                out.extend(self._bpe_ids("".join(self._byte_chars[b] for b in piece.encode("utf-8"))))

    def encode(self, text: str, *, open_clip: bool = False) -> list[int]:
        """Token ids without BOS/EOS, untruncated (HF slow tokenizer, or open_clip with ``open_clip=True``)."""
        ids: list[int] = []
        if open_clip:
            self._encode_clean(_collapse(_basic_clean(text)).lower(), self._oc_pattern, self._oc_specials, ids)
            return ids
        for part in self._hf_split.split(text):
            if not part:
                continue
            special = self._hf_specials.get(part)
            if special is not None:
                ids.append(special)
            else:
                self._encode_clean(_collapse(_fix_text(part)).lower(), self._hf_pattern, self._hf_specials, ids)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids`` as HF decodes it: end-of-word markers become spaces; specials dropped by default."""
        specials = {self.bos_id, self.eos_id, self.pad_id} if skip_special else set()
        text = "".join(self.id_to_token.get(i, "") for i in ids if i not in specials)
        data = bytearray()
        for ch in text:
            b = self._byte_values.get(ch)
            data.extend([b] if b is not None else ch.encode("utf-8"))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def pad77(self, ids: Sequence[int], pad_id: int, length: int = 77) -> list[int]:
        """BOS + ids[:length-2] + EOS + pad: HF ``truncation=True`` and open_clip's overflow rule agree on this."""
        body = [self.bos_id, *ids[:length - 2], self.eos_id]
        return body + [pad_id] * (length - len(body))

    def tokenize_sd1(self, text: str) -> list[int]:
        """HF ``tokenizer(text, padding="max_length", max_length=77, truncation=True)`` (ldm / kohya SD1)."""
        return self.pad77(self.encode(text), self.pad_id)

    def tokenize_open_clip(self, text: str) -> list[int]:
        """``open_clip.tokenize(text)[0]``: open_clip text rules, pad 0, EOT kept in the last place on overflow."""
        return self.pad77(self.encode(text, open_clip=True), 0)

    # ------------------------------------------------------------------ A1111 chunking
    def chunk(self, text: str, pad_id: int, emphasis: bool = True, comma_backtrack: int = 20, *,
              open_clip: bool | None = None) -> ChunkedPrompt:
        """A1111 v1.10.1 ``tokenize_line``: the prompt as 77-token chunks with per-token emphasis multipliers.

        ``pad_id``: the 75-token body is padded with EOS as in A1111; if ``pad_id`` differs from EOS, everything
        after the first EOS of each chunk then becomes ``pad_id`` (A1111's OpenCLIP wrapper does this with 0).
        ``open_clip``: which text front-end tokenises the pieces; default ``pad_id == 0``, because in A1111 pad 0
        means the OpenCLIP wrapper (SD2, SDXL text encoder 2), pad EOS the HF one (SD1, SDXL text encoder 1).
        ``emphasis=False`` is A1111's emphasis "None": the whole line is one piece of weight 1, so brackets and
        ``BREAK`` stay literal text (its "Ignore" mode instead parses and discards weights: use the multipliers
        of ``emphasis=True`` and ignore them). ``comma_backtrack`` is ``comma_padding_backtrack`` (0 = off).
        Textual-inversion embeddings are not expanded.
        Returns a :class:`ChunkedPrompt` (a list of :class:`Chunk`) whose ``token_count`` is A1111's count: a
        chunk closed by ``BREAK`` or by backtracking counts as 75, the last one as its real length.
        """
        if open_clip is None:
            open_clip = pad_id == 0
        pieces = parse_prompt_attention(text) if emphasis else [[text, 1.0]]
        chunks = ChunkedPrompt()
        tokens: list[int] = []
        mults: list[float] = []
        last_comma = -1

        def close(is_last: bool = False) -> None:
            nonlocal tokens, mults, last_comma
            chunks.token_count += len(tokens) if is_last else CHUNK_LENGTH
            fill = CHUNK_LENGTH - len(tokens)
            out = [self.bos_id, *tokens, *[self.eos_id] * fill, self.eos_id]
            if pad_id != self.eos_id:
                first_end = out.index(self.eos_id)
                out[first_end + 1:] = [pad_id] * (len(out) - first_end - 1)
            chunks.append(Chunk(out, [1.0, *mults, *[1.0] * fill, 1.0]))
            tokens, mults, last_comma = [], [], -1

        for piece, weight in pieces:
            if piece == "BREAK" and weight == -1:
                close()
                continue
            for token in self.encode(piece, open_clip=open_clip):
                if token == self.comma_id:
                    last_comma = len(tokens)
                elif (comma_backtrack > 0 and len(tokens) == CHUNK_LENGTH and last_comma != -1
                      and CHUNK_LENGTH - last_comma <= comma_backtrack):
                    cut = last_comma + 1
                    moved_tokens, moved_mults = tokens[cut:], mults[cut:]
                    del tokens[cut:], mults[cut:]
                    close()
                    tokens, mults = moved_tokens, moved_mults
                if len(tokens) == CHUNK_LENGTH:
                    close()
                tokens.append(token)
                mults.append(float(weight))
        if tokens or not chunks:
            close(is_last=True)
        return chunks

    def count_tokens(self, text: str, emphasis: bool = True, open_clip: bool = False) -> int:
        """A1111's prompt token count (the "n/75" counter) without building embeddings."""
        return self.chunk(text, self.eos_id, emphasis=emphasis, open_clip=open_clip).token_count


def _hub_folder(repo_id: str, subfolder: str | None) -> Path:
    """Folder of a hub tokenizer in the local cache, downloading it only when the hub is not marked offline."""
    where = f"{repo_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    hint = "pass a local folder containing vocab.json and merges.txt instead"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise TokenizerNotFoundError(f"CLIP tokenizer {where} is not a local folder and huggingface_hub is not "
                                     f"installed; {hint}") from e
    offline = _hub_offline()
    error: Exception | None = None
    for local_only in (True,) if offline else (True, False):
        try:
            vocab = hf_hub_download(repo_id, "vocab.json", subfolder=subfolder or None, local_files_only=local_only)
            hf_hub_download(repo_id, "merges.txt", subfolder=subfolder or None, local_files_only=local_only)
        except Exception as e:  # not cached, unknown repo, invalid id, no network: all mean "not available"
            error = e
            continue
        for optional in ("tokenizer_config.json", "special_tokens_map.json"):
            try:
                hf_hub_download(repo_id, optional, subfolder=subfolder or None, local_files_only=local_only)
            except Exception:
                pass
        return Path(vocab).parent
    how = "HF_HUB_OFFLINE is set" if offline else "downloading it failed"
    raise TokenizerNotFoundError(f"CLIP tokenizer {where} could not be found locally and {how} "
                                 f"({type(error).__name__}); {hint}") from error
