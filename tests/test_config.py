import textwrap

import pytest

from dreamlite_jax import config as config_lib


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text(textwrap.dedent("""
      import ml_collections
      def get_config():
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.train = ml_collections.ConfigDict(dict(batch_size=4, lr=1e-3, name="x", flag=False))
        return c
  """))
  return str(path)


def test_overrides_parse_with_field_types(config_file):
  c = config_lib.load_config_file(config_file)
  config_lib.apply_overrides(
      c, ["--config.train.batch_size=8", "config.train.lr=2", "train.flag=true", "train.name=y"])
  assert c.train.batch_size == 8 and isinstance(c.train.batch_size, int)
  assert c.train.lr == 2.0 and isinstance(c.train.lr, float)
  assert c.train.flag is True and c.train.name == "y"


def test_unknown_field_is_named(config_file):
  c = config_lib.load_config_file(config_file)
  with pytest.raises(config_lib.ConfigError, match=r"config\.train\.batch_sise"):
    config_lib.apply_overrides(c, ["--config.train.batch_sise=8"])
  with pytest.raises(config_lib.ConfigError, match=r"config\.trian"):
    config_lib.apply_overrides(c, ["--config.trian.batch_size=8"])


def test_wrong_type_is_named(config_file):
  c = config_lib.load_config_file(config_file)
  with pytest.raises(config_lib.ConfigError, match=r"config\.train\.batch_size"):
    config_lib.apply_overrides(c, ["--config.train.batch_size=eight"])


def test_missing_file_is_named(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="nope.py"):
    config_lib.load_config_file(str(tmp_path / "nope.py"))
