"""Tokenizers: byte-level default, SentencePiece, and CLIP BPE against an independent implementation."""

import gzip

import numpy as np
import pytest

from mav_jax.data import synthetic, tokenizers

# A small merge table in OpenAI's format; enough to form whole words of the synthetic captions.
MERGES = [
  "r e",
  "re d</w>",
  "c i",
  "ci r",
  "cir c",
  "circ l",
  "circl e</w>",
  "m o",
  "mo v",
  "mov i",
  "movi n",
  "movin g</w>",
  "l e",
  "le f",
  "lef t</w>",
  "t h",
  "th e</w>",
  "s q",
  "u a",
  "sq ua",
]
TEXTS = [
  "a red circle moving left",
  "A RED  Circle, moving LEFT!!",
  "the square's 3 corners é ü 😀",
  "<|endoftext|> red blue",
]


@pytest.fixture(scope="module")
def merges_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("bpe") / "bpe_simple_vocab_test.txt.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: test\n" + "\n".join(MERGES) + "\n")
  return str(path)


def test_byte_tokenizer_round_trips_and_pads():
  tok = tokenizers.ByteTokenizer()
  ids, mask = tokenizers.tokenize_batch(tok, ["a red circle", "é"], 16)
  assert ids.shape == (2, 16) and ids.dtype == np.int32
  assert tok.decode(ids[0]) == "a red circle" and tok.decode(ids[1]) == "é"
  assert mask[0].sum() == len("a red circle") + 2 and mask[1].sum() == 2 + 2  # é is two bytes
  assert (ids[~mask] == tok.pad_id).all()


def test_truncation_keeps_the_end_token_last():
  tok = tokenizers.ByteTokenizer()
  ids, mask = tokenizers.tokenize_batch(tok, ["x" * 50], 8)
  assert mask.all() and ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id


def test_clip_bpe_matches_the_transformers_clip_tokenizer(merges_file):
  from transformers import CLIPTokenizer

  ours = tokenizers.ClipBpeTokenizer(merges_file)
  theirs = CLIPTokenizer(vocab=ours.encoder, merges=[tuple(m.split()) for m in MERGES])
  assert ours.vocab_size == 2 * 256 + len(MERGES) + 2
  for text in TEXTS:
    assert ours.encode(text) == theirs(text)["input_ids"], text
  # Ids pinned to OpenAI's vocabulary order: printable bytes first, "!" is 0 and "a</w>" is 320;
  # the specials follow the merges (49406 and 49407 with the full 48,894-merge file).
  assert ours.encoder["!"] == 0 and ours.encoder["a</w>"] == 320
  assert ours.encode("a") == [512 + len(MERGES), 320, 513 + len(MERGES)]
  # Like OpenAI's tokenizer (not transformers'), HTML entities are unescaped first.
  assert ours.encode("red &amp; blue") == ours.encode("red & blue")
  # Whole-word merges give one token per word of a synthetic caption.
  assert len(ours.encode("a red circle moving left")) == 2 + 5


def test_clip_bpe_rejects_a_malformed_merges_file(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_text("#version\nr e x\n")
  with pytest.raises(ValueError, match="two symbols"):
    tokenizers.ClipBpeTokenizer(str(bad))
  with pytest.raises(FileNotFoundError, match="merges file not found"):
    tokenizers.make_tokenizer("clip_bpe", str(tmp_path / "absent.txt.gz"))


def test_sentencepiece_model_trained_here_round_trips(tmp_path):
  import sentencepiece as spm

  captions = [c for s, c, d in synthetic.COMBINATIONS for c in [f"a {c} {s} moving {d}"]]
  prefix = str(tmp_path / "sp")
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(captions * 5),
    model_prefix=prefix,
    vocab_size=30,
    model_type="unigram",
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    minloglevel=2,
  )
  tok = tokenizers.make_tokenizer("sentencepiece", prefix + ".model")
  ids, mask = tokenizers.tokenize_batch(tok, ["a red circle moving left"], 24)
  assert ids[0, 0] == tok.bos_id and ids[0, mask[0].sum() - 1] == tok.eos_id
  assert tok.decode(ids[0]) == "a red circle moving left"


def test_make_tokenizer_errors_name_the_fix():
  with pytest.raises(ValueError, match="unknown tokenizer"):
    tokenizers.make_tokenizer("wordpiece")
  with pytest.raises(ValueError, match="needs a file"):
    tokenizers.make_tokenizer("sentencepiece")
