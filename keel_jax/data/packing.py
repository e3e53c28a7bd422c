"""Token streams: documents tokenized and joined with `eos` between them, one stream per split.

Training examples are consecutive windows of `seq_len + 1` tokens of a stream that may cross
document boundaries (nanoGPT-style packing; keel_jax/data/iteration.py cuts them).

On-disk format (written by `write_prepared`, used by `python -m keel_jax.prepare` and as the
BPE cache in a workdir): `train.bin`, `val.bin` (raw little-endian uint16 or uint32 tokens),
`meta.json` (written last: its presence marks a complete directory) and `tokenizer/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np
import tqdm

from keel_jax import tokenizer as tokenizer_lib
from keel_jax.data.sources import read_docs
from keel_jax.errors import DataError

FORMAT_VERSION = 1
_CHUNK_BYTES = 4 << 20  # Files are encoded in batches of about this size (BPE runs in parallel).


@dataclasses.dataclass
class TokenData:
  """Tokenized corpus. `train`/`val` are 1-D uint16/uint32 streams (np.memmap when on disk)."""

  train: np.ndarray
  val: np.ndarray
  bytes_per_token_val: float  # UTF-8 bytes of validation text / its non-eos tokens.
  num_files_train: int
  num_files_val: int
  skipped: dict[str, int]  # Reason ('empty', 'unreadable', 'undecodable') -> number of files.


def _encoded_docs(files, tok, on_bad_file, skipped) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (utf-8 byte count, int32 ids) per usable file, encoding in batches for speed."""
  chunk, size = [], 0
  for data in read_docs(files, tok.kind != 'byte', on_bad_file, skipped):
    chunk.append(data)
    size += len(data)
    if size >= _CHUNK_BYTES:
      yield from zip(map(len, chunk), tok.encode_many(chunk))
      chunk, size = [], 0
  if chunk:
    yield from zip(map(len, chunk), tok.encode_many(chunk))


def token_dtype(vocab_size: int) -> np.dtype:
  """Little-endian uint16 when every id fits, else uint32 (the on-disk and in-memory dtype)."""
  return np.dtype('<u2') if vocab_size <= 2**16 else np.dtype('<u4')


class _StreamWriter:
  """Appends documents to one stream with eos between them, in memory or to a file."""

  def __init__(self, eos_id: int, dtype: np.dtype, path: str | None = None):
    self._eos = np.array([eos_id], dtype)
    self._dtype = dtype
    self._parts: list[np.ndarray] = []
    self._file = open(path, 'wb') if path else None
    self.num_docs = self.num_tokens = self.num_bytes = 0

  def append(self, nbytes: int, ids: np.ndarray) -> None:
    parts = [self._eos, ids.astype(self._dtype)] if self.num_docs else [ids.astype(self._dtype)]
    for p in parts:
      if self._file:
        self._file.write(p.tobytes())
      else:
        self._parts.append(p)
    self.num_docs += 1
    self.num_tokens += len(ids) + (len(parts) - 1)
    self.num_bytes += nbytes

  def finish(self) -> np.ndarray | None:
    if self._file:
      self._file.close()
      return None
    return np.concatenate(self._parts) if self._parts else np.zeros(0, self._dtype)

  def bytes_per_token(self) -> float:
    content = self.num_tokens - max(self.num_docs - 1, 0)  # eos carries no text
    return self.num_bytes / content if content else float('nan')


def tokenize_split(files, tok, on_bad_file, skipped, path=None, desc=None):
  """Returns (writer with counts, the stream, or None when written to `path`)."""
  writer = _StreamWriter(tok.eos_id, token_dtype(tok.vocab_size), path)
  try:
    bar = tqdm.tqdm(files, desc=desc, unit='file', disable=desc is None)
    for nbytes, ids in _encoded_docs(bar, tok, on_bad_file, skipped):
      writer.append(nbytes, ids)
  finally:
    stream = writer.finish()
  return writer, stream


