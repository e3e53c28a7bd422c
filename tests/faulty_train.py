"""The training CLI with a fault injected from the test side (the library has no fault hook):

    python tests/faulty_train.py FIRST COUNT <keel_jax.train flags>

runs `python -m keel_jax.train <flags>` with the train step wrapped so that steps FIRST ..
FIRST + COUNT - 1 see a batch whose first input token is an id past the vocabulary: its embedding
is NaN, so the loss and the gradients are non-finite, as a real numerical blow-up would make them.
"""
import sys

import jax.numpy as jnp
from absl import app

from keel_jax import config_lib, train, train_step

BAD_ID = jnp.iinfo(jnp.int32).max  # out of range: the embedding lookup fills NaN


def nonfinite_at(first: int, count: int):
  """A drop-in for train_step.make_train_step whose step is poisoned at steps first .. first+count-1."""
  def make(model, tx, schedule, *args, **kwargs):
    step = train_step.make_train_step(model, tx, schedule, *args, **kwargs)

    def faulty_step(state, batch):
      n = state.step + 1
      bad = (n >= first) & (n < first + count)
      tokens = batch["tokens"]
      return step(state, {**batch, "tokens": tokens.at[:, 0].set(jnp.where(bad, BAD_ID, tokens[:, 0]))})

    return faulty_step
  return make


if __name__ == "__main__":
  first, count = int(sys.argv[1]), int(sys.argv[2])
  del sys.argv[1:3]
  train.make_train_step = nonfinite_at(first, count)
  app.run(train.main, flags_parser=config_lib.parse_flags)
