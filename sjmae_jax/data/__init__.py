"""Input pipeline: TFDS / ImageFolder / embedded digits sources, MAE and SimCLR view recipes.

    cfg = data.default_config()
    info = data.dataset_info(cfg)
    train = data.build_train_pipeline(cfg, global_batch_size=256, seed=0, start_step=0)
    batch = next(train)   # {'images': float32 (B, K, H, W, C), 'label': int32 (B,)}
    for batch in data.build_eval_pipeline(cfg, split='test', global_batch_size=256): ...
"""

from sjmae_jax.data.config import IMAGENET_MEAN, IMAGENET_STD, default_config
from sjmae_jax.data.pipeline import (EvalPipeline, TrainPipeline, build_eval_pipeline,
                                     build_train_pipeline, dataset_info)
from sjmae_jax.data.errors import DataError
from sjmae_jax.data.sources import DatasetInfo

__all__ = [
    "DataError", "DatasetInfo", "EvalPipeline", "IMAGENET_MEAN", "IMAGENET_STD", "TrainPipeline",
    "build_eval_pipeline", "build_train_pipeline", "dataset_info", "default_config",
]
