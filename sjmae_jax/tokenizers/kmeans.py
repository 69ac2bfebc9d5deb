"""k-means in JAX: nearest-centroid assignment in chunks and a jitted Lloyd loop.

The distance matrix of all points against all centroids never exists at once: points are
assigned `chunk_size` at a time, so a few million 768-d points against 8192 centroids fit in
device memory.
"""
import functools

import jax
import jax.numpy as jnp


def nearest_centroid(points, centroids, chunk_size: int = 4096):
  """(ids (N,) int32, squared distances (N,)) of each point's nearest centroid.

  points: (..., D), any leading shape (flattened and restored); centroids: (K, D).
  """
  lead_shape, dim = points.shape[:-1], points.shape[-1]
  points = points.reshape(-1, dim).astype(jnp.float32)
  centroids = centroids.astype(jnp.float32)
  n = points.shape[0]
  chunk_size = max(1, min(chunk_size, n))
  num_chunks = -(-n // chunk_size)
  padded = jnp.pad(points, ((0, num_chunks * chunk_size - n), (0, 0)))
  centroid_sq = jnp.sum(centroids ** 2, axis=1)

  def assign(chunk):
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin but gives the distance.
    scores = centroid_sq[None, :] - 2.0 * chunk @ centroids.T
    ids = jnp.argmin(scores, axis=1)
    best = jnp.take_along_axis(scores, ids[:, None], axis=1)[:, 0]
    return ids.astype(jnp.int32), jnp.maximum(best + jnp.sum(chunk ** 2, axis=1), 0.0)

  ids, distances = jax.lax.map(assign, padded.reshape(num_chunks, chunk_size, dim))
  ids, distances = ids.reshape(-1)[:n], distances.reshape(-1)[:n]
  return ids.reshape(lead_shape), distances.reshape(lead_shape)


def random_init(rng, points, k: int):
  """k distinct data points, uniformly (faiss' initialisation)."""
  return points[jax.random.choice(rng, points.shape[0], (k,), replace=False)]


def kmeans_plus_plus_init(rng, points, k: int):
  """k-means++ (Arthur & Vassilvitskii 2007): each next center is drawn with probability
  proportional to the squared distance to the nearest center chosen so far. O(k N D)."""
  points = points.astype(jnp.float32)
  first_rng, rng = jax.random.split(rng)
  first = points[jax.random.randint(first_rng, (), 0, points.shape[0])]
  centers = jnp.zeros((k, points.shape[1]), jnp.float32).at[0].set(first)
  nearest_sq = jnp.sum((points - first) ** 2, axis=1)

  def add_center(i, carry):
    centers, nearest_sq = carry
    logits = jnp.log(jnp.maximum(nearest_sq, 1e-30))
    chosen = points[jax.random.categorical(jax.random.fold_in(rng, i), logits)]
    nearest_sq = jnp.minimum(nearest_sq, jnp.sum((points - chosen) ** 2, axis=1))
    return centers.at[i].set(chosen), nearest_sq

  centers, _ = jax.lax.fori_loop(1, k, add_center, (centers, nearest_sq))
  return centers


def lloyd_step(points, centroids, chunk_size: int = 4096):
  """One assignment + update. Empty clusters move to the points farthest from their centroid
  (as scikit-learn does), so every code stays in use. Returns (centroids, mean squared distance
  before the update)."""
  k = centroids.shape[0]
  ids, distances = nearest_centroid(points, centroids, chunk_size)
  sums = jax.ops.segment_sum(points.astype(jnp.float32), ids, num_segments=k)
  counts = jax.ops.segment_sum(jnp.ones_like(distances), ids, num_segments=k)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  empty = counts == 0
  farthest = jax.lax.top_k(distances, min(k, points.shape[0]))[1]
  slot = jnp.clip(jnp.cumsum(empty) - 1, 0, farthest.shape[0] - 1)
  means = jnp.where(empty[:, None], points[farthest[slot]].astype(jnp.float32), means)
  return means, jnp.mean(distances)


@functools.partial(jax.jit, static_argnames=("k", "iterations", "init", "chunk_size"))
def kmeans(rng, points, *, k: int, iterations: int = 20, init: str = "random",
           chunk_size: int = 4096):
  """Fit k centroids to points (N, D).

  Returns (centroids (k, D), mean squared distance of the points to their nearest centroid at
  the start and after each iteration (iterations + 1,), non-increasing).
  """
  if init not in ("random", "kmeans++"):
    raise ValueError(f"k-means init {init!r}: expected 'random' or 'kmeans++'")
  if k > points.shape[0]:
    raise ValueError(f"k-means: {k} centroids need at least as many points, got {points.shape[0]}")
  points = points.astype(jnp.float32)
  start = random_init(rng, points, k) if init == "random" else kmeans_plus_plus_init(rng, points, k)
  centroids, history = jax.lax.scan(lambda c, _: lloyd_step(points, c, chunk_size), start, None,
                                    length=iterations)
  final = jnp.mean(nearest_centroid(points, centroids, chunk_size)[1])
  return centroids, jnp.append(history, final)
