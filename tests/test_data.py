"""Tests for keel_jax.data and keel_jax.prepare, on small synthetic corpora."""

import os

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from keel_jax import data as data_lib
from keel_jax import prepare as prepare_lib
from keel_jax import tokenizer as tokenizer_lib
from keel_jax.errors import ConfigError, DataError


def _cfg(**kw) -> ml_collections.ConfigDict:
  cfg = dict(source='files', paths='', prepared_dir='', seq_len=16, batch_size=4,
             tokenizer='byte', bpe_vocab_size=320, val_fraction=0.2, eval_batches=2,
             on_bad_file='skip', max_files=0)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture
def corpus(tmp_path):
  """24 small files in nested folders, with non-ASCII text; returns the glob."""
  root = tmp_path / 'corpus'
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'délta', 'ωmega', '日本', 'def', 'return', '\n']
  for i in range(24):
    d = root / f'part{i % 3}'
    d.mkdir(parents=True, exist_ok=True)
    text = ' '.join(rng.choice(words, size=40 + 7 * i)) + f'\n# doc {i}\n'
    (d / f'doc{i:02d}.txt').write_text(text, encoding='utf-8')
  return str(root / '**' / '*.txt')


def _windows_from(tokens: np.ndarray, seq_len: int):
  return np.stack([tokens[s:s + seq_len + 1] for s in range(0, len(tokens) - seq_len, seq_len)
                   if s + seq_len < len(tokens)])


# ----------------------------------------------------------------------------- corpus & split


def test_split_deterministic_disjoint_by_file(corpus):
  files = data_lib.list_files('files', corpus)
  assert len(files) == 24 and files == sorted(files, key=lambda f: f.rel)
  train, val = data_lib.split_files(files, 0.2)
  train2, val2 = data_lib.split_files(files[::-1], 0.2)
  assert set(train) == set(train2) and set(val) == set(val2)  # Order independent.
  assert not set(train) & set(val) and len(train) + len(val) == 24
  assert val and train
  # The key is the path relative to the glob root: the split survives moving the corpus.
  assert all(f.rel.startswith('part') for f in files)
  # A subset keeps each file's side (unless the split had to borrow a file to be non-empty).
  sub = files[:10]
  _, sub_val = data_lib.split_files(sub, 0.2)
  if set(val) & set(sub):
    assert set(sub_val) == set(val) & set(sub)


def test_eos_between_documents(corpus):
  data, tok = data_lib.load_token_data(_cfg(paths=corpus, val_fraction=0.0), None)
  files = data_lib.list_files('files', corpus)
  docs = [np.frombuffer(open(f.path, 'rb').read(), np.uint8) for f in files]
  expected = np.concatenate(sum([[d, [tok.eos_id]] for d in docs], [])[:-1])
  np.testing.assert_array_equal(data.train, expected)
  assert data.train.dtype == np.uint16
  assert (data.num_files_train, data.num_files_val, len(data.val)) == (24, 0, 0)
  assert data.bytes_per_token_val != data.bytes_per_token_val  # nan: no validation text


def test_load_files_split_counts(corpus, tmp_path):
  data, tok = data_lib.load_token_data(_cfg(paths=corpus), str(tmp_path / 'wd'))
  _, val_files = data_lib.split_files(data_lib.list_files('files', corpus), 0.2)
  assert data.num_files_val == len(val_files) and data.num_files_train == 24 - len(val_files)
  assert data.bytes_per_token_val == 1.0
  assert np.sum(data.val == tok.eos_id) == len(val_files) - 1
  assert isinstance(tokenizer_lib.load_tokenizer(str(tmp_path / 'wd' / 'tokenizer')),
                    tokenizer_lib.ByteTokenizer)


def test_stdlib_source_small():
  data, tok = data_lib.load_token_data(
      _cfg(source='stdlib', max_files=12, val_fraction=0.3, seq_len=8, batch_size=2), None)
  assert data.num_files_train + data.num_files_val + sum(data.skipped.values()) == 12
  assert data.num_files_val >= 1
  assert b'import' in bytes(data.train[data.train < 256].astype(np.uint8))
  assert tok.vocab_size == 257


