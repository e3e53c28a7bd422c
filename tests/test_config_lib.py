"""Config mistakes on the command line: unknown fields in a :arg or a --config override, in any section."""
import pytest

from cli_utils import run_train
from keel_jax import config_lib
from keel_jax.errors import ConfigError


@pytest.mark.parametrize("arg,field,closest", [
    ("blok=keel", "blok", "model.block"),
    ("train.num_step=3", "train.num_step", "train.num_steps"),
    ("data.seqlen=64", "data.seqlen", "data.seq_len"),
    ("mesh.tensr=2", "mesh.tensr", "mesh.tensor"),
    ("trian.lr=1", "trian.lr", "section train"),
])
def test_unknown_arg_field_names_it_and_the_closest_fields(arg, field, closest):
  cfg = config_lib.base_config()
  with pytest.raises(ConfigError) as e:
    config_lib.apply_arg(cfg, arg)
  assert e.value.field == field
  assert f"did you mean {closest}" in str(e.value)


def test_arg_name_in_two_sections_needs_its_section():
  cfg = config_lib.base_config()
  cfg.data.eps = 1.0  # a name in two sections needs its section
  with pytest.raises(ConfigError, match="dotted name"):
    config_lib.apply_arg(cfg, "eps=1e-6")


@pytest.mark.slow
def test_cli_typos_exit_2_with_the_closest_names_and_no_traceback(tmp_path):
  for args, expected in [(("--config.train.num_step=3",), "train.num_steps"),
                         (("--config.mesh.dat=2",), "mesh.data"),
                         ((), "model.block")]:
    config = "configs/tiny.py:blok=keel" if not args else "configs/tiny.py"
    proc = run_train(tmp_path / "w", *args, config=config, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
  assert not (tmp_path / "w").exists()
