"""Tokenizers: raw UTF-8 bytes, or byte-level BPE trained locally with HF `tokenizers`.

Both expose the same small interface, used by the data pipeline, the eval CLI and the sampler:
`vocab_size`, `eos_id`, `kind`, `encode(str)`, `encode_bytes(bytes)`, `encode_many(list[bytes])`,
`decode(ids)`. Ids are int32 numpy arrays. Nothing is ever downloaded: BPE is trained on the
training split and saved beside the run, so ids never change on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

import numpy as np

from keel_jax import paths
from keel_jax.errors import ConfigError, DataError

EOS_TOKEN = '<|eos|>'
_META = 'meta.json'
_HF_FILE = 'tokenizer.json'


def _clean_ids(ids, vocab_size: int) -> list[int]:
  """Flat list of ids in [0, vocab_size): models often pad the vocab, samples may fall past it."""
  ids = np.asarray(ids).reshape(-1)
  return [int(i) for i in ids if 0 <= i < vocab_size]


class ByteTokenizer:
  """UTF-8 bytes 0..255 are tokens 0..255; token 256 (eos) separates documents."""

  kind = 'byte'
  vocab_size = 257
  eos_id = 256
  bytes_per_token = 1.0  # Trivially: one token per UTF-8 byte.

  def encode(self, text: str) -> np.ndarray:
    """Returns int32[num_utf8_bytes]."""
    return self.encode_bytes(text.encode('utf-8'))

  def encode_bytes(self, b: bytes) -> np.ndarray:
    """Any bytes are valid input: int32[len(b)]."""
    return np.frombuffer(b, dtype=np.uint8).astype(np.int32)

  def encode_many(self, docs: Sequence[bytes]) -> list[np.ndarray]:
    return [self.encode_bytes(d) for d in docs]

  def decode(self, ids) -> str:
    """Drops eos (and ids outside the byte range); invalid UTF-8 becomes U+FFFD."""
    return bytes(i for i in _clean_ids(ids, 256)).decode('utf-8', errors='replace')

  def fingerprint(self) -> str:
    return 'byte'

  def __repr__(self) -> str:
    return 'ByteTokenizer()'


class BPETokenizer:
  """Byte-level BPE (GPT-2 style pre-tokenization) wrapping a `tokenizers.Tokenizer`."""

  kind = 'bpe'

  def __init__(self, hf_tokenizer):
    self._tok = hf_tokenizer
    # Text that happens to contain '<|eos|>' must be encoded as plain text, never as the
    # document separator. The flag is not serialised in tokenizer.json, so set it here.
    self._tok.encode_special_tokens = True
    eos = self._tok.token_to_id(EOS_TOKEN)
    if eos is None:
      raise DataError(f'BPE tokenizer has no {EOS_TOKEN} token; was it trained by keel_jax?')
    self.eos_id = int(eos)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

  @property
  def hf_tokenizer(self):
    return self._tok

  def encode(self, text: str) -> np.ndarray:
    """Returns int32[num_tokens]."""
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_bytes(self, b: bytes) -> np.ndarray:
    """Raises UnicodeDecodeError for bytes that are not UTF-8 (BPE works on text)."""
    return self.encode(b.decode('utf-8'))

  def encode_many(self, docs: Sequence[bytes]) -> list[np.ndarray]:
    """Batch encoding runs in parallel in Rust: much faster than a loop over `encode`."""
    texts = [d.decode('utf-8') for d in docs]
    encs = self._tok.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]

  def decode(self, ids) -> str:
    """Drops eos; incomplete UTF-8 sequences become U+FFFD."""
    return self._tok.decode(_clean_ids(ids, self.vocab_size), skip_special_tokens=True)

  def fingerprint(self) -> str:
    return 'bpe-' + hashlib.sha256(self._tok.to_str().encode('utf-8')).hexdigest()[:16]

  def __repr__(self) -> str:
    return f'BPETokenizer(vocab_size={self.vocab_size})'


Tokenizer = ByteTokenizer | BPETokenizer


def train_bpe(texts_iter: Iterable[str], vocab_size: int) -> BPETokenizer:
  """Trains byte-level BPE on `texts_iter` (streamed: only pair counts are held in memory).

  The trainer may stop below `vocab_size` on a small corpus (no pair left to merge); the
  returned tokenizer's `vocab_size` is the real one and includes eos.
  """
  from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

  # 256 byte symbols + eos must fit, plus at least one merge to be worth calling BPE.
  if not isinstance(vocab_size, int) or vocab_size <= 257:
    raise ConfigError('data.bpe_vocab_size', vocab_size, 'an int > 257 (256 bytes + eos)')
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=[EOS_TOKEN],
      # The full byte alphabet guarantees any text is encodable, even chars unseen in training.
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts_iter, trainer=trainer)
  return BPETokenizer(tok)


def save_tokenizer(tok: Tokenizer, directory) -> None:
  """Writes `directory/meta.json` (kind, vocab_size, eos_id) and, for BPE, `tokenizer.json`.
  `directory` is local or gs://; each file is replaced whole (another host never reads half)."""
  directory = paths.makedirs(directory)
  if isinstance(tok, BPETokenizer):
    paths.write_text(directory / _HF_FILE, tok.hf_tokenizer.to_str())
  meta = {'kind': tok.kind, 'vocab_size': tok.vocab_size, 'eos_id': tok.eos_id,
          'fingerprint': tok.fingerprint()}
  paths.write_text(directory / _META, json.dumps(meta, indent=2) + '\n')


def load_tokenizer(directory) -> Tokenizer:
  """Inverse of `save_tokenizer`. Raises DataError if the directory holds no tokenizer."""
  meta_path = paths.path(directory) / _META
  hf_path = paths.path(directory) / _HF_FILE
  kind = None
  if meta_path.exists():
    kind = json.loads(meta_path.read_text(encoding='utf-8')).get('kind')
  elif hf_path.exists():
    kind = 'bpe'  # A bare tokenizer.json, e.g. copied by hand.
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'bpe':
    from tokenizers import Tokenizer as HFTokenizer
    try:
      return BPETokenizer(HFTokenizer.from_str(hf_path.read_text(encoding='utf-8')))
    except Exception as e:  # The Rust side raises a bare Exception for bad files.
      raise DataError(f'cannot read BPE tokenizer {hf_path}: {e}') from e
  raise DataError(f'no tokenizer in {directory!r} (expected {_META} or {_HF_FILE})')


def can_encode(tok: Tokenizer, text: str) -> tuple[bool, list[str]]:
  """Whether `text` can be tokenized; if not, the offending characters.

  Both tokenizers are byte level, so every character with a UTF-8 encoding is encodable; only
  lone surrogates (e.g. from `surrogateescape`-decoded input) have none.
  """
  del tok  # Same answer for both kinds; kept in the signature for future tokenizers.
  try:
    text.encode('utf-8')
    return True, []
  except UnicodeEncodeError:
    bad = sorted({c for c in text if 0xD800 <= ord(c) <= 0xDFFF})
    return False, bad
