"""LARS as facebookresearch/mae util/lars.py (the linear-probe optimizer).

For a parameter p with more than one dimension: d = g + wd * p, then d *= trust * ||p|| / ||d||
(1 where either norm is 0). 1-D parameters (biases, norms) skip both the decay and the
adaptation. Then mu = momentum * mu + d and p -= lr * mu: the learning rate scales the momentum
buffer at each step, so a schedule acts immediately (optax.lars scales before the momentum
trace, which differs while the learning rate changes, e.g. during warmup).
"""
import jax
import optax


def _is_matrix(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def lars(learning_rate, *, momentum: float = 0.9, trust_coefficient: float = 0.001,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=_is_matrix),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), _is_matrix),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate),
  )
