import ast
import os
import textwrap

import pytest

from dreamlite_jax import config as config_lib
from dreamlite_jax import config_schema

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


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


def test_loading_is_pure_and_validation_names_the_field_where_it_sits(tmp_path):
  """`config` loads without validating (the job loader and the trainer validate)."""
  path = tmp_path / "exp.py"
  path.write_text("import ml_collections\n"
                  "def get_config():\n"
                  "  return ml_collections.ConfigDict(dict(train=dict(schedule='x')))\n")
  assert config_lib.load_config(str(path)).train.schedule == "x"
  with pytest.raises(config_lib.ConfigError, match=r"^config\.train\.schedule = 'x'"):
    config_schema.validate(config_lib.load_config(str(path)))
  with pytest.raises(config_lib.ConfigError, match=r"^config\.sft\.train\.schedule = 'x'"):
    config_schema.validate(config_lib.load_config(str(path)), "config.sft")


def _imports(module: str) -> set[str]:
  tree = ast.parse(open(os.path.join(ROOT, "dreamlite_jax", f"{module}.py")).read())
  names = set()
  for node in ast.walk(tree):  # function-level imports too
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      names.update([node.module] + [f"{node.module}.{alias.name}" for alias in node.names])
  return names


def test_config_imports_nothing_that_imports_it():
  """The schema imports `config`, never the reverse."""
  assert "dreamlite_jax.config" in _imports("config_schema")
  assert not [n for n in _imports("config") if n.startswith("dreamlite_jax")]
