"""The pretraining model and its train state: the objective of `config.method`, the shape of a
pretraining batch, a fresh state. Shared by the trainer and the memory plan."""
import jax
import jax.numpy as jnp

from sjmae_jax import engine, objectives, optim
from sjmae_jax.data.config import data_normalization
from sjmae_jax.objectives.pictures import for_display

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config):
  if config.compute_dtype not in DTYPES:
    raise ValueError(f"config compute_dtype: {config.compute_dtype!r} is not one of {sorted(DTYPES)}")
  kernel_cast_dtype(config)  # a bad model.cast_params_once fails here, before compiling
  return objectives.build(config, dtype=DTYPES[config.compute_dtype])


def kernel_cast_dtype(config):
  """The dtype that the step casts the matmul kernels to once (model.cast_params_once), or None
  (each layer casts its kernel where it uses it)."""
  once = config.model.get("cast_params_once", False)
  if not isinstance(once, bool):
    raise ValueError(f"config model.cast_params_once: {once!r} is not True or False")
  dtype = DTYPES[config.compute_dtype]
  return dtype if once and dtype != jnp.float32 else None


def sample_batch(config, batch_size: int = 2) -> dict:
  img, chans = config.model.img_size, config.model.get("in_chans", 3)
  return {"images": jnp.zeros((batch_size, len(config.data.views), img, img, chans), jnp.float32),
          "label": jnp.zeros((batch_size,), jnp.int32)}


def model_state(model, config, rng) -> dict:
  """A fresh {'params', 'batch_stats', 'rng'} of the objective (what the engine trains)."""
  params_rng, init_rng, _, train_rng = jax.random.split(rng, 4)
  variables = model.init({"params": params_rng, **objectives.step_rngs(model, init_rng)},
                         sample_batch(config), train=True)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
          "rng": train_rng}


def init_state(model, tx, config, rng) -> dict:
  """A fresh full train state (model state, optimizer state, step and counters)."""
  return engine.with_bookkeeping(model_state(model, config, rng), tx)


def abstract_train_state(config):
  """Shapes/dtypes of the train state (no computation, no devices needed)."""
  model = build_model(config)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1)
  return engine.abstract_train_state(lambda rng: model_state(model, config, rng), tx)


def make_loss_fn(model):
  """(params, batch_stats, batch, rng) -> (loss, (metrics, new batch_stats)) of the objective."""
  def loss_fn(params, batch_stats, batch, rng):
    (loss, metrics), updated = model.apply(
        {"params": params, "batch_stats": batch_stats}, batch, train=True,
        rngs=objectives.step_rngs(model, rng), mutable=["batch_stats"])
    return loss, (metrics, updated.get("batch_stats", batch_stats))
  return loss_fn


def make_train_step(model, tx, schedule, mesh, grad_accum_steps: int = 1, **options):
  """The engine's step (engine.make_train_step) on the objective's loss."""
  return engine.make_train_step(make_loss_fn(model), tx, schedule, mesh, grad_accum_steps,
                                **options)


def pictures_fn(model, data_config):
  """(state, finished batch) -> the objective's pictures in [0, 1] (unnormalized with the data's
  mean and std), with a fixed rng apart from the steps'."""
  mean, std = data_normalization(data_config)

  def pictures(state, batch):
    rng = jax.random.fold_in(state["rng"], 2 ** 31 - 1)
    drawn = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, batch,
                        method="pictures", rngs=objectives.step_rngs(model, rng))
    return {name: for_display(picture, mean, std) for name, picture in drawn.items()}
  return pictures