# ----------------------------------------------------------------------------- train iterator


def _stream(n=403):
  # Distinct values make every window identify its own start.
  return np.arange(n, dtype=np.uint16)


def _take(it, k):
  return [next(it)['tokens'] for _ in range(k)]


def test_windows_are_stream_slices_and_epoch_covers_all():
  tokens, seq_len, batch = _stream(), 5, 4
  n = data_lib.num_windows(len(tokens), seq_len)
  assert n == 80
  it = data_lib.make_train_iterator(tokens, seq_len, batch, seed=0)
  rows = np.concatenate(_take(it, n // batch))
  assert rows.dtype == np.int32 and rows.shape == (n, seq_len + 1)
  starts = rows[:, 0]
  for r, s in zip(rows, starts):
    np.testing.assert_array_equal(r, tokens[s:s + seq_len + 1])
  assert sorted(starts) == list(range(0, n * seq_len, seq_len))  # Each window once.
  assert not np.array_equal(starts, np.sort(starts))  # Shuffled.
  # The next epoch is another permutation of the same windows.
  starts2 = np.concatenate(_take(it, n // batch))[:, 0]
  assert sorted(starts2) == sorted(starts) and not np.array_equal(starts2, starts)


def test_seed_determinism():
  tokens = _stream()
  a = _take(data_lib.make_train_iterator(tokens, 5, 4, seed=1), 6)
  b = _take(data_lib.make_train_iterator(tokens, 5, 4, seed=1), 6)
  c = _take(data_lib.make_train_iterator(tokens, 5, 4, seed=2), 6)
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))


def test_resume_with_get_set_state():
  tokens = _stream()
  full = _take(data_lib.make_train_iterator(tokens, 5, 4, seed=3), 30)  # Crosses an epoch.
  it = data_lib.make_train_iterator(tokens, 5, 4, seed=3)
  _take(it, 13)
  state = it.get_state()
  fresh = data_lib.make_train_iterator(tokens, 5, 4, seed=3)
  fresh.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(fresh, 17)), np.stack(full[13:]))


def test_resume_with_orbax_checkpoint_manager(tmp_path):
  tokens = _stream()
  full = _take(data_lib.make_train_iterator(tokens, 5, 4, seed=4), 12)
  it = data_lib.make_train_iterator(tokens, 5, 4, seed=4)
  _take(it, 7)
  state = {'w': np.arange(3.0)}
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as mngr:
    mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  fresh = data_lib.make_train_iterator(tokens, 5, 4, seed=4)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(restored['state']['w'], state['w'])
  np.testing.assert_array_equal(np.stack(_take(fresh, 5)), np.stack(full[7:]))


def test_process_sharding_union_is_global_batch():
  tokens = _stream()
  single = _take(data_lib.make_train_iterator(tokens, 5, 8, seed=5), 4)
  p0 = _take(data_lib.make_train_iterator(tokens, 5, 8, seed=5, process_index=0,
                                          process_count=2), 4)
  p1 = _take(data_lib.make_train_iterator(tokens, 5, 8, seed=5, process_index=1,
                                          process_count=2), 4)
  for s, a, b in zip(single, p0, p1):
    assert a.shape == (4, 6)
    np.testing.assert_array_equal(np.concatenate([a, b]), s)
  with pytest.raises(ConfigError, match='batch_size'):
    data_lib.make_train_iterator(tokens, 5, 8, seed=5, process_index=0, process_count=3)


def test_eval_batches_fixed_non_overlapping():
  tokens = _stream(1000)
  batches = data_lib.eval_batches(tokens, 9, 4, 3)
  again = data_lib.eval_batches(tokens, 9, 4, 3)
  assert len(batches) == 3
  rows = np.concatenate([b['tokens'] for b in batches])
  np.testing.assert_array_equal(rows, np.concatenate([b['tokens'] for b in again]))
  assert rows.shape == (12, 10) and rows.dtype == np.int32
  starts = rows[:, 0]
  assert np.all(np.diff(starts) >= 10)  # Non-overlapping, in order.
  assert starts[-1] > 800  # Spread over the whole stream.
  for r in rows:
    np.testing.assert_array_equal(r, tokens[r[0]:r[0] + 10])
  assert len(data_lib.eval_batches(tokens, 9, 4, 1000)) == 25  # Capped by the data.
  with pytest.raises(DataError, match='seq_len=1000'):
    data_lib.eval_batches(tokens, 1000, 1, 1)


