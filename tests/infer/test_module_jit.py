"""module_jit: nnx.jit's results for read-only calls, one compilation per structure, no state out."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from illume_jax.infer.module_jit import module_jit


def test_module_jit_matches_eager_and_compiles_once_per_structure():
    calls = []

    @module_jit
    def apply(model, x, scale=1.0):
        calls.append(1)              # runs at trace time only
        return model(x) * scale

    a, b = nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(1))
    x = jnp.arange(8.0).reshape(2, 4)
    np.testing.assert_allclose(np.asarray(apply(a, x, 1.0)), np.asarray(a(x)), rtol=1e-6)
    # Another instance of the same structure (new weights, e.g. a later checkpoint) reuses the program.
    np.testing.assert_allclose(np.asarray(apply(b, x, 2.0)), np.asarray(b(x) * 2.0), rtol=1e-6)
    assert len(calls) == 1 and apply.pure._cache_size() == 1
    # A different structure compiles its own.
    apply(nnx.Linear(4, 5, rngs=nnx.Rngs(0)), x, 1.0)
    assert apply.pure._cache_size() == 2


def test_module_jit_static_args_and_no_state_output():
    f = module_jit(lambda m, x, *, n: m(x)[:n], static_argnames=("n",))
    m = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    x = jnp.ones((5, 4))
    assert f(m, x, n=2).shape == (2, 3) and f(m, x, n=3).shape == (3, 3)
    # The compiled program returns only the result: no parameter comes back out.
    gd, state = nnx.split(m)
    out = jax.eval_shape(lambda s: f.pure(s, x, graphdef=gd, n=2), state)
    assert out.shape == (2, 3)
