"""Data pipeline: a source -> one packed token stream per split -> iterators of windows.

  sources.py    corpus files ('stdlib', 'files'): listing, train/validation split by file, reading
  synthetic.py  generated depth-sensitive tasks ('synthetic'), with their answer accuracy
  packing.py    tokenized documents joined with eos into streams; the prepared-directory format
  iteration.py  streams -> shuffled, checkpointable training windows and fixed eval batches
                (with per-token document ids for data.document_mask)
  pipeline.py   load_token_data: a data config -> (TokenData, tokenizer) for any source

Tokenizers live in keel_jax/tokenizer.py. This package re-exports the public names, so
`from keel_jax import data; data.load_token_data(...)` is the usual entry point.
"""

from keel_jax.data.iteration import document_ids, eval_batches, make_train_iterator, num_windows
from keel_jax.data.packing import TokenData, open_prepared, token_dtype, write_prepared
from keel_jax.data.pipeline import TOKENIZERS, check_val_fraction, load_token_data, validate
from keel_jax.data.sources import ON_BAD_FILE, SOURCES, CorpusFile, list_files, read_docs, split_files

__all__ = [
    'CorpusFile', 'ON_BAD_FILE', 'SOURCES', 'TOKENIZERS', 'TokenData', 'check_val_fraction',
    'document_ids', 'eval_batches', 'list_files', 'load_token_data', 'make_train_iterator', 'num_windows',
    'open_prepared', 'read_docs', 'split_files', 'token_dtype', 'validate', 'write_prepared',
]
