"""Our MAE pretraining params <-> facebookresearch/mae `MaskedAutoencoderViT` state dicts.

MaskedAutoencoderViT's keys are timm's encoder keys (cls_token, pos_embed, patch_embed.proj,
blocks.{i}.*, norm) plus the decoder's: mask_token, decoder_embed, decoder_pos_embed,
decoder_blocks.{i}.*, decoder_norm, decoder_pred. Our MAEDecoder uses the same names, so the
decoder converts with the same renaming as the encoder.
"""
from collections.abc import Mapping

from sjmae_jax.interop.convert import (check_state_dict, params_to_state_dict,
                                       state_dict_to_params, to_numpy)
from sjmae_jax.interop.resample import resample_pos_embed
from sjmae_jax.interop.timm import (block_shapes, count_blocks, encoder_geometry, encoder_to_timm,
                                    grid_of, timm_to_encoder)
from sjmae_jax.models.sizes import SIZES

# LayerNorm eps of every norm in our encoder and decoder, and of models_mae.py's factories
# (partial(nn.LayerNorm, eps=1e-6)); MaskedAutoencoderViT's own default norm_layer is
# nn.LayerNorm (eps 1e-5), so a non-standard size must be built with this eps (docs/interop.md).
NORM_EPS = 1e-6

# Reference model factories of models_mae.py: name -> (embed_dim, depth, num_heads, patch_size),
# all with decoder 512 wide, 8 deep, 16 heads.
MAE_MODELS = {f"mae_vit_{size}_patch{patch}": (*SIZES[size][:3], patch)
              for size, patch in (("base", 16), ("large", 16), ("huge", 14))}


def is_decoder_key(key: str) -> bool:
  return key.startswith("decoder_") or key == "mask_token"


def decoder_shapes(state_dict: Mapping, what: str = "MAE decoder") -> dict:
  """Every MaskedAutoencoderViT decoder key with its shape, sized from `state_dict`'s weights."""
  for key in ("decoder_embed.weight", "decoder_pos_embed", "decoder_pred.weight"):
    if key not in state_dict:
      raise ValueError(f"{what}: missing key {key!r}")
  dim, encoder_dim = state_dict["decoder_embed.weight"].shape
  grid = grid_of(state_dict["decoder_pos_embed"].shape, "decoder_pos_embed")
  out_dim = state_dict["decoder_pred.weight"].shape[0]
  fc1 = state_dict.get("decoder_blocks.0.mlp.fc1.weight")
  hidden = fc1.shape[0] if fc1 is not None else 4 * dim
  shapes = {
      "decoder_embed.weight": (dim, encoder_dim), "decoder_embed.bias": (dim,),
      "mask_token": (1, 1, dim),
      "decoder_pos_embed": (1, 1 + grid * grid, dim),
      "decoder_norm.weight": (dim,), "decoder_norm.bias": (dim,),
      "decoder_pred.weight": (out_dim, dim), "decoder_pred.bias": (out_dim,),
  }
  for i in range(count_blocks(state_dict, "decoder_blocks")):
    shapes.update(block_shapes(f"decoder_blocks.{i}", dim, hidden, layer_scale=False))
  return shapes


def _split(state_dict: Mapping):
  encoder = {key: value for key, value in state_dict.items() if not is_decoder_key(key)}
  decoder = {key: value for key, value in state_dict.items() if is_decoder_key(key)}
  return encoder, decoder


def decoder_to_params(state_dict: Mapping, *, target_grid: int | None = None,
                      source: str = "MAE decoder") -> dict:
  """MaskedAutoencoderViT decoder keys -> our MAEDecoder params (decoder_pos_embed resized).

  `source` names the checkpoint in errors.
  """
  state_dict = {key: to_numpy(value) for key, value in state_dict.items()}
  check_state_dict(state_dict, decoder_shapes(state_dict, source), what=source)
  if target_grid is not None:
    state_dict["decoder_pos_embed"] = resample_pos_embed(state_dict["decoder_pos_embed"],
                                                         target_grid)
  return state_dict_to_params(state_dict)


def mae_to_torch(params: Mapping) -> dict:
  """Pretraining params {'encoder', 'decoder', ...} -> MaskedAutoencoderViT state dict (numpy).

  Only the encoder and decoder exist in MaskedAutoencoderViT; other entries (SJ-MAE's jigsaw and
  contrastive heads, ...) are left out.
  """
  for part in ("encoder", "decoder"):
    if part not in params:
      raise ValueError(f"MAE export needs params['{part}']; got entries {sorted(params)}")
  state_dict = encoder_to_timm(params["encoder"])
  if "norm.weight" not in state_dict:
    raise ValueError("MAE export: the encoder has no final 'norm', which MaskedAutoencoderViT has")
  if any(key.endswith(".ls1.gamma") for key in state_dict):
    raise ValueError("MAE export: the encoder has LayerScale (ls1/ls2), which MaskedAutoencoderViT "
                     "has not; export it in timm format instead")
  decoder = params_to_state_dict(params["decoder"])
  mask_token_shape = tuple(decoder["mask_token"].shape) if "mask_token" in decoder else None
  if mask_token_shape is not None and mask_token_shape[1:2] != (1,):
    raise ValueError(f"MAE export: decoder mask_token has shape {mask_token_shape}, one token per "
                     "removed slot (mask_token_mode='per_slot'); MaskedAutoencoderViT has a single "
                     "shared token of shape (1, 1, D)")
  check_state_dict(decoder, decoder_shapes(decoder, "decoder params"), what="decoder params")
  state_dict.update(decoder)
  return state_dict


def torch_mae_to_params(state_dict: Mapping, *, target_grid: int | None = None) -> dict:
  """MaskedAutoencoderViT state dict -> {'encoder': ..., 'decoder': ...}.

  The released pretrained checkpoints hold the encoder only; then there is no 'decoder' entry.
  target_grid resizes pos_embed and decoder_pos_embed when the patch grid differs.
  """
  encoder, decoder = _split(state_dict)
  params = {"encoder": timm_to_encoder(encoder, target_grid=target_grid)}
  if decoder:
    params["decoder"] = decoder_to_params(decoder, target_grid=target_grid)
  return params


def mae_model_args(state_dict: Mapping, *, num_heads: int,
                   decoder_num_heads: int) -> tuple[str | None, dict]:
  """(reference factory name or None, MaskedAutoencoderViT kwargs) for a `mae_to_torch` dict."""
  geometry = encoder_geometry(state_dict, "MAE state dict")
  decoder_dim = int(state_dict["decoder_embed.weight"].shape[0])
  kwargs = dict(
      img_size=geometry["img_size"], patch_size=geometry["patch_size"],
      in_chans=geometry["in_chans"], embed_dim=geometry["embed_dim"], depth=geometry["depth"],
      num_heads=num_heads, decoder_embed_dim=decoder_dim,
      decoder_depth=count_blocks(state_dict, "decoder_blocks"),
      decoder_num_heads=decoder_num_heads, mlp_ratio=geometry["hidden"] / geometry["embed_dim"])
  architecture = (kwargs["embed_dim"], kwargs["depth"], num_heads, kwargs["patch_size"])
  standard_decoder = (decoder_dim, kwargs["decoder_depth"], decoder_num_heads) == (512, 8, 16)
  names = [name for name, sizes in MAE_MODELS.items() if sizes == architecture]
  return (names[0] if names and standard_decoder else None), kwargs
