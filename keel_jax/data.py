"""Data pipeline: text files -> one packed token stream per split -> Grain iterators of windows.

Documents (files) are tokenized, joined with `eos` between them into one stream per split, and
training examples are consecutive windows of `seq_len + 1` tokens that may cross document
boundaries (nanoGPT-style packing). Window i is `tokens[i * seq_len : i * seq_len + seq_len + 1]`
(inputs and shifted targets in one row), so windows overlap by exactly one token and every token
but the first is a target once per epoch.

The train/validation split is by file, decided by the crc32 of the file's path relative to its
corpus root: independent of file order, machine and of which other files exist.

On-disk format (written by `write_prepared`, used by `python -m keel_jax.prepare` and as the
BPE cache in a workdir): `train.bin`, `val.bin` (raw little-endian uint16 or uint32 tokens),
`meta.json` (written last: its presence marks a complete directory) and `tokenizer/`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import zlib
from collections.abc import Iterator, Sequence

from absl import logging
import grain
import numpy as np
import tqdm

from keel_jax import tokenizer as tokenizer_lib
from keel_jax.errors import ConfigError, DataError

SOURCES = ('stdlib', 'files', 'prepared', 'synthetic')
TOKENIZERS = ('byte', 'bpe')
ON_BAD_FILE = ('skip', 'error')
_FORMAT_VERSION = 1
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


@dataclasses.dataclass(frozen=True)
class CorpusFile:
  path: str  # Where to read it.
  rel: str  # Path relative to the corpus root, '/'-separated: the split key.


# ----------------------------------------------------------------------------- listing & split


def _check_choice(field: str, value, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ConfigError(field, value, 'one of ' + ', '.join(repr(a) for a in allowed))


def _stdlib_files() -> list[CorpusFile]:
  root = sysconfig.get_paths()['stdlib']
  out = []
  for d, dirs, files in os.walk(root):
    # Third-party packages installed into the interpreter are not the stdlib.
    dirs[:] = sorted(x for x in dirs if x not in ('site-packages', 'dist-packages'))
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(d, name)
        out.append(CorpusFile(path, os.path.relpath(path, root).replace(os.sep, '/')))
  return out


def _glob_root(pattern: str) -> str:
  """The fixed directory prefix of a glob ('corpus/**/*.txt' -> 'corpus')."""
  parts = pattern.split(os.sep)
  fixed = []
  for p in parts[:-1]:
    if glob.has_magic(p):
      break
    fixed.append(p)
  return os.sep.join(fixed) or ('/' if pattern.startswith(os.sep) else '.')


def _glob_files(paths: str) -> list[CorpusFile]:
  patterns = [p.strip() for p in (paths or '').split(',') if p.strip()]
  if not patterns:
    raise ConfigError('data.paths', paths, "comma-separated globs, e.g. 'corpus/**/*.txt'")
  out, seen = [], set()
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):  # A bare directory means every file below it.
      root, matches = pattern, glob.glob(os.path.join(glob.escape(pattern), '**', '*'),
                                         recursive=True)
    else:
      root, matches = _glob_root(pattern), glob.glob(pattern, recursive=True)
    matches = sorted(m for m in matches if os.path.isfile(m))
    if not matches:
      raise DataError(f'data.paths glob {pattern!r} matches no file')
    for m in matches:
      key = os.path.realpath(m)
      if key not in seen:
        seen.add(key)
        out.append(CorpusFile(m, os.path.relpath(m, root).replace(os.sep, '/')))
  return out


def list_files(source: str, paths: str = '', max_files: int = 0) -> list[CorpusFile]:
  """The corpus files of 'stdlib' or 'files', sorted by relative path, the first `max_files`."""
  _check_choice('data.source', source, ('stdlib', 'files'))
  files = _stdlib_files() if source == 'stdlib' else _glob_files(paths)
  files.sort(key=lambda f: (f.rel, f.path))
  return files[:max_files] if max_files and max_files > 0 else files


def split_files(files: Sequence[CorpusFile], val_fraction: float
                ) -> tuple[list[CorpusFile], list[CorpusFile]]:
  """(train, val): a file is in val iff crc32(rel) / 2**32 < val_fraction.

  A tiny corpus could leave a split empty by chance; then the file with the lowest (highest)
  hash moves over, so any corpus of >= 2 files yields both splits, still order independent.
  """
  u = {f: zlib.crc32(f.rel.encode('utf-8')) / 2**32 for f in files}
  val = [f for f in files if u[f] < val_fraction]
  train = [f for f in files if u[f] >= val_fraction]
  if val_fraction > 0 and not val and len(train) >= 2:
    first = min(train, key=lambda f: (u[f], f.rel))
    train.remove(first)
    val.append(first)
  if not train and len(val) >= 2:
    last = max(val, key=lambda f: (u[f], f.rel))
    val.remove(last)
    train.append(last)
  return train, val


# ----------------------------------------------------------------------------- reading


def read_docs(files: Sequence[CorpusFile], need_utf8: bool, on_bad_file: str,
               skipped: dict[str, int]) -> Iterator[bytes]:
  """Yields the bytes of each usable file; counts (or raises on) the others.

  Empty files are only counted, never an error: they hold no text to lose, and the stdlib
  alone has dozens of empty `__init__.py`.
  """
  for f in files:
    reason = None
    try:
      with open(f.path, 'rb') as fh:
        data = fh.read()
    except OSError as e:  # Vanished since listing, or a permission problem.
      reason, detail = 'unreadable', f'{type(e).__name__}: {e.strerror or e}'
    else:
      if not data:
        skipped['empty'] = skipped.get('empty', 0) + 1
        continue
      if need_utf8:
        try:
          data.decode('utf-8')
        except UnicodeDecodeError as e:
          reason, detail = 'undecodable', f'not UTF-8 ({e.reason} at byte {e.start})'
    if reason is None:
      yield data
      continue
    if on_bad_file == 'error':
      raise DataError(f'{f.path}: {detail} (set data.on_bad_file=skip to skip such files)')
    skipped[reason] = skipped.get(reason, 0) + 1


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


def _tokenize_split(files, tok, on_bad_file, skipped, path=None, desc=None):
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
    writers[split], _ = _tokenize_split(
        files, tok, on_bad_file, skipped, path=os.path.join(out_dir, f'{split}.bin'),
        desc=f'tokenizing {split}' if progress else None)
  meta = {
      'format_version': _FORMAT_VERSION,
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
    _check_lengths(meta['train_tokens'], meta['val_tokens'], seq_len, batch_size, check_val)
  return TokenData(
      train=_memmap(os.path.join(directory, 'train.bin'), meta['dtype'], meta['train_tokens']),
      val=_memmap(os.path.join(directory, 'val.bin'), meta['dtype'], meta['val_tokens']),
      bytes_per_token_val=float(meta['bytes_per_token_val']),
      num_files_train=meta['num_files_train'], num_files_val=meta['num_files_val'],
      skipped=dict(meta['skipped']))


# ----------------------------------------------------------------------------- load_token_data


def _check_lengths(n_train: int, n_val: int, seq_len: int, batch_size: int, check_val: bool,
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


def _validate(cfg) -> None:
  _check_choice('data.source', cfg.source, SOURCES)
  _check_choice('data.tokenizer', cfg.tokenizer, TOKENIZERS)
  _check_choice('data.on_bad_file', cfg.on_bad_file, ON_BAD_FILE)
  for field in ('seq_len', 'batch_size'):
    v = cfg[field]
    if not isinstance(v, int) or v < 1:
      raise ConfigError(f'data.{field}', v, 'a positive int')
  if not 0 <= cfg.val_fraction < 1:
    raise ConfigError('data.val_fraction', cfg.val_fraction, 'a float in [0, 1)')


def _sync_workdir_tokenizer(tok, workdir: str | None) -> None:
  """Keeps `workdir/tokenizer` equal to the tokenizer in use, so eval/sampling find it."""
  if not workdir:
    return
  directory = os.path.join(workdir, 'tokenizer')
  if os.path.exists(os.path.join(directory, 'meta.json')):
    old = tokenizer_lib.load_tokenizer(directory)
    if old.fingerprint() != tok.fingerprint():
      raise DataError(f'{directory} holds another tokenizer ({old!r}) than this data ({tok!r}); '
                      'token ids would change: use a new workdir')
  else:
    tokenizer_lib.save_tokenizer(tok, directory)


def _get_tokenizer(cfg, train_files, workdir, tokenizer_dir):
  """tokenizer_dir, else the one saved in workdir (resume), else a new one (bpe: trained)."""
  directory = tokenizer_dir
  if not directory and workdir and os.path.exists(os.path.join(workdir, 'tokenizer', 'meta.json')):
    directory = os.path.join(workdir, 'tokenizer')
  if directory:
    tok = tokenizer_lib.load_tokenizer(directory)
    if tok.kind != cfg.tokenizer:
      raise ConfigError('data.tokenizer', cfg.tokenizer,
                        f'{tok.kind!r}, the kind of the tokenizer saved in {directory}')
    return tok
  if cfg.tokenizer == 'byte':
    return tokenizer_lib.ByteTokenizer()
  logging.info('Training a BPE tokenizer (vocab %d) on %d files', cfg.bpe_vocab_size,
               len(train_files))
  texts = (b.decode('utf-8') for b in read_docs(train_files, True, cfg.on_bad_file, {}))
  return tokenizer_lib.train_bpe(texts, cfg.bpe_vocab_size)


def _cache_key(tok, train_files, val_files, on_bad_file) -> str:
  def stat(f):
    try:
      s = os.stat(f.path)
      return [f.rel, f.path, s.st_size, s.st_mtime_ns]
    except OSError:
      return [f.rel, f.path, -1, -1]
  key = {'v': _FORMAT_VERSION, 'tok': tok.fingerprint(), 'bad': on_bad_file,
         'train': [stat(f) for f in train_files], 'val': [stat(f) for f in val_files]}
  return hashlib.sha256(json.dumps(key).encode('utf-8')).hexdigest()[:16]


def load_token_data(data_cfg, workdir: str | None = None, tokenizer_dir: str | None = None):
  """Reads `data_cfg.source`, builds or loads the tokenizer, returns (TokenData, tokenizer).

  The tokenizer used is saved in `workdir/tokenizer/` (if a workdir is given) and reloaded from
  there on resume. BPE-tokenized streams are cached under `workdir/data_cache/`.
  """
  cfg = data_cfg
  _validate(cfg)
  check_val = cfg.val_fraction > 0
  if cfg.source == 'synthetic':  # generated task windows (keel_jax/synthetic.py); no files, no tokenizer dir
    from keel_jax import synthetic
    return synthetic.load_token_data(cfg)
  if cfg.source == 'prepared':
    if not cfg.prepared_dir:
      raise ConfigError('data.prepared_dir', cfg.prepared_dir, 'a directory written by prepare')
    data = open_prepared(cfg.prepared_dir, cfg.seq_len, cfg.batch_size, check_val=check_val)
    prepared_tok = tokenizer_lib.load_tokenizer(os.path.join(cfg.prepared_dir, 'tokenizer'))
    tok = tokenizer_lib.load_tokenizer(tokenizer_dir) if tokenizer_dir else prepared_tok
    if tok.fingerprint() != prepared_tok.fingerprint():
      raise DataError(f'tokenizer in {tokenizer_dir} is not the one {cfg.prepared_dir} was '
                      'tokenized with')
    if tok.kind != cfg.tokenizer:
      logging.warning('data.tokenizer=%r is ignored: %s was tokenized with %r', cfg.tokenizer,
                      cfg.prepared_dir, tok)
    _sync_workdir_tokenizer(tok, workdir)
    return data, tok

  files = list_files(cfg.source, cfg.get('paths', ''), cfg.get('max_files', 0))
  train_files, val_files = split_files(files, cfg.val_fraction)
  # Cheap early check: every token holds >= 1 byte, so the byte count bounds the token count.
  def upper(fs):
    return sum(os.path.getsize(f.path) for f in fs if os.path.exists(f.path)) + len(fs)
  if not files or upper(files) <= len(files):
    raise DataError(f'empty corpus: no text in the {len(files)} files of data.source='
                    f'{cfg.source!r}')
  _check_lengths(upper(train_files), upper(val_files), cfg.seq_len, cfg.batch_size, check_val,
                 bound=True)

  tok = _get_tokenizer(cfg, train_files, workdir, tokenizer_dir)
  _sync_workdir_tokenizer(tok, workdir)

  if tok.kind == 'bpe' and workdir:  # Slow (~1 MB/s/core): tokenize once, memmap afterwards.
    cache = os.path.join(workdir, 'data_cache', _cache_key(tok, train_files, val_files,
                                                           cfg.on_bad_file))
    if not os.path.exists(os.path.join(cache, 'meta.json')):
      tmp = f'{cache}.tmp.{os.getpid()}'
      try:
        write_prepared(train_files, val_files, tok, tmp, cfg.on_bad_file)
      except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
      try:
        os.rename(tmp, cache)
      except OSError:  # Another process won the race; its copy is identical.
        shutil.rmtree(tmp, ignore_errors=True)
    data = open_prepared(cache)
  else:
    skipped: dict[str, int] = {}
    w_train, train = _tokenize_split(train_files, tok, cfg.on_bad_file, skipped)
    w_val, val = _tokenize_split(val_files, tok, cfg.on_bad_file, skipped)
    data = TokenData(train, val, w_val.bytes_per_token(), w_train.num_docs, w_val.num_docs,
                     skipped)
  if data.num_files_train + data.num_files_val == 0:
    raise DataError(f'empty corpus: all {len(files)} files of data.source={cfg.source!r} were '
                    f'skipped ({data.skipped})')
  if set(data.skipped) - {'empty'}:
    logging.warning('Skipped files: %s (data.on_bad_file=skip)', data.skipped)
  elif data.skipped:
    logging.info('Skipped empty files: %d', data.skipped['empty'])
  _check_lengths(len(data.train), len(data.val), cfg.seq_len, cfg.batch_size, check_val)
  return data, tok


# ----------------------------------------------------------------------------- iterators


class _LocalWindows:
  """Grain map: a global batch of window indices -> this process's rows of tokens."""

  def __init__(self, tokens: np.ndarray, seq_len: int, lo: int, hi: int):
    self._tokens, self._seq_len, self._lo, self._hi = tokens, seq_len, lo, hi

  def __call__(self, window_ids: np.ndarray) -> dict[str, np.ndarray]:
    starts = np.asarray(window_ids[self._lo:self._hi], np.int64) * self._seq_len
    # Contiguous slices rather than a fancy-index gather: sequential reads from a memmap.
    rows = np.stack([self._tokens[s:s + self._seq_len + 1] for s in starts])
    return {'tokens': rows.astype(np.int32)}

  def __repr__(self) -> str:  # Deterministic: no addresses (grain may compare reprs).
    return (f'_LocalWindows(num_tokens={len(self._tokens)}, seq_len={self._seq_len}, '
            f'rows={self._lo}:{self._hi})')


