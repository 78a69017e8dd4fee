"""Mesh construction, the logical-axis table, and the replicated-bytes check."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

import training_fixtures as fx
from dreamlite_jax.config import ConfigError
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import state as state_lib
from experiments import train_defaults


def test_mesh_shape_resolves_rest_and_names_bad_axis():
  assert mesh_lib.mesh_shape(train_defaults.mesh_config(data=-1, fsdp=4), 8) == (2, 4, 1)
  assert mesh_lib.mesh_shape(train_defaults.mesh_config(data=1, fsdp=-1, tensor=2), 8) == (1, 4, 2)
  with pytest.raises(ConfigError, match="config.mesh.fsdp"):
    mesh_lib.mesh_shape(train_defaults.mesh_config(fsdp=0), 8)
  with pytest.raises(ConfigError, match="needs 6 devices"):
    mesh_lib.mesh_shape(train_defaults.mesh_config(data=3, fsdp=2), 8)
  with pytest.raises(ConfigError, match="not divisible"):
    mesh_lib.mesh_shape(train_defaults.mesh_config(data=-1, fsdp=3), 8)


def test_logical_rules_are_shape_aware():
  mesh = mesh_lib.make_mesh(train_defaults.mesh_config(data=1, fsdp=4, tensor=2))
  conv = ("conv_height", "conv_width", "conv_in", "conv_out")
  assert mesh_lib.logical_to_mesh_spec(P(*conv), (3, 3, 256, 512), mesh) == P(None, None, "fsdp", "tensor")
  # Depthwise kernel: conv_in is 1, so conv_out falls back to fsdp after tensor.
  assert mesh_lib.logical_to_mesh_spec(P(*conv), (3, 3, 1, 512), mesh) == P(None, None, None, "tensor")
  mesh_fsdp = mesh_lib.make_mesh(train_defaults.mesh_config(data=2, fsdp=4))
  assert mesh_lib.logical_to_mesh_spec(P(*conv), (3, 3, 1, 512), mesh_fsdp) == P(None, None, None, "fsdp")
  # A dimension the axis does not divide stays whole (6 rows over fsdp=4).
  assert mesh_lib.logical_to_mesh_spec(P("embed", "mlp"), (6, 64), mesh_fsdp) == P(None, "fsdp")
  assert mesh_lib.logical_to_mesh_spec(P("batch"), (16,), mesh_fsdp) == P(("data", "fsdp"))
  with pytest.raises(ValueError, match="'heads_typo'"):
    mesh_lib.logical_to_mesh_spec(P("heads_typo"), (8,), mesh_fsdp)


def test_tiny_model_params_are_born_sharded_with_expected_specs():
  mesh = mesh_lib.make_mesh(train_defaults.mesh_config(data=2, fsdp=4))
  init_params, _ = fx.make_model_fns()
  tx = state_lib.make_optimizer(fx.tiny_config().train)
  _, shardings = state_lib.state_shardings(init_params, tx, mesh)
  specs = jax.tree.map(lambda s: s.spec, shardings.params)
  assert specs["conv_in"] == P(None, None, "fsdp", None)      # 4 in-channels over fsdp=4
  assert specs["conv_out"] == P(None, None, "fsdp", None)     # 16 in, 4 out
  assert specs["mlp_in"] == P("fsdp", None)
  assert specs["mlp_out"] == P("fsdp", None)                  # ('mlp', 'embed'): mlp falls back to fsdp
  assert specs["bias"] == P(None)
  # The optimiser moments and EMA inherit the params' shardings.
  adam = shardings.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
  assert adam.mu["mlp_in"].spec == P("fsdp", None) and adam.nu["conv_in"].spec == specs["conv_in"]
  assert shardings.ema_params["conv_in"].spec == P(None, None, "fsdp", None)
  state = state_lib.create_state(init_params, tx, mesh, seed=0)
  assert state.params["mlp_in"].sharding.spec == P("fsdp", None)
  assert state.params["mlp_in"].addressable_shards[0].data.shape == (4, 32)


def test_replicated_fraction_check_fires():
  mesh = mesh_lib.make_mesh(train_defaults.mesh_config(data=2, fsdp=4))
  init_params, _ = fx.make_model_fns()
  tx = state_lib.make_optimizer(fx.tiny_config().train)
  abstract, shardings = state_lib.state_shardings(init_params, tx, mesh)
  fraction = mesh_lib.assert_params_sufficiently_sharded(abstract.params, shardings.params, mesh, 0.5)
  assert 0.0 < fraction < 0.5  # the 1-D 'bias' stays replicated
  with pytest.raises(ValueError, match="replicated.*max_replicated_fraction"):
    mesh_lib.assert_params_sufficiently_sharded(abstract.params, shardings.params, mesh, 0.0)


def test_dreamlite_unet_axes_all_have_rules_and_shard():
  """Every logical name the real U-Net uses is in the table; FSDP leaves ~nothing replicated."""
  model = DreamLiteUNet(UNetConfig.tiny(encoder_hid_dim=fx.TEXT_DIM))
  init_params, _ = fx.make_model_fns(model)
  mesh = mesh_lib.make_mesh(train_defaults.mesh_config(data=2, fsdp=4))
  tx = state_lib.make_optimizer(fx.tiny_config().train)
  abstract, shardings = state_lib.state_shardings(init_params, tx, mesh)
  fraction = mesh_lib.assert_params_sufficiently_sharded(abstract.params, shardings.params, mesh, 0.05)
  assert fraction < 0.05
  specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec, shardings.params),
                          is_leaf=lambda x: isinstance(x, P))
  assert sum("fsdp" in tuple(spec) for spec in specs) > len(specs) // 2
