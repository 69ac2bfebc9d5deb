"""FLOPs of one MAE / SJ-MAE training step: analytic count, XLA's count, device peaks, MFU.

Convention (the one that gives MAE ViT-B/16 at 224 px = 58.7 GFLOP per image):
  forward MACs = the multiply-adds of every matmul of the forward pass;
  training FLOPs = 6 x forward MACs (2 FLOPs per MAC, and the backward pass costs twice the
  forward: gradients with respect to the inputs and to the weights).
Counted: the patch embedding of all L patches (MAE embeds every patch, then drops the masked
ones), every Linear, attention's QK^T and AV (2 T^2 D per block of T tokens), the decoder's
embedding and prediction layers; for SJ-MAE also its second encoder pass, the jigsaw head, the
predictor on both CLS tokens and the InfoNCE logits (B x B x D per batch, so B x D per image).
Not counted: elementwise work (norms, softmax, GELU, losses), masking (argsort, gathers) and the
optimizer update. XLA's own count (`xla_flops`) includes those, counts a MAC as 2 FLOPs too, and
skips the input gradient of the patch embedding (the images need none): on small models it is a
few per cent above the analytic count (see tests/test_benchmarks.py for the measured gap). On a
GPU XLA's count leaves out the cuBLAS / cuDNN custom calls its compiler makes of the products;
benchmarks/step_hlo.dot_flops counts from the dot shapes of the lowered program instead, which
equals the analytic count minus the patch embedding's input gradient.
"""
import re

from sjmae_jax.models.vit import vit_kwargs
from sjmae_jax.objectives.masking import num_kept

TRAIN_FLOPS_PER_FORWARD_MAC = 6

# Dense (no sparsity) bfloat16 peak of one device in TFLOP/s, from the vendors' data sheets.
# Matched against jax.devices()[0].device_kind; the first pattern found in it wins.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),       # SXM5, device_kind 'NVIDIA H100 80GB HBM3'
    ("H200 NVL", 835.0),
    ("H200", 989.4),       # SXM, and GH200
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
)


def bf16_peak_flops(device_kind: str):
  """Peak bf16 dense FLOP/s of a device, or None when the device is not in the table (CPU)."""
  for pattern, tflops in BF16_PEAK_TFLOPS:
    if re.search(re.escape(pattern), device_kind, re.IGNORECASE):
      return tflops * 1e12
  return None


def mfu_percent(flops_per_image: float, images_per_second: float, device_kind: str,
                num_devices: int = 1):
  peak = bf16_peak_flops(device_kind)
  if peak is None or not flops_per_image:
    return None
  return 100.0 * flops_per_image * images_per_second / (peak * num_devices)


def block_macs(tokens: int, dim: int, mlp_ratio: float) -> int:
  """One pre-norm transformer block on `tokens` tokens of width `dim`."""
  hidden = int(dim * mlp_ratio)
  linear = tokens * (3 * dim * dim + dim * dim + 2 * dim * hidden)  # qkv, proj, fc1, fc2
  attention = 2 * tokens * tokens * dim  # QK^T and AV, all heads together
  return linear + attention


def encoder_macs(encoder: dict, kept: int) -> int:
  """Patch embedding of every patch, then the blocks on the cls token + `kept` patches."""
  patches = (encoder["img_size"] // encoder["patch_size"]) ** 2
  patch_dim = encoder["patch_size"] ** 2 * encoder["in_chans"]
  embed = patches * patch_dim * encoder["embed_dim"]
  return embed + encoder["depth"] * block_macs(1 + kept, encoder["embed_dim"], encoder["mlp_ratio"])


def decoder_macs(encoder: dict, decoder, kept: int) -> int:
  """MAE decoder: embed the 1 + kept encoded tokens, blocks on all 1 + L, predict L patches."""
  patches = (encoder["img_size"] // encoder["patch_size"]) ** 2
  patch_dim = encoder["patch_size"] ** 2 * encoder["in_chans"]
  width = decoder.embed_dim
  embed = (1 + kept) * encoder["embed_dim"] * width
  blocks = decoder.depth * block_macs(1 + patches, width, decoder.get("mlp_ratio", 4.0))
  return embed + blocks + patches * width * patch_dim


def forward_macs_per_image(config, batch_size: int) -> dict:
  """Forward-pass MACs of one image of a `batch_size` batch, by part ({part: MACs})."""
  encoder = vit_kwargs(config.model)
  patches = (encoder["img_size"] // encoder["patch_size"]) ** 2
  dim = encoder["embed_dim"]
  if config.method == "mae":
    kept = num_kept(patches, config.mae.mask_ratio)
    return {"encoder": encoder_macs(encoder, kept),
            "decoder": decoder_macs(encoder, config.decoder, kept)}
  if config.method != "sjmae":
    raise ValueError(f"no FLOP count for method {config.method!r} (mae, sjmae)")

  cfg = config.sjmae
  terms = {"mae": cfg.w_mae > 0, "jigsaw": cfg.w_jigsaw > 0, "contrastive": cfg.w_con > 0}
  kept_recon = num_kept(patches, cfg.mask_ratio)
  kept_jigsaw = num_kept(patches, cfg.mask_ratio_jigsaw)
  parts = {}
  if terms["mae"] or terms["contrastive"]:
    parts["encoder pass 1"] = encoder_macs(encoder, kept_recon)
  if terms["jigsaw"] or terms["contrastive"]:
    parts["encoder pass 2"] = encoder_macs(encoder, kept_jigsaw)
  if terms["mae"]:
    parts["decoder"] = decoder_macs(encoder, config.decoder, kept_recon)
  if terms["jigsaw"]:  # Linear(D,D)-ReLU-Linear(D,D)-ReLU-Linear(D,L) on each kept patch token
    parts["jigsaw head"] = kept_jigsaw * (2 * dim * dim + dim * patches)
  if terms["contrastive"]:
    hidden = cfg.predictor_hidden_dim
    parts["predictor"] = 2 * (dim * hidden + hidden * dim)  # both CLS tokens
    logits_per_image = {"infonce": 1, "infonce_symmetric": 2, "simsiam": 0}[cfg.contrastive_loss]
    parts["contrastive logits"] = logits_per_image * batch_size * dim
  return parts


def train_flops_per_image(config, batch_size: int) -> float:
  """Training FLOPs per image: 6 x forward MACs (the module docstring has the convention)."""
  return TRAIN_FLOPS_PER_FORWARD_MAC * sum(forward_macs_per_image(config, batch_size).values())


def xla_flops(compiled):
  """FLOPs of a compiled computation by XLA's cost analysis (None when the backend gives none).

  On GPU, custom calls (cuDNN attention) are not counted."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device program
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])
