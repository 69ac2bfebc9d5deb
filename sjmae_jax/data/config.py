"""Default data configuration: every key the input pipeline reads, with its default."""

import os

import ml_collections

# ImageNet statistics, as used by MAE / SJ-MAE / timm (RGB, images scaled to [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def data_normalization(data_config) -> tuple:
  """(mean, std) that the input pipeline of `data_config` applies to [0, 1] images (data.normalize:
  'imagenet', 'custom' with data.mean / data.std, or 'none')."""
  if data_config.normalize == "custom":
    return tuple(data_config.mean), tuple(data_config.std)
  if data_config.normalize == "none":
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  return IMAGENET_MEAN, IMAGENET_STD


def default_tfds_dir():
  return os.environ.get("SJMAE_TFDS_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _recipe(**overrides):
  """One augmentation recipe. Every recipe has every key so that any can be overridden."""
  recipe = dict(
      # 'random_resized_crop' (train), 'center' (resize + center crop, the eval recipe) or
      # 'pad_crop' (torchvision RandomCrop(img_size, padding=pad): a random img_size window of the
      # image zero-padded by `pad` pixels on each side, no resampling; the CIFAR train crop).
      crop="random_resized_crop",
      pad=0,  # pixels of zero padding on each side, for crop='pad_crop'
      rrc_scale=(0.2, 1.0),  # fraction of the image area
      rrc_ratio=(3.0 / 4.0, 4.0 / 3.0),  # width / height, sampled log-uniformly
      interpolation="bicubic",  # 'bicubic' | 'bilinear'
      flip_prob=0.5,
      jitter_prob=0.0,  # probability of applying colour jitter at all
      brightness=0.4,
      contrast=0.4,
      saturation=0.4,
      hue=0.1,
      grayscale_prob=0.0,
      blur_prob=0.0,
      blur_sigma=(0.1, 2.0),  # in pixels of the output image
      solarize_prob=0.0,
      solarize_threshold=0.5,  # on the [0, 1] scale (128 / 255 ~ 0.5)
      # Fine-tuning options (timm semantics): RandAugment config string, '' = off (see
      # randaugment.py), and the probability of random erasing, 'pixel' mode (random_erasing.py).
      randaugment="",
      random_erase_prob=0.0,
  )
  recipe.update(overrides)
  return recipe


RECIPE_KEYS = tuple(_recipe())


def default_config():
  """The `data` section of an experiment config (an ml_collections.ConfigDict)."""
  cfg = ml_collections.ConfigDict()
  # 'digits' (embedded, offline), 'tfds:NAME[:VERSION]', 'folder:PATH' (ImageFolder layout) or
  # 'arrayrecord:DIR' (shards written by python -m sjmae_jax.data.prepare).
  cfg.source = "digits"
  cfg.train_split = "train"
  cfg.eval_split = "test"
  cfg.data_dir = default_tfds_dir()  # TFDS data_dir; also holds digits and the folder caches
  cfg.download = False  # allow TFDS download_and_prepare of datasets not yet prepared
  cfg.image_key = "image"  # TFDS feature names
  cfg.label_key = "label"

  cfg.img_size = 16
  cfg.views = ["mae"]  # one recipe name per view; a batch carries len(views) views per image
  cfg.recipes = ml_collections.ConfigDict(dict(
      mae=_recipe(),
      # SJ-MAE / CAN two-view recipe (SimCLR augmentations).
      simclr=_recipe(jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5),
      eval=_recipe(crop="center", flip_prob=0.0),
      # MAE / timm supervised fine-tuning: RRC(0.08-1, bicubic) + flip + RandAugment + erasing.
      finetune=_recipe(rrc_scale=(0.08, 1.0), randaugment="rand-m9-mstd0.5-inc1",
                       random_erase_prob=0.25),
  ))
  cfg.eval_recipe = "eval"
  # Eval: resize the shorter side to img_size / eval_crop_fraction, then center crop img_size.
  cfg.eval_crop_fraction = 0.875

  # 'imagenet', 'none' (keep [0, 1]) or 'custom' (use mean / std below).
  cfg.normalize = "imagenet"
  cfg.mean = IMAGENET_MEAN
  cfg.std = IMAGENET_STD

  # Hold the decoded uint8 images in memory (when every image has the same size): fastest for
  # CIFAR / digits sized data. Otherwise images are decoded (PIL) at every read.
  cfg.cache = True
  cfg.cache_max_gb = 16.0  # larger splits are decoded at every read instead
  cfg.shuffle_buffer = 10_000  # used only when streaming a TFRecord TFDS split (TensorFlow extra)
  cfg.skip_corrupt = False  # folder sources: skip undecodable files (counted in the log)
  # JPEG decoder: 'auto' (simplejpeg when installed, else PIL), 'simplejpeg' or 'pil'. Both use
  # libjpeg-turbo with the same settings and give the same pixels; simplejpeg skips PIL's copies
  # (decode + 224 px crop of a 500 x 375 photo: ~1.2x fewer CPU-seconds, BENCHMARKS.md).
  cfg.decoder = "auto"
  # How crops of images decoded at every read are resized to img_size on the host: 'pil'
  # (torchvision's RandomResizedCrop / Resize on PIL images, bit for bit) or 'opencv' (needs
  # opencv-python-headless; about half PIL's CPU time, pixels within about one level of PIL's
  # on average: an area filter when shrinking, OpenCV's bicubic when enlarging). Cached
  # CIFAR-size data is cropped in the batched JAX step and does not use it.
  cfg.resize = "pil"
  cfg.prefetch = 2  # host-side batches prepared ahead (Grain's prefetch buffer)
  # Grain threads preparing them (image decoding and cropping): 'auto' = two per host core, at
  # most 16; or a count (more for remote storage, where threads wait on reads).
  cfg.num_threads = ml_collections.FieldReference("auto", field_type=object)
  # Grain worker processes decoding images that are read from files / records at every step
  # (each makes whole batches, data.prefetch ahead, in up to that many threads): 'auto' = one per
  # host core for splits of >= 10,000 images, 0 = threads of this process only. In-memory data
  # never uses them.
  cfg.num_workers = ml_collections.FieldReference("auto", field_type=object)
  # Compute the views (crop of cached images, colour ops, normalisation) inside the training
  # step on the accelerator instead of on the host CPU (see TrainPipeline.finish_batch):
  # True, False, or 'auto' = on when JAX's default backend is not the CPU.
  cfg.augment_on_device = ml_collections.FieldReference("auto", field_type=object)
  return cfg
