"""Run by tests/test_jax.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=2: deformcp.jax
on batches sharded over two host devices equals the unsharded calls. Prints "sharded: ok" last."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import deformcp.jax as djax

assert len(jax.devices()) == 2, jax.devices()
mesh = jax.make_mesh((2,), ("batch",))
batch = NamedSharding(mesh, PartitionSpec("batch"))
rng = np.random.default_rng(0)


def sharded_map(f, arrays, replicated=()):
    """f inside shard_map: the arrays split over the devices along axis 0, except those at positions replicated."""
    specs = tuple(PartitionSpec() if i in replicated else PartitionSpec("batch") for i in range(len(arrays)))
    return jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=PartitionSpec("batch"))


def check(name, f, arrays, replicated=()):
    """f and its gradients (but the replicated arrays') under jax.jit and inside shard_map, on the devices."""
    loss = lambda *a: jnp.sum(f(*a) ** 2)  # noqa: E731
    argnums = tuple(i for i in range(len(arrays)) if i not in replicated)
    expected, expected_grads = f(*arrays), jax.grad(loss, argnums=argnums)(*arrays)
    placed = [jax.device_put(a, NamedSharding(mesh, PartitionSpec()) if i in replicated else batch)
              for i, a in enumerate(arrays)]
    mapped = sharded_map(f, arrays, replicated)
    mapped_loss = lambda *a: jnp.sum(mapped(*a) ** 2)  # noqa: E731
    for how, fn, grad in (("jit", jax.jit(f), jax.jit(jax.grad(loss, argnums=argnums))),
                          ("shard_map", jax.jit(mapped), jax.jit(jax.grad(mapped_loss, argnums=argnums)))):
        out = fn(*placed)
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6, err_msg=how)
        if how == "shard_map":
            assert out.sharding.spec[0] == "batch", out.sharding
        for a, b in zip(grad(*placed), expected_grads):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=f"{name} {how}")
        print(f"{name} {how}: ok")


x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
grid = rng.uniform(-1.1, 1.1, (4, 5, 6, 2)).astype(np.float32)
check("grid_sample", djax.grid_sample, (x, grid))

offset = rng.normal(0, 1, (4, 18, 8, 8)).astype(np.float32)
weight = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
conv = lambda x, o, w: djax.deform_conv2d(x, o, w, padding=1)  # noqa: E731
check("deform_conv2d", conv, (x, offset, weight), replicated=(2,))

# inside shard_map a replicated weight's gradient would need a sum over the devices: refused, by name
mapped = sharded_map(conv, (x, offset, weight), replicated=(2,))
placed = (jax.device_put(x, batch), jax.device_put(offset, batch), jax.device_put(weight, NamedSharding(mesh,
                                                                                                       PartitionSpec())))
try:
    jax.jit(jax.grad(lambda *a: jnp.sum(mapped(*a)), argnums=2))(*placed)
except NotImplementedError as error:
    assert "deform_conv2d: the gradient of weight" in str(error), error
else:
    raise AssertionError("a replicated weight's gradient inside shard_map was not refused")
print("sharded: ok")
