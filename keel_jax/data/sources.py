"""Corpus-file sources ('stdlib', 'files'): listing, the train/validation split, reading.

The train/validation split is by file, decided by the crc32 of the file's path relative to its
corpus root: independent of file order, machine and of which other files exist.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence

from keel_jax.errors import ConfigError, DataError

SOURCES = ('stdlib', 'files', 'prepared', 'synthetic')
ON_BAD_FILE = ('skip', 'error')


@dataclasses.dataclass(frozen=True)
class CorpusFile:
  path: str  # Where to read it.
  rel: str  # Path relative to the corpus root, '/'-separated: the split key.


def check_choice(field: str, value, allowed: Sequence[str]) -> None:
  """Raises ConfigError unless `value` is one of `allowed`."""
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
  check_choice('data.source', source, ('stdlib', 'files'))
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
