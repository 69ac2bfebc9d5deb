"""Export a trained run's weights for PyTorch: a safetensors state dict plus a JSON sidecar.

  python -m sjmae_jax.export --workdir DIR --out FILE.safetensors [--timm-name NAME]
      [--format timm|mae] [--global-pool token|avg] [--decoder-num-heads N]

--format timm (default): the encoder as a timm VisionTransformer, or, for a fine-tuned classifier
  run (params with a 'head'), the classifier with its head. FILE.json holds
  {"format": "timm", "timm_name": ..., "timm_kwargs": {...}} so that
      model = timm.create_model(info["timm_name"], pretrained=False, **info["timm_kwargs"])
      model.load_state_dict(safetensors.torch.load_file(FILE), strict=True)
  works without other code.
--format mae: encoder + decoder with facebookresearch/mae MaskedAutoencoderViT key names; FILE.json
  holds {"format": "mae", "mae_model": <models_mae factory name or null>, "mae_kwargs": {...},
  "norm_eps": 1e-6}, so that
      model = MaskedAutoencoderViT(**info["mae_kwargs"],
                                   norm_layer=functools.partial(nn.LayerNorm, eps=info["norm_eps"]))
  is exact at any size (MaskedAutoencoderViT's default norm_layer has eps 1e-5).
Writing needs no torch. --workdir and --out may be gs:// paths.
"""
import argparse
import sys
from collections.abc import Mapping

from etils import epath

from sjmae_jax import paths
from sjmae_jax.interop import mae as mae_interop
from sjmae_jax.interop import timm as timm_interop
from sjmae_jax.interop.io import save_state_dict, sidecar_path


def export_params(params: Mapping, out_path, *, num_heads: int, export_format: str = "timm",
                  timm_name: str | None = None, global_pool: str | None = None,
                  decoder_num_heads: int | None = None) -> dict:
  """Write `params` to out_path (safetensors) and its JSON sidecar; returns the JSON's content.

  params: a pretraining tree {'encoder', 'decoder'?, ...} or a ViTClassifier tree
    {'encoder', 'fc_norm'?, 'head'}.
  """
  if "encoder" not in params:
    raise ValueError(f"expected params with an 'encoder' entry, got {sorted(params)}")
  is_classifier = "head" in params
  if export_format == "timm":
    if is_classifier:
      state_dict = timm_interop.classifier_to_timm(params, num_heads=num_heads)
    else:
      state_dict = timm_interop.encoder_to_timm(params["encoder"], num_heads=num_heads)
    name, kwargs = timm_interop.timm_model_args(state_dict, num_heads=num_heads,
                                                timm_name=timm_name, global_pool=global_pool)
    info = {"format": "timm", "timm_name": name, "timm_kwargs": kwargs}
  elif export_format == "mae":
    if is_classifier:
      raise ValueError("--format mae needs pretraining params with a decoder; this is a classifier")
    if decoder_num_heads is None:
      raise ValueError("--format mae needs the decoder's number of heads (--decoder-num-heads)")
    state_dict = mae_interop.mae_to_torch(params)
    name, kwargs = mae_interop.mae_model_args(state_dict, num_heads=num_heads,
                                              decoder_num_heads=decoder_num_heads)
    info = {"format": "mae", "mae_model": name, "mae_kwargs": kwargs,
            "norm_eps": mae_interop.NORM_EPS}
  else:
    raise ValueError(f"unknown export format {export_format!r}; expected 'timm' or 'mae'")
  epath.Path(out_path).parent.mkdir(parents=True, exist_ok=True)
  save_state_dict(state_dict, out_path, info=info)
  return info


def _config_decoder_heads(config):
  decoder = config.get("decoder")
  return decoder.get("num_heads") if decoder is not None else None


def main(argv=None) -> int:
  """`python -m sjmae_jax.export` / `sjmae-export`; relative paths are taken from the current
  directory. Exit status 2 with one `error:` line for a missing workdir or checkpoint."""
  parser = argparse.ArgumentParser(prog="python -m sjmae_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="run directory with a saved checkpoint")
  parser.add_argument("--out", required=True, help="output FILE.safetensors (FILE.json beside it)")
  parser.add_argument("--format", dest="export_format", choices=("timm", "mae"), default="timm")
  parser.add_argument("--timm-name", default=None,
                      help="timm model name to record (default: derived from the architecture)")
  parser.add_argument("--global-pool", choices=("token", "avg"), default=None,
                      help="pooling recorded for a bare encoder (default token); classifiers keep "
                           "their own")
  parser.add_argument("--decoder-num-heads", type=int, default=None,
                      help="decoder heads for --format mae (default: the run's config.decoder)")
  args = parser.parse_args(argv)
  if not args.out.endswith(".safetensors"):
    parser.error("--out must end with .safetensors")
  workdir, out = paths.absolute(args.workdir), paths.absolute(args.out)

  from sjmae_jax.checkpointing import load_params
  from sjmae_jax.models.vit import vit_kwargs

  try:
    params, config = load_params(workdir)
    num_heads = vit_kwargs(config.model)["num_heads"]
    decoder_num_heads = args.decoder_num_heads or _config_decoder_heads(config)
    info = export_params(params, out, num_heads=num_heads, export_format=args.export_format,
                         timm_name=args.timm_name, global_pool=args.global_pool,
                         decoder_num_heads=decoder_num_heads)
  except (ValueError, OSError) as e:  # FileNotFoundError: no workdir / checkpoint
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {paths.shown(out)} and {paths.shown(sidecar_path(out))}: {info}")
  return 0


def cli_main():
  """`python -m sjmae_jax.export` / `sjmae-export`: main() with the programs' quiet console (the
  libraries' INFO and warnings hidden: Orbax opening a checkpoint to read it says "Given
  directory is read only"). main() itself changes no logging, for callers in process."""
  from sjmae_jax import console
  console.quiet_logs()
  sys.exit(main())


if __name__ == "__main__":
  cli_main()
