"""What the linear probe and fine-tuning share: config checks, the pretrained encoder
(`init_from`), the classifier around it, putting the encoder into fresh classifier params."""
import json

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from sjmae_jax import checkpointing, config_lib, data, engine, interop, optim, paths, sharding
from sjmae_jax.models.classifier import ViTClassifier
from sjmae_jax.models.vit import vit_kwargs
from sjmae_jax.train_state import DTYPES

POOLS = ("token", "avg")


def checked(config):
  """The config with absolute paths, once its values are checked (ValueError naming the key)."""
  config = paths.with_absolute_paths(config)
  config_lib.validate(config, num_devices=jax.device_count())
  if config.global_pool not in POOLS:
    raise ValueError(f"config global_pool: {config.global_pool!r} is not one of {POOLS}")
  if config.compute_dtype not in DTYPES:
    raise ValueError(f"config compute_dtype: {config.compute_dtype!r} is not one of "
                     f"{sorted(DTYPES)}")
  return config


def encoder_source(config):
  """(model config, loader of the encoder params) of `config.init_from`; nothing is read yet.

  A directory is a pretraining workdir: its latest Orbax checkpoint, architecture from its
  config.json. A file is imported weights (timm / MAE .pth, .safetensors, ...): architecture from
  `config.model`.
  """
  if not config.init_from:
    raise ValueError("config init_from: empty; pass --config.init_from=WORKDIR_OR_WEIGHTS_FILE")
  source = epath.Path(config.init_from)
  if source.is_dir():
    model_config = ml_collections.ConfigDict(
        checkpointing.read_config(source).model.to_dict())

    def load():
      params = checkpointing.load_params(source)[0]
      if "encoder" not in params:
        raise ValueError(f"config init_from: {source}: checkpoint has no 'encoder' params")
      return params["encoder"]
    return model_config, load
  if not source.exists():
    raise FileNotFoundError(f"config init_from: {paths.shown(source)} does not exist")
  model = config.model
  load = lambda: interop.load_pretrained(str(source), img_size=model.img_size,
                                         patch_size=model.patch_size)["encoder"]
  return ml_collections.ConfigDict(model.to_dict()), load


def build_classifier(config, model_config, num_classes: int, *,
                     head_init_std: float = 2e-5) -> ViTClassifier:
  """The classifier over `model_config`'s encoder, with this config's drop_path_rate."""
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  model_config.drop_path_rate = config.model.drop_path_rate
  if model_config.img_size != config.data.img_size:
    raise ValueError(f"config data.img_size: {config.data.img_size} differs from the encoder's "
                     f"img_size {model_config.img_size} (from {config.init_from})")
  return ViTClassifier(vit_kwargs(model_config), num_classes, global_pool=config.global_pool,
                       head_init_std=head_init_std, dtype=DTYPES[config.compute_dtype])


def sample_images(classifier: ViTClassifier, batch_size: int = 1):
  size = classifier.encoder_kwargs["img_size"]
  return jnp.zeros((batch_size, size, size, classifier.encoder_kwargs["in_chans"]), jnp.float32)


def with_encoder(params, encoder_params, global_pool: str):
  """Fresh classifier `params` with the pretrained encoder put in.

  'avg' pooling has no final `norm` (fc_norm replaces it, fresh); 'token' pooling needs it.
  A mask token (SimMIM-style encoders) is not part of a classifier.
  """
  unexpected = ["encoder/mask_token"] + (["encoder/norm"] if global_pool == "avg" else [])
  try:
    merged = interop.merge_params({"encoder": jax.device_get(params["encoder"])},
                                  {"encoder": encoder_params}, allow_unexpected=unexpected)
  except ValueError as e:
    raise ValueError(f"config init_from: {e}") from None
  return dict(params, encoder=merged["encoder"])


def put_encoder(state, shardings, encoder_params, global_pool: str, keys=("params",)):
  """`state` with the pretrained encoder in each of `keys` (params, and an EMA of them)."""
  for key in keys:
    params = with_encoder(state[key], encoder_params, global_pool)
    state = dict(state, **{key: jax.device_put(params, shardings[key])})
  return state


def with_config(summary: dict, config) -> dict:
  """What results.json holds: the numbers and the full config."""
  return dict(summary, config=json.loads(config.to_json_best_effort()))


def state_shapes(config, init_state):
  """Shapes of the train state of `init_state` under config's optimizer (no data read)."""
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1)
  return engine.abstract_train_state(init_state, tx)


def training(config, start_step: int):
  """(train data positioned at start_step, optimizer, schedule, mesh) of an evaluation program."""
  train_data = data.build_train_pipeline(config.data, global_batch_size=config.batch_size,
                                         seed=config.seed, start_step=start_step)
  tx, schedule = optim.make_optimizer(config, train_data.steps_per_epoch)
  return train_data, tx, schedule, sharding.make_mesh(config.mesh)
