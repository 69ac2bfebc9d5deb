"""PyTorch interop: timm / facebookresearch-mae state dicts <-> our Flax params.

  sjmae_jax.interop.timm  encoder_to_timm, timm_to_encoder, classifier_to_timm,
                          timm_to_classifier, timm_model_args
  sjmae_jax.interop.mae   mae_to_torch, torch_mae_to_params, mae_model_args
  load_pretrained         a checkpoint file -> {'encoder', 'decoder'?, 'fc_norm'?, 'head'?}
  merge_params            put loaded params into a model's initial params, with strict checks
Nothing here imports torch except reading .pth / .bin files. See docs/interop.md.
"""
from sjmae_jax.interop import mae, timm
from sjmae_jax.interop.io import read_state_dict, save_state_dict
from sjmae_jax.interop.pretrained import load_pretrained, merge_params
from sjmae_jax.interop.resample import resample_pos_embed

__all__ = ["load_pretrained", "mae", "merge_params", "read_state_dict", "resample_pos_embed",
           "save_state_dict", "timm"]
