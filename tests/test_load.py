"""Restore anywhere: a checkpoint trained sharded with Pallas norms restores on one device with XLA
norms and gives the same logits; fields that shape the parameters are refused, on restore and on
resume, naming the field; those that do not (model_config.NON_PARAMETER_FIELDS) may change."""
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_utils import REPO
from keel_jax import config_lib
from keel_jax.errors import ConfigError
from keel_jax.load import load_run
from keel_jax.train import check_resume_compatible
from restore_worker import logits
from scaling_worker import _tiny, fake_devices_env


@pytest.mark.slow
def test_sharded_pallas_checkpoint_restores_on_one_device_with_xla_norms_to_the_same_logits(tmp_path):
  workdir, out = tmp_path / "run", tmp_path / "sharded.npz"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "restore_worker.py"), str(workdir), str(out)],
                        cwd=REPO, env=fake_devices_env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  sharded = np.load(out)
  assert list(sharded["mesh"]) == [2, 2, 2] and str(sharded["norm_impl"]) == "pallas"
  assert "fsdp" in str(sharded["embed_spec"]) or "tensor" in str(sharded["embed_spec"])  # really sharded

  run = load_run(workdir, overrides="model.norm_impl=xla")
  assert run.mesh is None and run.model_cfg.norm_impl == "xla"
  np.testing.assert_allclose(logits(run), sharded["logits"], rtol=1e-5, atol=1e-5)

  with pytest.raises(ConfigError, match="model.d_model"):
    load_run(workdir, overrides="model.d_model=64")


def test_resume_allows_non_parameter_fields_and_refuses_others_naming_them(tmp_path):
  cfg = _tiny()
  (tmp_path / "config.json").write_text(config_lib.to_json(cfg))
  changed = _tiny("norm_impl=pallas,remat_policy=none,dtype=bfloat16")
  lines = check_resume_compatible(tmp_path, changed, allow_change=False)
  assert len(lines) == 3 and any("model.remat_policy: checkpoint has 'full'" in l for l in lines)
  with pytest.raises(ConfigError, match="model.num_heads: checkpoint has 4, config asks for 2"):
    check_resume_compatible(tmp_path, _tiny("num_heads=2,norm_impl=pallas"), allow_change=False)
  assert check_resume_compatible(tmp_path, _tiny("num_heads=2"), allow_change=True)  == []
