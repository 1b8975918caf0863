"""mypy must reject: an int where deformcp.jax.grid_sample's mode (a str) is expected."""
import jax.numpy as jnp

import deformcp.jax as djax

djax.grid_sample(jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 4, 4, 2)), mode=1)  # error: [arg-type]
