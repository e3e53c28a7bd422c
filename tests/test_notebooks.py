"""Every notebook runs headlessly on CPU as committed, except for a lower step count.

A notebook's parameters live in one code cell tagged `parameters` (papermill-style), the second code
cell (the first installs keel_jax in Colab). The test lowers only the step count named in STEPS below;
everything else (widths, depths, sequence lengths, new tokens) runs with the committed values.
"""
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from cli_utils import REPO, cli_env
from keel_jax.block_rules import BLOCKS

# notebook -> (the step-count parameter, the value the test uses)
STEPS = {"quickstart.ipynb": ("STEPS", 6), "explore_checkpoint.ipynb": ("TRAIN_STEPS_IF_NEW", 6),
         "gradient_flow.ipynb": ("STEPS", 3)}


def read(name):
  return nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)


def parameters_cell(nb):
  code = [c for c in nb.cells if c.cell_type == "code"]
  tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1 and tagged[0] is code[1], "one `parameters` cell, the second code cell"
  assert "google.colab" in code[0].source, "the first code cell installs keel_jax in Colab"
  return tagged[0]


def committed_parameters(name) -> dict:
  ns = {}
  exec(parameters_cell(read(name)).source, ns)
  return ns


def test_every_notebook_is_covered():
  assert sorted(STEPS) == sorted(n for n in os.listdir(os.path.join(REPO, "notebooks")) if n.endswith(".ipynb"))


@pytest.mark.parametrize("name", sorted(STEPS))
def test_committed_parameters_are_consistent(name):
  p = committed_parameters(name)
  steps_name, test_steps = STEPS[name]
  assert isinstance(p[steps_name], int) and p[steps_name] >= test_steps
  if "WIDTH" in p:  # the notebooks build 4 query heads; rotary embeddings need an even head dim
    assert p["WIDTH"] % 8 == 0
  if "NEW_TOKENS" in p:  # any number works (sliding window); it must be one at least
    assert p["NEW_TOKENS"] >= 1
  if name == "quickstart.ipynb":
    assert p["NUM_BLOCKS"] >= 1 and p["SEQ_LEN"] >= 8 and p["BATCH"] >= 1
  if name == "explore_checkpoint.ipynb":
    assert p["PROMPT"] and p["EVAL_BATCHES"] >= 1
  if name == "gradient_flow.ipynb":  # sub-layer counts: two per block, at least two blocks for the ratio
    assert all(d % 2 == 0 and d >= 4 for d in p["DEPTHS"]) and p["DEPTHS"] == sorted(p["DEPTHS"])
    assert set(p["BLOCKS"]) <= set(BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STEPS))
def test_notebook_executes_as_committed_with_fewer_steps(name, tmp_path, monkeypatch):
  nb = read(name)
  cell = parameters_cell(nb)
  steps_name, test_steps = STEPS[name]
  cell.source, n = re.subn(rf"^{steps_name} = \d+", f"{steps_name} = {test_steps}", cell.source, flags=re.M)
  assert n == 1, f"{steps_name} = <int> must be assigned once in the parameters cell"
  for k, v in cli_env(MPLBACKEND="Agg").items():
    monkeypatch.setenv(k, v)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