def num_windows(num_tokens: int, seq_len: int) -> int:
  return max(num_tokens - 1, 0) // seq_len


def make_train_iterator(train_tokens: np.ndarray, seq_len: int, global_batch: int, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """Infinite, checkpointable iterator of {'tokens': int32[global_batch // process_count,
  seq_len + 1]}: windows in a fresh random order each epoch.

  Every process computes the same global batch of window ids and keeps its contiguous slice,
  so the processes' batches concatenated (in process order) are the one-process batch.
  State: `it.get_state()` / `it.set_state(s)`, or Orbax with `grain.checkpoint.CheckpointSave`.
  """
  if global_batch % process_count:
    raise ConfigError('data.batch_size', global_batch,
                      f'a multiple of the number of processes ({process_count})')
  n = num_windows(len(train_tokens), seq_len)
  if n < global_batch:
    raise DataError(f'{len(train_tokens)} train tokens make {n} windows of data.seq_len='
                    f'{seq_len}, fewer than one global batch of {global_batch}')
  local = global_batch // process_count
  # Hash the user seed: grain seeds epoch e with (seed + e), so raw seeds s and s+1 would share
  # all but one epoch's order.
  shuffle_seed = zlib.crc32(f'keel_jax.train_windows/{seed}'.encode())
  ds = grain.MapDataset.range(n).shuffle(seed=shuffle_seed).repeat()
  ds = ds.batch(global_batch, drop_remainder=True)
  ds = ds.map(_LocalWindows(train_tokens, seq_len, process_index * local,
                            (process_index + 1) * local))
  # In-process, unthreaded reads were fastest here (data is in memory or page cache).
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return iter(it)


def eval_batches(val_tokens: np.ndarray, seq_len: int, batch_size: int,
                 num_batches: int) -> list[dict[str, np.ndarray]]:
  """A fixed list of {'tokens': int32[batch_size, seq_len + 1]}: non-overlapping windows spread
  evenly over the validation stream. Fewer batches if the stream holds too few windows.
  """
  n = len(val_tokens) // (seq_len + 1)  # Non-overlapping windows of seq_len + 1.
  usable = min(num_batches, n // batch_size)
  if usable < 1:
    raise DataError(f'the validation split has {len(val_tokens)} tokens, too few for one eval '
                    f'batch of {batch_size} windows of data.seq_len={seq_len} (+1)')
  if usable < num_batches:
    logging.warning('Validation data holds %d eval batches, not data.eval_batches=%d',
                    usable, num_batches)
  total = usable * batch_size
  starts = (np.arange(total, dtype=np.int64) * n // total) * (seq_len + 1)
  rows = np.stack([val_tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
  return [{'tokens': rows[i * batch_size:(i + 1) * batch_size]} for i in range(usable)]