# ----------------------------------------------------------------------------- prepared format


def test_prepare_roundtrip_byte(corpus, tmp_path):
  out = str(tmp_path / 'prep')
  assert prepare_lib.main(['--source', 'files', '--paths', corpus, '--out', out,
                           '--val_fraction', '0.2']) == 0
  assert sorted(os.listdir(out)) == ['meta.json', 'tokenizer', 'train.bin', 'val.bin']
  prepared, ptok = data_lib.load_token_data(_cfg(source='prepared', prepared_dir=out), None)
  memory, _ = data_lib.load_token_data(_cfg(paths=corpus), None)
  assert isinstance(prepared.train, np.memmap) and isinstance(prepared.val, np.memmap)
  np.testing.assert_array_equal(prepared.train, memory.train)
  np.testing.assert_array_equal(prepared.val, memory.val)
  assert prepared.bytes_per_token_val == memory.bytes_per_token_val
  assert (prepared.num_files_train, prepared.num_files_val) == (
      memory.num_files_train, memory.num_files_val)
  assert ptok.kind == 'byte'


def test_prepare_roundtrip_bpe_and_workdir_cache(corpus, tmp_path):
  out = str(tmp_path / 'prep')
  assert prepare_lib.main(['--paths', corpus, '--out', out, '--tokenizer', 'bpe',
                           '--bpe_vocab_size', '320', '--val_fraction', '0.2']) == 0
  cfg = _cfg(source='prepared', prepared_dir=out, tokenizer='bpe')
  prepared, tok = data_lib.load_token_data(cfg, None)
  assert tok.kind == 'bpe' and prepared.train.dtype == np.uint16
  assert prepared.bytes_per_token_val > 1.0
  # Same files, same tokenizer, in-memory tokenization (no workdir): identical streams.
  cfg_files = _cfg(paths=corpus, tokenizer='bpe')
  memory, _ = data_lib.load_token_data(cfg_files, None, tokenizer_dir=os.path.join(out, 'tokenizer'))
  np.testing.assert_array_equal(prepared.train, memory.train)
  np.testing.assert_array_equal(prepared.val, memory.val)
  assert abs(prepared.bytes_per_token_val - memory.bytes_per_token_val) < 1e-12
  # With a workdir: BPE is trained on the train split (the same tokenizer as prepare's), saved,
  # the stream cached; a second call (resume) reloads both.
  wd = str(tmp_path / 'wd')
  first, tok1 = data_lib.load_token_data(cfg_files, wd)
  assert tok1.fingerprint() == tok.fingerprint()
  assert os.listdir(os.path.join(wd, 'data_cache'))
  second, tok2 = data_lib.load_token_data(cfg_files, wd)
  assert isinstance(second.train, np.memmap) and tok2.fingerprint() == tok1.fingerprint()
  np.testing.assert_array_equal(second.train, prepared.train)
  # Resuming that workdir with another tokenizer kind is refused.
  with pytest.raises(ConfigError, match='data.tokenizer'):
    data_lib.load_token_data(_cfg(paths=corpus, tokenizer='byte'), wd)


# ----------------------------------------------------------------------------- bad input


def test_missing_glob_and_bad_config(corpus, tmp_path):
  missing = str(tmp_path / 'nowhere' / '*.txt')
  with pytest.raises(DataError, match='nowhere'):
    data_lib.load_token_data(_cfg(paths=f'{corpus},{missing}'), None)
  with pytest.raises(ConfigError, match='data.source'):
    data_lib.load_token_data(_cfg(source='web'), None)
  with pytest.raises(ConfigError, match='data.tokenizer'):
    data_lib.load_token_data(_cfg(paths=corpus, tokenizer='wordpiece'), None)
  with pytest.raises(ConfigError, match='data.paths'):
    data_lib.load_token_data(_cfg(paths=' '), None)
  with pytest.raises(DataError, match='meta.json'):
    data_lib.load_token_data(_cfg(source='prepared', prepared_dir=str(tmp_path)), None)
  assert prepare_lib.main(['--paths', missing, '--out', str(tmp_path / 'o')]) == 2


