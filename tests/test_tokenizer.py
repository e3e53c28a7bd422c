"""Tests for keel_jax.tokenizer: byte and locally trained BPE tokenizers."""

import numpy as np
import pytest

from keel_jax import tokenizer as tokenizer_lib
from keel_jax.errors import ConfigError, DataError

_TEXTS = [
    'def f(x):\n  return x * 2  # double\n',
    'naïve café, Grüße, 日本語, emoji 🙂 and plain ascii words words words\n',
    'class A:\n  def __init__(self):\n    self.value = 0\n',
] * 20


@pytest.fixture(scope='module')
def bpe():
  return tokenizer_lib.train_bpe(iter(_TEXTS), 300)


def test_byte_roundtrip_non_ascii():
  tok = tokenizer_lib.ByteTokenizer()
  text = 'héllo 日本 🙂\n'
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, np.frombuffer(text.encode('utf-8'), np.uint8))
  assert tok.decode(ids) == text
  np.testing.assert_array_equal(tok.encode_bytes(b'\xff\x00'), [255, 0])
  # eos (and ids past the byte range, e.g. a padded model vocab) are dropped.
  assert tok.decode(np.concatenate([ids[:2], [tok.eos_id, 300], ids[2:]])) == text
  # Invalid UTF-8 (a cut multi-byte char) decodes with a replacement character.
  assert tok.decode(tok.encode('日')[:2]) == '\ufffd'
  assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_bpe_roundtrip_and_save_load(bpe, tmp_path):
  assert bpe.vocab_size <= 300 and bpe.vocab_size > 257
  text = _TEXTS[1] + _TEXTS[0]
  ids = bpe.encode(text)
  assert ids.dtype == np.int32
  assert len(ids) < len(text.encode('utf-8'))  # Merges were learnt.
  assert bpe.decode(ids) == text
  # Unseen characters still encode (full byte alphabet).
  assert bpe.decode(bpe.encode('Ωμέγα ∑')) == 'Ωμέγα ∑'
  tokenizer_lib.save_tokenizer(bpe, str(tmp_path))
  again = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert isinstance(again, tokenizer_lib.BPETokenizer)
  np.testing.assert_array_equal(again.encode(text), ids)
  assert (again.vocab_size, again.eos_id) == (bpe.vocab_size, bpe.eos_id)
  assert again.fingerprint() == bpe.fingerprint()
  many = again.encode_many([t.encode() for t in _TEXTS[:3]])
  for t, m in zip(_TEXTS[:3], many):
    np.testing.assert_array_equal(m, bpe.encode(t))


def test_bpe_eos_text_is_not_eos(bpe, tmp_path):
  text = 'x = "<|eos|>"'
  assert bpe.eos_id not in bpe.encode(text)
  tokenizer_lib.save_tokenizer(bpe, str(tmp_path))
  assert tokenizer_lib.load_tokenizer(str(tmp_path)).eos_id not in bpe.encode(text)
  ids = np.concatenate([bpe.encode('a'), [bpe.eos_id], bpe.encode('b')])
  assert bpe.decode(ids) == 'ab'


def test_bpe_training_is_deterministic(bpe):
  assert tokenizer_lib.train_bpe(iter(_TEXTS), 300).fingerprint() == bpe.fingerprint()


def test_byte_save_load(tmp_path):
  tokenizer_lib.save_tokenizer(tokenizer_lib.ByteTokenizer(), str(tmp_path))
  assert isinstance(tokenizer_lib.load_tokenizer(str(tmp_path)), tokenizer_lib.ByteTokenizer)


def test_errors(tmp_path):
  with pytest.raises(ConfigError, match='bpe_vocab_size'):
    tokenizer_lib.train_bpe(iter(_TEXTS), 256)
  with pytest.raises(DataError, match='no tokenizer'):
    tokenizer_lib.load_tokenizer(str(tmp_path / 'missing'))


def test_can_encode(bpe):
  for tok in (tokenizer_lib.ByteTokenizer(), bpe):
    assert tok.decode(tok.encode('ok ü')) == 'ok ü'
    assert tokenizer_lib.can_encode(tok, 'ok ü 日本') == (True, [])
    assert tokenizer_lib.can_encode(tok, 'bad \udcff') == (False, ['\udcff'])
