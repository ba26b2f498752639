"""Tokenizers: byte-level default, SentencePiece, and CLIP BPE against an independent implementation."""

import ast
import gzip
import importlib.util
import pathlib
import random
import typing

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


# OpenAI's reference tokenizer and vocabulary as clip-anytorch ships them (requirements-ref.txt,
# installed into .ref_pkgs by `make test`), read by path: .ref_pkgs never goes on sys.path.
REF_CLIP = pathlib.Path(__file__).resolve().parents[1] / ".ref_pkgs" / "clip"
CONTEXT = 77  # every CLIP's context length; SOT + up to 75 tokens + EOT


@pytest.fixture(scope="module")
def openai_clip():
  """(OpenAI's SimpleTokenizer with the real vocabulary, OpenAI's clip.tokenize bound to it)."""
  torch = pytest.importorskip("torch")
  paths = [REF_CLIP / f for f in ("simple_tokenizer.py", "clip.py", "bpe_simple_vocab_16e6.txt.gz")]
  for path in paths:
    if not path.exists():
      pytest.skip(f"{path} is not installed: `make test` installs requirements-ref.txt")
  spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", paths[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  reference = module.SimpleTokenizer(str(paths[2]))
  # clip.tokenize itself, taken from clip.py's source (importing clip.py would import torchvision
  # and download machinery): SOT + encode + EOT, zero padding, truncate=True cuts to the context
  # and puts EOT last.
  tree = ast.parse(paths[1].read_text())
  (function,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "tokenize"]
  namespace = {"torch": torch, "_tokenizer": reference}
  namespace.update({name: getattr(typing, name) for name in ("Union", "List")})  # its annotations
  exec(compile(ast.Module([function], []), str(paths[1]), "exec"), namespace)
  return reference, namespace["tokenize"]


def _varied_captions(count: int = 300) -> list[str]:
  """Deterministic captions mixing what web captions hold: case, punctuation, contractions,
  accents and other scripts, emoji (with skin tones, ZWJ sequences, flags), HTML entities (single
  and double escaped), mojibake for ftfy, odd whitespace, special-token text, numbers, URLs, and
  captions far longer than the context."""
  rng = random.Random(22)
  words = (
    "a man woman dog cat riding bike down the street sunset beach playing guitar in slow motion "
    "aerial view of city at night time-lapse clouds over mountains close-up cooking pasta kitchen "
    "children running park snow falling forest drone shot ocean waves surfer red blue green"
  ).split()
  extras = [
    "It's",
    "they're",
    "we'll",
    "I'd",
    "can't",
    "you've",
    "I'M",
    "DON'T",
    "o'clock",
    "rock'n'roll",
    "café",
    "naïve",
    "crème brûlée",
    "Ångström",
    "Straße",
    "São Paulo",
    "Zürich",
    "İstanbul",
    "Привет мир",
    "Ελληνικά",
    "日本語のテキスト",
    "中文字幕",
    "한국어",
    "مرحبا",
    "שלום",
    "हिन्दी",
    "😀",
    "👍🏽",
    "🚴‍♂️",
    "👨‍👩‍👧",
    "🇫🇷",
    "❤️",
    "🔥🔥🔥",
    "★",
    "©",
    "™",
    "½",
    "№",
    "€100",
    "&amp;",
    "&#39;",
    "&quot;hello&quot;",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;amp;",
    "&nbsp;",
    "&#x27;",
    "&hellip;",
    "AT&T",
    "R&D",
    "cafÃ©",
    "â€œquotedâ€\x9d",
    "Ã©tÃ©",
    "<|endoftext|>",
    "<|STARTOFTEXT|>",
    "<|endoftext|>x",
    "<|unk|>",
    "1,234.56",
    "2nd",
    "3D",
    "4K",
    "1080p",
    "60fps",
    "x^2+y^2=z^2",
    "100%",
    "#sunset",
    "@user",
    "https://example.com/a?b=c&d=e",
    "e-mail",
    "...",
    "!!!",
    "?!",
    "--",
    "(wow)",
    "[4K]",
    "{json}",
    '"quoted"',
    "'single'",
    "`tick`",
    "~",
    "|",
    "\\",
    "/",
    "_",
    "*",
    ";",
    ":",
  ]
  spaces = [" ", " ", " ", "  ", "\t", "\n", "\u00a0", " \u200b", "\r\n", "\u3000"]
  captions = ["", " ", "\n\t ", "!", "a", "A", "&amp;", "<|endoftext|>", "😀" * 40]
  captions.append(" ".join(["a dog runs on the beach at sunset."] * 12))  # ~100 tokens
  captions.append("1234567890" * 12)  # one token per digit
  captions.append("supercalifragilisticexpialidocious" * 5)  # one long word
  while len(captions) < count:
    n = rng.choice([1, 3, 6, 12, 25, 60])  # the longest exceed the context
    parts = [rng.choice(extras) if rng.random() < 0.3 else rng.choice(words) for _ in range(n)]
    style = rng.random()
    if style < 0.2:
      parts = [p.upper() for p in parts]
    elif style < 0.4:
      parts = [p.capitalize() for p in parts]
    text = "".join(p + rng.choice(spaces) for p in parts)
    if rng.random() < 0.5:
      text = rng.choice(["", " ", "  ", "\n"]) + text + rng.choice([".", "!", "?", " ...", ""])
    captions.append(text)
  return captions


def test_clip_bpe_matches_openai_simple_tokenizer_on_varied_captions(openai_clip):
  reference, tokenize = openai_clip
  ours = tokenizers.make_tokenizer("clip_bpe", str(REF_CLIP / "bpe_simple_vocab_16e6.txt.gz"))
  assert ours.vocab_size == len(reference.encoder) == 49408
  assert ours.encoder == reference.encoder
  assert (ours.bos_id, ours.eos_id) == (49406, 49407)
  captions = _varied_captions()
  sot, eot = ours.bos_id, ours.eos_id
  differ = [c for c in captions if ours.encode(c) != [sot, *reference.encode(c), eot]]
  examples = [repr(c)[:80] for c in differ[:3]]
  assert not differ, f"{len(differ)} of {len(captions)} captions differ, e.g. {examples}"

  # Fixed-length batches as the pipeline and the evaluations make them, against
  # clip.tokenize(truncate=True): the same ids, padding and cut (EOT kept last).
  ids, mask = tokenizers.tokenize_batch(ours, captions, CONTEXT)
  expected = tokenize(captions, context_length=CONTEXT, truncate=True).numpy()
  np.testing.assert_array_equal(ids, expected)
  lengths = np.array([min(len(ours.encode(c)), CONTEXT) for c in captions])
  np.testing.assert_array_equal(mask.sum(1), lengths)
  assert (mask.sum(1) == CONTEXT).sum() >= 20  # plenty of captions were cut
  assert (ids[mask.sum(1) == CONTEXT, -1] == eot).all()
