"""Caption tokenizers: byte-level (no files), SentencePiece (a model file), CLIP BPE (a merges file).

All share one interface (`encode(text) -> ids` with the tokenizer's own begin/end tokens, plus
`pad_id`, `eos_id` and `vocab_size`) and `tokenize_batch` turns captions into fixed-length int32
ids with a boolean attention mask, as the data pipeline feeds the models.
"""

import functools
import gzip
import html
import json
import os
from typing import Protocol

import numpy as np
import regex

from mav_jax import errors

KINDS = ("byte", "sentencepiece", "clip_bpe")


class Tokenizer(Protocol):
  """What the pipeline needs of a tokenizer."""

  vocab_size: int
  pad_id: int
  eos_id: int | None

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, including the tokenizer's begin / end tokens."""
    ...


def tokenize_batch(
  tokenizer: Tokenizer, texts: list[str], length: int
) -> tuple[np.ndarray, np.ndarray]:
  """Fixed-length ids [n, length] (int32, padded with pad_id) and mask [n, length] (True = token).

  A caption longer than `length` is cut, keeping the end token last (CLIP pools at that position).
  """
  ids = np.full((len(texts), length), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(texts), length), bool)
  for i, text in enumerate(texts):
    tokens = tokenizer.encode(text)
    if len(tokens) > length:
      tokens = tokens[:length]
      if tokenizer.eos_id is not None:
        tokens[-1] = tokenizer.eos_id
    ids[i, : len(tokens)] = tokens
    mask[i, : len(tokens)] = True
  return ids, mask


class ByteTokenizer:
  """UTF-8 bytes shifted past three specials: pad 0, bos 1, eos 2. Needs no files."""

  pad_id, bos_id, eos_id = 0, 1, 2
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str) -> list[int]:
    return [self.bos_id, *(b + self.offset for b in text.encode("utf-8")), self.eos_id]

  def decode(self, ids) -> str:
    data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model file; bos/eos are added when the model defines them."""

  def __init__(self, model_file: str):
    import sentencepiece as spm

    if not os.path.isfile(model_file):
      raise errors.UserFileNotFoundError(f"SentencePiece model file not found: {model_file}")
    self._sp = spm.SentencePieceProcessor(model_file=model_file)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = max(self._sp.pad_id(), 0)
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

  def encode(self, text: str) -> list[int]:
    ids = list(self._sp.encode(text))
    return (
      ([self.bos_id] if self.bos_id is not None else [])
      + ids
      + ([self.eos_id] if self.eos_id is not None else [])
    )

  def decode(self, ids) -> str:
    specials = {self.pad_id, self.bos_id, self.eos_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in specials])


@functools.lru_cache
def _bytes_to_unicode() -> dict[int, str]:
  """The reversible byte -> printable character table of GPT-2 / CLIP BPE, in CLIP's order.

  The 188 printable bytes come first (mapped to themselves), then the other 68 bytes (mapped to
  chr(256 + n)); the vocabulary is built in this order, so the order fixes every token id.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  printable += range(ord("®"), ord("ÿ") + 1)
  table = {b: chr(b) for b in printable}
  for n, b in enumerate(b for b in range(256) if b not in table):
    table[b] = chr(256 + n)
  return table


class ClipBpeTokenizer:
  """OpenAI CLIP's byte-level BPE, from its merges file (`bpe_simple_vocab_16e6.txt.gz`).

  The vocabulary is rebuilt as CLIP builds it: 256 byte symbols, the same with the end-of-word
  marker, one token per merge, then <|startoftext|> and <|endoftext|>. `max_merges` defaults to
  the 48,894 merges OpenAI's tokenizer uses (vocabulary 49,408). Text is cleaned as CLIP cleans it
  (ftfy, HTML unescaping, whitespace) and lower-cased. Padding uses id 0, as OpenAI's `tokenize`.

  Args:
    merges_file: the merges file, gzip-compressed or plain text; its first line is a header.
    max_merges: number of merges to use.
  """

  pad_id = 0
  _PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
  )

  def __init__(self, merges_file: str, max_merges: int = 49152 - 256 - 2):
    if not os.path.isfile(merges_file):
      raise errors.UserFileNotFoundError(f"CLIP BPE merges file not found: {merges_file}")
    opener = gzip.open if merges_file.endswith(".gz") else open
    with opener(merges_file, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")[1 : max_merges + 1]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
      raise errors.UserError(f"{merges_file}: merge lines must hold two symbols, got {bad[:3]}")
    self._byte_encoder = _bytes_to_unicode()
    symbols = list(self._byte_encoder.values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self._ranks = {m: i for i, m in enumerate(merges)}
    self.bos_id = self.encoder["<|startoftext|>"]
    self.eos_id = self.encoder["<|endoftext|>"]
    self.vocab_size = len(vocab)
    self._cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}

  @staticmethod
  def clean(text: str) -> str:
    try:
      import ftfy

      text = ftfy.fix_text(text)
    except ImportError:  # ASCII captions need no fixing; others may differ slightly from CLIP
      pass
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()

  def _bpe(self, token: str) -> str:
    if token in self._cache:
      return self._cache[token]
    word = [*token[:-1], token[-1] + "</w>"]
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
      best = min(pairs, key=lambda p: self._ranks.get(p, float("inf")))
      if best not in self._ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[token] = " ".join(word)
    return self._cache[token]

  def encode(self, text: str) -> list[int]:
    ids = [self.bos_id]
    for token in self._PATTERN.findall(self.clean(text)):
      symbols = "".join(self._byte_encoder[b] for b in token.encode("utf-8"))
      ids.extend(self.encoder[piece] for piece in self._bpe(symbols).split(" "))
    return ids + [self.eos_id]


def check_clip_vocab(tokenizer: ClipBpeTokenizer, vocab_file: str) -> None:
  """A UserError naming the first id whose token differs between the vocabulary `tokenizer` builds
  from its merges and `vocab_file` (Hugging Face's CLIPTokenizer vocab.json: token -> id), or the
  first token only one of them has. Equal vocabularies give equal ids for every text."""
  if not os.path.isfile(vocab_file):
    raise errors.UserFileNotFoundError(f"CLIP vocabulary file not found: {vocab_file}")
  with open(vocab_file, encoding="utf-8") as f:
    theirs = {int(i): token for token, i in json.load(f).items()}
  ours = {i: token for token, i in tokenizer.encoder.items()}
  for i in sorted(set(ours) | set(theirs)):
    if ours.get(i) != theirs.get(i):
      raise errors.UserError(
        f"{vocab_file} does not match the merges file: id {i} is {theirs.get(i)!r} there and "
        f"{ours.get(i)!r} in the vocabulary the merges build ({len(theirs)} and "
        f"{len(ours)} tokens); use the vocab.json and merges.txt of one tokenizer"
      )


def make_tokenizer(kind: str = "byte", path: str | None = None) -> Tokenizer:
  """The tokenizer `kind` ("byte", "sentencepiece" or "clip_bpe"), reading `path` if it needs one."""
  if kind == "byte":
    return ByteTokenizer()
  if kind not in KINDS:
    raise errors.UserError(f"unknown tokenizer {kind!r}; choose one of {KINDS}")
  if not path:
    raise errors.UserError(
      f"the {kind} tokenizer needs a file: set the tokenizer path in the config"
    )
  return SentencePieceTokenizer(path) if kind == "sentencepiece" else ClipBpeTokenizer(path)
