"""Every notebook runs headlessly on CPU with small parameters and no cell errors."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from cli_utils import REPO, cli_env

# Replacement for each notebook's first code cell ("# Parameters ..."): small enough for CI.
SMALL = {
    "gradient_flow.ipynb": 'DEPTHS = [4]\nWIDTH = 32\nSTEPS = 4\nSEQ_LEN, BATCH = 32, 4\n'
                           'BLOCKS = ["post_ln", "pre_ln", "keel"]',
    "quickstart.ipynb": 'STEPS = 12\nWIDTH = 32\nNUM_LAYERS = 2\nSEQ_LEN, BATCH = 32, 8\nNEW_TOKENS = 16\n'
                        'WORKDIR = None',
    "explore_checkpoint.ipynb": 'WORKDIR = None\nTRAIN_STEPS_IF_NEW = 12\nPROMPT = "def "\nNEW_TOKENS = 16\n'
                                'EVAL_BATCHES = 1',
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_executes_without_errors(name, tmp_path, monkeypatch):
  path = os.path.join(REPO, "notebooks", name)
  nb = nbformat.read(path, as_version=4)
  first = next(c for c in nb.cells if c.cell_type == "code")
  assert first.source.startswith("# Parameters"), "the first code cell must hold the parameters"
  first.source = "# Parameters (test)\n" + SMALL[name]
  for k, v in cli_env(MPLBACKEND="Agg").items():
    monkeypatch.setenv(k, v)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
