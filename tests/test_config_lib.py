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
  # The old field name in an override is not a typo: it works, with the deprecation message (the
  # run then stops at the next, real mistake, before any training).
  proc = run_train(tmp_path / "w", "--config.model.num_layers=3", "--config.train.lr=-1", check=False, timeout=120)
  assert proc.returncode == 2 and "use model.num_blocks" in proc.stderr and "train.lr" in proc.stderr, proc.stderr


def test_old_name_num_layers_still_works_with_a_deprecation_warning():
  from keel_jax.model_config import ModelConfig
  with pytest.warns(FutureWarning, match="model.num_layers is deprecated, use model.num_blocks"):
    assert ModelConfig(vocab_size=64, num_layers=6).num_blocks == 6
  cfg = config_lib.base_config()
  with pytest.warns(FutureWarning, match="use model.num_blocks"):
    config_lib.apply_arg(cfg, "num_layers=3")
  assert cfg.model.num_blocks == 3 and "num_layers" not in cfg.model
  cfg.model.update(num_layers=5)  # a config file written with the old name
  with pytest.warns(FutureWarning, match="use model.num_blocks"):
    assert config_lib.validate(cfg).num_blocks == 5
  with pytest.warns(FutureWarning, match="use model.num_blocks"):
    assert config_lib.upgrade_argv(["p", "--config.model.num_layers=8", "--config.train.lr=1"]) == [
        "p", "--config.model.num_blocks=8", "--config.train.lr=1"]
