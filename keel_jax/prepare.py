"""Tokenizes a corpus once into a directory that training reads as memmaps (data.source=prepared).

  python -m keel_jax.prepare --source files --paths 'corpus/**/*.txt' --out DIR \
      [--tokenizer bpe --bpe_vocab_size 8192] [--val_fraction 0.01]

Writes DIR/train.bin, DIR/val.bin (raw little-endian uint16/uint32 tokens), DIR/meta.json and
DIR/tokenizer/. Files are streamed one at a time: memory stays bounded for any corpus size. DIR may be
gs://bucket/path: written in a local temporary directory, then uploaded (training hosts copy it
back to a local cache, keel_jax.paths.local_copy).
Train with `--config.data.source=prepared --config.data.prepared_dir=DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import tqdm

from keel_jax import data as data_lib
from keel_jax import paths
from keel_jax import tokenizer as tokenizer_lib
from keel_jax.errors import ConfigError, DataError


def _parse(argv):
  p = argparse.ArgumentParser(prog='python -m keel_jax.prepare', description=__doc__.split('\n')[0])
  p.add_argument('--source', choices=('stdlib', 'files'), default='files')
  p.add_argument('--paths', default='', help="comma-separated globs ('**' recurses)")
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--tokenizer', choices=data_lib.TOKENIZERS, default='byte')
  p.add_argument('--bpe_vocab_size', type=int, default=4096)
  p.add_argument('--val_fraction', type=float, default=0.02,
                 help='fraction of files for validation (by a hash of the path)')
  p.add_argument('--on_bad_file', choices=data_lib.ON_BAD_FILE, default='skip')
  p.add_argument('--max_files', type=int, default=0, help='0 = all')
  return p.parse_args(argv)


def prepare(args) -> dict:
  """Runs the preparation described by parsed `args`; returns the written meta dict."""
  data_lib.check_val_fraction('--val_fraction', args.val_fraction, need_val=False)
  files = data_lib.list_files(args.source, args.paths, args.max_files)
  train_files, val_files = data_lib.split_files(files, args.val_fraction)
  print(f'{len(files)} files: {len(train_files)} train, {len(val_files)} validation',
        file=sys.stderr)
  if args.tokenizer == 'bpe':
    bar = tqdm.tqdm(train_files, desc='training BPE', unit='file')
    # Only pair counts are kept by the trainer: the texts stream through.
    texts = (b.decode('utf-8') for b in data_lib.read_docs(bar, True, args.on_bad_file, {}))
    tok = tokenizer_lib.train_bpe(texts, args.bpe_vocab_size)
  else:
    tok = tokenizer_lib.ByteTokenizer()
  out = paths.check_writable(args.out, 'out')  # a bad bucket or missing credentials: before any work
  with tempfile.TemporaryDirectory(prefix='keel_prepare_') as tmp:
    local = str(out) if not paths.is_remote(out) else os.path.join(tmp, 'prepared')
    meta = data_lib.write_prepared(train_files, val_files, tok, local, args.on_bad_file,
                                   progress=True)
    if meta['num_files_train'] + meta['num_files_val'] == 0:
      raise DataError(f'empty corpus: every one of the {len(files)} files was skipped '
                      f'({meta["skipped"]})')
    if paths.is_remote(out):  # written locally, then uploaded; meta.json last marks it complete
      paths.upload_dir(local, out, last='meta.json')
  return meta


def main(argv=None) -> int:
  args = _parse(argv)
  try:
    meta = prepare(args)
  except (ConfigError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(meta, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
