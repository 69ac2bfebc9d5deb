"""What the linear probe and fine-tuning share: the pretrained encoder (`init_from`), the
classifier around it, top-k counting over the eval split, results.json."""
import json

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from sjmae_jax import checkpointing, interop, sharding
from sjmae_jax.models.classifier import ViTClassifier
from sjmae_jax.models.vit import vit_kwargs

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def validate_shared(config, positive_keys=("epochs", "batch_size")) -> None:
  """Checks the keys both evaluators have (ValueError naming the key)."""
  if config.global_pool not in ("token", "avg"):
    raise ValueError(f"config global_pool: {config.global_pool!r} is not 'token' or 'avg'")
  for key in positive_keys:
    if config[key] <= 0:
      raise ValueError(f"config {key}: must be positive, got {config[key]}")


def make_mesh(config):
  """The (data, fsdp) mesh of `config.mesh`, checked against `config.batch_size`."""
  mesh = sharding.make_mesh(config.mesh)
  if config.batch_size % mesh.size:
    raise ValueError(f"config batch_size: {config.batch_size} is not divisible by the "
                     f"{mesh.size} devices")
  return mesh


def load_encoder(config):
  """(encoder params on host, model config) of `config.init_from`.

  A directory is a pretraining workdir: its latest Orbax checkpoint, architecture from its
  config.json. A file is imported weights (timm / MAE .pth, .safetensors, ...): architecture
  from `config.model`.
  """
  if not config.init_from:
    raise ValueError("config init_from: empty; pass --config.init_from=WORKDIR_OR_WEIGHTS_FILE")
  source = epath.Path(config.init_from)
  if source.is_dir():
    params, pretrain_config = checkpointing.load_params(source)
    if "encoder" not in params:
      raise ValueError(f"config init_from: {source}: checkpoint has no 'encoder' params")
    return params["encoder"], ml_collections.ConfigDict(pretrain_config.model.to_dict())
  if not source.exists():
    raise FileNotFoundError(f"config init_from: {source} does not exist")
  model = config.model
  loaded = interop.load_pretrained(str(source), img_size=model.img_size,
                                   patch_size=model.patch_size)
  return loaded["encoder"], ml_collections.ConfigDict(model.to_dict())


def build_classifier(config, model_config, num_classes: int, *, drop_path_rate: float = 0.0,
                     head_init_std: float = 2e-5) -> ViTClassifier:
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  model_config.drop_path_rate = drop_path_rate
  if model_config.img_size != config.data.img_size:
    raise ValueError(f"config data.img_size: {config.data.img_size} differs from the encoder's "
                     f"img_size {model_config.img_size} (from {config.init_from})")
  if config.compute_dtype not in DTYPES:
    raise ValueError(f"config compute_dtype: {config.compute_dtype!r} is not one of "
                     f"{sorted(DTYPES)}")
  return ViTClassifier(vit_kwargs(model_config), num_classes, global_pool=config.global_pool,
                       head_init_std=head_init_std, dtype=DTYPES[config.compute_dtype])


def init_classifier_params(classifier: ViTClassifier, encoder_params, rng):
  """Fresh classifier params with the pretrained encoder put in (host numpy tree); with
  `encoder_params` None, the fresh params (training from scratch).

  'avg' pooling has no final `norm` (fc_norm replaces it, fresh); 'token' pooling needs it.
  A mask token (SimMIM-style encoders) is not part of a classifier.
  """
  size = classifier.encoder_kwargs["img_size"]
  sample = jnp.zeros((1, size, size, classifier.encoder_kwargs["in_chans"]), jnp.float32)
  fresh = jax.jit(classifier.init)(rng, sample)["params"]
  if encoder_params is None:
    return jax.device_get(fresh)
  unexpected = ["encoder/mask_token"]
  if classifier.global_pool == "avg":
    unexpected.append("encoder/norm")
  try:
    merged = interop.merge_params({"encoder": fresh["encoder"]}, {"encoder": encoder_params},
                                  allow_unexpected=unexpected)
  except ValueError as e:
    raise ValueError(f"config init_from: {e}") from None
  return dict(jax.device_get(fresh), encoder=merged["encoder"])


def topk_correct(logits, labels, valid, ks=(1, 5)):
  """{k: number of valid examples whose label is among the k highest logits}."""
  rank = jnp.sum(logits > jnp.take_along_axis(logits, labels[:, None], axis=-1), axis=-1)
  return {k: jnp.sum((rank < k) & valid) for k in ks}


def evaluate(logits_fn, eval_data, mesh) -> dict:
  """top1 / top5 of jitted `logits_fn(global batch) -> (correct@1, correct@5, count)`."""
  correct1 = correct5 = total = 0
  for local_batch in eval_data:
    batch = sharding.global_batch(local_batch, mesh)
    c1, c5, count = jax.device_get(logits_fn(batch))
    correct1, correct5, total = correct1 + int(c1), correct5 + int(c5), total + int(count)
  return {"top1": correct1 / max(total, 1), "top5": correct5 / max(total, 1),
          "num_examples": total}


def write_results(workdir, results: dict, config) -> None:
  if jax.process_index() != 0:
    return
  results = dict(results, config=json.loads(config.to_json_best_effort()))
  checkpointing.write_text_atomically(epath.Path(workdir) / "results.json",
                                      json.dumps(results, indent=2, sort_keys=True))


def num_steps(num_examples: int, batch_size: int, what: str) -> int:
  steps = num_examples // batch_size
  if steps == 0:
    raise ValueError(f"config batch_size: {batch_size} is larger than the {num_examples} "
                     f"examples of {what}")
  return steps
