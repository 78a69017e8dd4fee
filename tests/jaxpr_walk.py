"""Walking a jaxpr for graph checks (ranks, forbidden ops) in the export tests."""
from jax.extend import core as jex_core


def jaxpr_eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations (scan, remat, pjit...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jex_core.jaxprs_in_params(eqn.params):
      yield from jaxpr_eqns(sub)