def test_empty_corpus(tmp_path):
  for i in range(3):
    (tmp_path / f'e{i}.txt').write_bytes(b'')
  with pytest.raises(DataError, match='empty corpus'):
    data_lib.load_token_data(_cfg(paths=str(tmp_path / '*.txt')), None)
  # Non-empty files that are all undecodable (bpe) leave an empty corpus too.
  for i in range(3):
    (tmp_path / f'e{i}.txt').write_bytes(b'\xff\xfe bad ' * 50)
  tok_dir = str(tmp_path / 'tok')
  tokenizer_lib.save_tokenizer(tokenizer_lib.train_bpe(iter(['some text'] * 5), 270), tok_dir)
  with pytest.raises(DataError, match='empty corpus'):
    data_lib.load_token_data(_cfg(paths=str(tmp_path / '*.txt'), tokenizer='bpe', seq_len=4,
                                  batch_size=1), None, tokenizer_dir=tok_dir)


def test_seq_len_too_long(corpus):
  with pytest.raises(DataError, match=r'seq_len=100000.*') as e:
    data_lib.load_token_data(_cfg(paths=corpus, seq_len=100_000), None)
  assert 'tokens' in str(e.value)
  with pytest.raises(DataError, match='seq_len=16'):
    data_lib.make_train_iterator(np.zeros(40, np.uint16), 16, 4, seed=0)


def test_undecodable_file_for_bpe(corpus, tmp_path):
  bad = os.path.join(os.path.dirname(os.path.dirname(corpus)), 'part0', 'zz_bad.txt')
  with open(bad, 'wb') as f:
    f.write(b'caf\xe9 latin-1 text\n' * 20)
  cfg = _cfg(paths=corpus, tokenizer='bpe')
  data, _ = data_lib.load_token_data(cfg, None)
  assert data.skipped == {'undecodable': 1}
  assert data.num_files_train + data.num_files_val == 24
  with pytest.raises(DataError, match='zz_bad.txt'):
    data_lib.load_token_data(_cfg(paths=corpus, tokenizer='bpe', on_bad_file='error'), None)
  # Bytes are bytes for the byte tokenizer: nothing skipped.
  data, _ = data_lib.load_token_data(_cfg(paths=corpus, on_bad_file='error'), None)
  assert data.skipped == {} and data.num_files_train + data.num_files_val == 25


def test_vanished_file_skip_or_error(tmp_path):
  gone = data_lib.CorpusFile(str(tmp_path / 'gone.txt'), 'gone.txt')
  ok = tmp_path / 'ok.txt'
  ok.write_text('hello')
  files = [gone, data_lib.CorpusFile(str(ok), 'ok.txt')]
  skipped = {}
  assert list(data_lib.read_docs(files, False, 'skip', skipped)) == [b'hello']
  assert skipped == {'unreadable': 1}
  with pytest.raises(DataError, match='gone.txt'):
    list(data_lib.read_docs(files, False, 'error', {}))


def test_document_ids_start_a_new_document_at_each_eos():
  eos = 9
  stream = np.array([1, 2, eos, 3, 4, 5, eos, 6, 7, 8, 1, 2, eos, 4, 5, 6, 7], np.int32)
  it = data_lib.make_train_iterator(stream, seq_len=4, global_batch=2, seed=0, eos_id=eos)
  batch = next(it)
  for row, seg in zip(batch['tokens'], batch['segment_ids']):
    np.testing.assert_array_equal(seg, np.cumsum(row == eos))  # an eos opens the document after it
  evals = data_lib.eval_batches(stream, seq_len=3, batch_size=2, num_batches=1, eos_id=eos)
  np.testing.assert_array_equal(evals[0]['segment_ids'], data_lib.document_ids(evals[0]['tokens'], eos))
  assert 'segment_ids' not in next(data_lib.make_train_iterator(stream, 4, 2, 0))