def write_prepared(train_files, val_files, tok, out_dir: str, on_bad_file: str = 'skip',
                   progress: bool = False) -> dict:
  """Tokenizes file by file straight to `out_dir/{train,val}.bin` (bounded memory).

  Returns the meta dict also written to `out_dir/meta.json`.
  """
  os.makedirs(out_dir, exist_ok=True)
  meta_path = os.path.join(out_dir, 'meta.json')
  if os.path.exists(meta_path):
    os.remove(meta_path)  # Mark incomplete while rewriting.
  tokenizer_lib.save_tokenizer(tok, os.path.join(out_dir, 'tokenizer'))
  skipped: dict[str, int] = {}
  writers = {}
  for split, files in (('train', train_files), ('val', val_files)):
    writers[split], _ = tokenize_split(
        files, tok, on_bad_file, skipped, path=os.path.join(out_dir, f'{split}.bin'),
        desc=f'tokenizing {split}' if progress else None)
  meta = {
      'format_version': FORMAT_VERSION,
      'dtype': token_dtype(tok.vocab_size).str,
      'tokenizer': tok.kind,
      'tokenizer_fingerprint': tok.fingerprint(),
      'vocab_size': tok.vocab_size,
      'eos_id': tok.eos_id,
      'train_tokens': writers['train'].num_tokens,
      'val_tokens': writers['val'].num_tokens,
      'bytes_per_token_val': writers['val'].bytes_per_token(),
      'num_files_train': writers['train'].num_docs,
      'num_files_val': writers['val'].num_docs,
      'skipped': skipped,
  }
  with open(meta_path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=2)
  os.replace(meta_path + '.tmp', meta_path)
  return meta


def _read_meta(directory: str) -> dict:
  path = os.path.join(directory, 'meta.json')
  if not os.path.exists(path):
    raise DataError(f'{directory!r} is not a prepared data directory (no meta.json); '
                    'create it with `python -m keel_jax.prepare --out DIR ...`')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _memmap(path: str, dtype: str, count: int) -> np.ndarray:
  if count == 0:  # mmap cannot map an empty file.
    return np.zeros(0, np.dtype(dtype))
  if not os.path.exists(path) or os.path.getsize(path) != count * np.dtype(dtype).itemsize:
    raise DataError(f'{path} is missing or does not hold {count} tokens of {dtype} (see meta.json)')
  return np.memmap(path, dtype=np.dtype(dtype), mode='r', shape=(count,))


def open_prepared(directory: str, seq_len: int = 0, batch_size: int = 1,
                  check_val: bool = True) -> TokenData:
  """Opens a prepared directory as memmaps (length checks first, from meta.json alone)."""
  meta = _read_meta(directory)
  if seq_len:
    check_lengths(meta['train_tokens'], meta['val_tokens'], seq_len, batch_size, check_val)
  return TokenData(
      train=_memmap(os.path.join(directory, 'train.bin'), meta['dtype'], meta['train_tokens']),
      val=_memmap(os.path.join(directory, 'val.bin'), meta['dtype'], meta['val_tokens']),
      bytes_per_token_val=float(meta['bytes_per_token_val']),
      num_files_train=meta['num_files_train'], num_files_val=meta['num_files_val'],
      skipped=dict(meta['skipped']))


def check_lengths(n_train: int, n_val: int, seq_len: int, batch_size: int, check_val: bool,
                   bound: bool = False):
  """Raises DataError if a split is too short. `bound`: the counts are upper bounds."""
  has = 'has at most' if bound else 'has'
  need_train = batch_size * seq_len + 1
  if n_train < need_train:
    raise DataError(
        f'the train split {has} {n_train} tokens, too few for one global batch of {batch_size} '
        f'windows of data.seq_len={seq_len} (+1) tokens: needs >= {need_train}; use more data '
        'or a smaller seq_len / batch_size')
  if check_val and n_val < seq_len + 1:
    raise DataError(
        f'the validation split {has} {n_val} tokens, too few for one window of '
        f'data.seq_len={seq_len} (+1) tokens; raise data.val_fraction or lower data.seq_len')
