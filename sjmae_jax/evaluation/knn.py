"""Weighted kNN classification of frozen features (DINO's eval_knn.py) and the pretraining monitor.

Features are L2-normalized; each test example takes its k most cosine-similar train examples,
each voting for its label with weight exp(similarity / temperature); the class with the largest
vote is the prediction. The monitor embeds a labelled subset of the train split and (a subset of)
the eval split with the run's features (pretraining: the CLS token after the final norm), eval
recipe.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sjmae_jax import data, sharding
from sjmae_jax.data.sources import ArraySplit, FileSplit, open_source, slice_indices


def knn_scores(train_features, train_labels, test_features, num_classes: int, k: int = 20,
               temperature: float = 0.07):
  """Class votes (N_test, C) of a weighted kNN over cosine similarity."""
  normalize = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  similarity = normalize(test_features) @ normalize(train_features).T
  top_similarity, top_index = jax.lax.top_k(similarity, min(k, train_features.shape[0]))
  weights = jnp.exp(top_similarity / temperature)
  votes = jax.nn.one_hot(train_labels[top_index], num_classes) * weights[..., None]
  return votes.sum(axis=1)


_knn_scores = jax.jit(knn_scores, static_argnames=("num_classes", "k", "temperature"))


def knn_top1(train_features, train_labels, test_features, test_labels, num_classes: int,
             k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
  """Top-1 accuracy of the weighted kNN classifier (test examples in chunks to bound memory)."""
  train_features = jnp.asarray(train_features, jnp.float32)
  train_labels = jnp.asarray(train_labels, jnp.int32)
  correct = 0
  for start in range(0, len(test_labels), chunk):
    scores = _knn_scores(train_features, train_labels,
                         jnp.asarray(test_features[start:start + chunk], jnp.float32),
                         num_classes=num_classes, k=k, temperature=temperature)
    correct += int(np.sum(np.argmax(np.asarray(scores), -1) == test_labels[start:start + chunk]))
  return correct / max(len(test_labels), 1)


def balanced_subset(data_config, split: str, num: int) -> str:
  """A split expression for about `num` examples of `split` covering every class.

  The first `num` examples when they hold every class at least at half its share (shuffled
  sources, e.g. TFDS); otherwise the first ceil(num / C) examples of each class as contiguous
  ranges (class-sorted sources such as ImageFolder copies of CIFAR). `split` may itself be an
  expression ('train[:10%]', 'train+test'). `num` <= 0 or at least the split's size: the whole
  split. Streamed splits (labels unknown up front): the first `num`.
  """
  source = open_source(data_config)
  if num <= 0 or num >= source.num_examples(split):
    return split
  plain = "[" not in split and "+" not in split
  loaded = source.load(split, data_config.cache)
  if not isinstance(loaded, (ArraySplit, FileSplit)):
    if plain:
      return f"{split}[:{num}]"
    raise data.DataError(f"config monitors: cannot take {num} examples of the streamed split "
                         f"expression {split!r}; use a named split, or num_train / num_eval 0 "
                         "(the whole split)")
  labels = np.asarray(loaded.labels)
  classes = np.unique(labels)
  quota = math.ceil(num / len(classes))
  totals = {c: int(np.sum(labels == c)) for c in classes}
  first = labels[:num]
  if all(np.sum(first == c) >= 0.5 * min(quota, totals[c]) for c in classes):
    if plain:
      return f"{split}[:{num}]"
    chosen = np.arange(num)
  else:
    chosen = np.sort(np.concatenate([np.flatnonzero(labels == c)[:quota] for c in classes]))
  return positions_expression(split, chosen, source.num_examples)


def positions_expression(split: str, positions, split_sizes) -> str:
  """The split expression of the examples at sorted `positions` of the expression `split`:
  contiguous runs within one named split become 'name[start:stop]', joined by '+'."""
  names, indices = [], []
  offset = 0
  for name, start, stop in slice_indices(split, split_sizes):
    mine = positions[(positions >= offset) & (positions < offset + stop - start)]
    names += [name] * len(mine)
    indices.append(mine - offset + start)
    offset += stop - start
  indices = np.concatenate(indices)
  parts, begin = [], 0
  for end in range(1, len(indices) + 1):
    if end == len(indices) or names[end] != names[begin] or indices[end] != indices[end - 1] + 1:
      parts.append(f"{names[begin]}[{indices[begin]}:{indices[end - 1] + 1}]")
      begin = end
  return "+".join(parts)


class KnnMonitor:
  """kNN top-1 of the run's features (the `knn` monitor), logged as `knn/top1`.

  Spec keys: num_train / num_eval (class-balanced subsets of data.train_split / the eval split,
  0 = all), k, temperature, split ('' = data.eval_split), prefix ('knn/').
  """

  def __init__(self, spec, data_config, features_fn, mesh, *, batch_size: int, every_steps: int):
    if spec.k <= 0 or spec.temperature <= 0:
      raise ValueError(f"config monitors knn k/temperature: must be positive, got "
                       f"{spec.k}/{spec.temperature}")
    self.every_steps = every_steps
    self.mesh = mesh
    self.k, self.temperature = int(spec.k), float(spec.temperature)
    self.name = f"{spec.get('prefix', 'knn/')}top1"
    self.num_classes = data.dataset_info(data_config).num_classes
    train_split = balanced_subset(data_config, data_config.train_split, spec.num_train)
    eval_split = balanced_subset(data_config, spec.get("split", "") or data_config.eval_split,
                                 spec.get("num_eval", 0))
    self.train_data = data.build_eval_pipeline(data_config, split=train_split,
                                               global_batch_size=batch_size)
    self.eval_data = data.build_eval_pipeline(data_config, split=eval_split,
                                              global_batch_size=batch_size)
    logging.info("kNN monitor: %d train / %d eval examples, every %d steps",
                 self.train_data.num_examples, self.eval_data.num_examples, self.every_steps)
    self._embed = jax.jit(
        lambda state, batch: (features_fn(state, batch["images"][:, 0]), batch["label"],
                              batch["valid"]), out_shardings=sharding.replicated(mesh))

  def __call__(self, state) -> dict:
    train_features, train_labels = features_of(self._embed, state, self.train_data, self.mesh)
    eval_features, eval_labels = features_of(self._embed, state, self.eval_data, self.mesh)
    top1 = knn_top1(train_features, train_labels, eval_features, eval_labels, self.num_classes,
                    self.k, self.temperature)
    return {self.name: top1}


def features_of(embed, state, pipeline, mesh):
  """(features, labels) on host of every valid example of an eval pipeline; `embed` is jitted
  (state, global batch) -> (features, labels, valid)."""
  features, labels = [], []
  for local_batch in pipeline:
    batch_features, batch_labels, valid = jax.device_get(
        embed(state, sharding.global_batch(local_batch, mesh)))
    features.append(batch_features[valid])
    labels.append(batch_labels[valid])
  return np.concatenate(features), np.concatenate(labels)
