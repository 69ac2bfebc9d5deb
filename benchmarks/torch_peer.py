"""PyTorch peer of the MAE train step, timed on the same device; prints one JSON line.

  python benchmarks/torch_peer.py --peer timm --img 224 --patch 16 --embed-dim 768 --depth 12 \
      --heads 12 --batch 256 --dtype bfloat16
  python benchmarks/torch_peer.py --peer mae:/path/to/facebookresearch/mae ...
  python benchmarks/torch_peer.py --peer sjmae:/path/to/JulesCollenne/SJ-MAE ...

benchmarks/train_step.py runs it in a subprocess before JAX takes the accelerator's memory (and
so that torch never shares a process with TensorFlow). Peers:
  timm  the same MAE as sjmae_jax's (encoder on the visible 25%, decoder 512 x 8 on all tokens,
        norm-pix MSE on the removed patches) built from timm's PatchEmbed and Block, which use
        F.scaled_dot_product_attention;
  mae:DIR  facebookresearch/mae's own models_mae.MaskedAutoencoderViT imported from a clone the
        user made (never copied here). Two shims let its 2022 code run on current libraries:
        timm's Block no longer takes `qk_scale` (it was None there anyway) and NumPy >= 1.24 has
        no `np.float`;
  sjmae:DIR  the original SJ-MAE model, models/sj_mae.py's SJ_MAEViT from a clone of
        github.com/JulesCollenne/SJ-MAE in DIR (never copied here), on two views. Its forward()
        reads every loss term back to the host (`.item()`, a sync and a torch.compile graph
        break per term), so the peer composes the same terms from the model's own methods
        (forward_encoder / forward_decoder / forward_loss / forward_jigsaw / siam_predictor)
        without those reads; `munch`, imported for that bookkeeping only, is shimmed when absent.
One step: forward, backward, AdamW (betas 0.9/0.95, weight decay 0.05; fused kernel on CUDA).
On CUDA: bf16 autocast (AMP; --dtype bfloat16) or TF32 float32, and torch.compile. On CPU (the
smoke test): eager float32.
"""
import argparse
import functools
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--peer", default="timm", help="timm | mae:/path/to/facebookresearch/mae "
                      "| sjmae:/path/to/SJ-MAE")
  parser.add_argument("--img", type=int, default=224)
  parser.add_argument("--patch", type=int, default=16)
  parser.add_argument("--embed-dim", type=int, default=768)
  parser.add_argument("--depth", type=int, default=12)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--mlp-ratio", type=float, default=4.0)
  parser.add_argument("--decoder-dim", type=int, default=512)
  parser.add_argument("--decoder-depth", type=int, default=8)
  parser.add_argument("--decoder-heads", type=int, default=16)
  parser.add_argument("--mask-ratio", type=float, default=0.75)
  parser.add_argument("--mask-ratio-jigsaw", type=float, default=0.75, help="sjmae")
  parser.add_argument("--predictor-dim", type=int, default=512, help="sjmae")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
  parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                      help="torch.compile the model (auto: on CUDA only)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation)")
  parser.add_argument("--profile-steps", type=int, default=0,
                      help="after the timing, this many steps under torch.profiler")
  parser.add_argument("--profile-out", default="", metavar="CSV",
                      help="their kernels (device ops on CPU), grouped as "
                      "benchmarks/kernel_table.py groups ours; the result gets 'profile'")
  return parser.parse_args(argv)


def build_timm_mae(img, patch, embed_dim, depth, heads, mlp_ratio=4.0, decoder_dim=512,
                   decoder_depth=8, decoder_heads=16, mask_ratio=0.75):
  """MAE from timm parts; forward(images (B, 3, H, W)) -> the loss."""
  import torch
  from torch import nn
  from timm.models.vision_transformer import Block, PatchEmbed

  norm = functools.partial(nn.LayerNorm, eps=1e-6)

  class TimmMAE(nn.Module):

    def __init__(self):
      super().__init__()
      self.patch_size = patch
      self.patch_embed = PatchEmbed(img, patch, 3, embed_dim)
      patches = self.patch_embed.num_patches
      self.num_kept = int(patches * (1 - mask_ratio))
      # Position tables are fixed in MAE; their values do not change the timing, so zeros.
      self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
      self.pos_embed = nn.Parameter(torch.zeros(1, 1 + patches, embed_dim), requires_grad=False)
      self.blocks = nn.ModuleList([Block(embed_dim, heads, mlp_ratio, qkv_bias=True,
                                         norm_layer=norm) for _ in range(depth)])
      self.norm = norm(embed_dim)
      self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
      self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
      self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + patches, decoder_dim),
                                            requires_grad=False)
      self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, mlp_ratio,
                                                 qkv_bias=True, norm_layer=norm)
                                           for _ in range(decoder_depth)])
      self.decoder_norm = norm(decoder_dim)
      self.decoder_pred = nn.Linear(decoder_dim, patch * patch * 3)
      for module in self.modules():
        if isinstance(module, nn.Linear):
          nn.init.xavier_uniform_(module.weight)
          nn.init.zeros_(module.bias)
      nn.init.normal_(self.cls_token, std=0.02)
      nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, images):
      b, c, h, w = images.shape
      p = self.patch_size
      x = images.reshape(b, c, h // p, p, w // p, p)
      return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, images):
      x = self.patch_embed(images) + self.pos_embed[:, 1:]
      b, patches, width = x.shape
      ids_shuffle = torch.argsort(torch.rand(b, patches, device=x.device), dim=1)
      ids_restore = torch.argsort(ids_shuffle, dim=1)
      ids_keep = ids_shuffle[:, :self.num_kept]
      x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, width))
      cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
      x = torch.cat([cls, x], dim=1)
      for block in self.blocks:
        x = block(x)
      x = self.decoder_embed(self.norm(x))
      fill = self.mask_token.expand(b, patches - self.num_kept, -1)
      y = torch.cat([x[:, 1:], fill], dim=1)
      y = torch.gather(y, 1, ids_restore.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
      x = torch.cat([x[:, :1], y], dim=1) + self.decoder_pos_embed
      for block in self.decoder_blocks:
        x = block(x)
      pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]

      target = self.patchify(images)
      mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1e-6) ** 0.5
      mask = torch.ones(b, patches, device=x.device)
      mask[:, :self.num_kept] = 0
      mask = torch.gather(mask, 1, ids_restore)
      per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
      return (per_patch * mask).sum() / mask.sum()

  return TimmMAE()


def build_official_mae(path, args):
  """facebookresearch/mae's MaskedAutoencoderViT from a clone at `path`, wrapped so that
  forward(images) gives the loss."""
  import numpy as np
  from torch import nn
  if not os.path.isfile(os.path.join(path, "models_mae.py")):
    raise FileNotFoundError(f"no models_mae.py in {path} (clone "
                            "https://github.com/facebookresearch/mae there)")
  if not hasattr(np, "float"):
    np.float = float  # removed in NumPy 1.24; util/pos_embed.py still uses it
  sys.path.insert(0, os.path.abspath(path))
  import models_mae  # pylint: disable=import-outside-toplevel,import-error
  timm_block = models_mae.Block
  models_mae.Block = lambda *a, qk_scale=None, **kw: timm_block(*a, **kw)
  model = models_mae.MaskedAutoencoderViT(
      img_size=args.img, patch_size=args.patch, in_chans=3, embed_dim=args.embed_dim,
      depth=args.depth, num_heads=args.heads, decoder_embed_dim=args.decoder_dim,
      decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_heads,
      mlp_ratio=args.mlp_ratio, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
      norm_pix_loss=True)

  class LossOnly(nn.Module):

    def __init__(self):
      super().__init__()
      self.mae = model

    def forward(self, images):
      return self.mae(images, mask_ratio=args.mask_ratio)[0]

  return LossOnly()


def build_official_sjmae(path, args):
  """The original SJ-MAE's SJ_MAEViT from a clone at `path`, wrapped so that
  forward(view1, view2) gives the joint loss (weights 1/1/1, norm-pix targets, InfoNCE)."""
  import types  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(os.path.join(path, "models", "sj_mae.py")):
    raise FileNotFoundError(f"no models/sj_mae.py in {path} (clone "
                            "https://github.com/JulesCollenne/SJ-MAE there)")
  try:
    import munch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:  # only its loss bookkeeping uses it, which the wrapper below skips
    sys.modules["munch"] = types.SimpleNamespace(Munch=types.SimpleNamespace)
  sys.path.insert(0, os.path.abspath(path))
  from models.sj_mae import SJ_MAEViT  # pylint: disable=import-outside-toplevel,import-error
  model = SJ_MAEViT(
      img_size=args.img, patch_size=args.patch, in_chans=3, embed_dim=args.embed_dim,
      depth=args.depth, num_heads=args.heads, decoder_embed_dim=args.decoder_dim,
      decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_heads,
      mlp_ratio=args.mlp_ratio, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
      norm_pix_loss=True, w_mae=1.0, w_jigsaw=1.0, w_siam=1.0, mask_ratio_mae=args.mask_ratio,
      mask_ratio_jigsaw=args.mask_ratio_jigsaw, pred_dim=args.predictor_dim)

  class JointLoss(nn.Module):
    """SJ_MAEViT.forward's three terms, without its per-term `.item()` reads."""

    def __init__(self):
      super().__init__()
      self.sjmae = model

    def forward(self, view1, view2):
      m = self.sjmae
      latent, mask, ids_restore, _ = m.forward_encoder(view1, True, m.mask_ratio_mae)
      loss = m.forward_loss(view1, m.forward_decoder(latent, ids_restore), mask) * m.w_mae
      latent2, _, _, ids_keep2 = m.forward_encoder(view2, False, m.mask_ratio_jigsaw)
      loss = loss + F.cross_entropy(m.forward_jigsaw(latent2), ids_keep2.reshape(-1)) * m.w_jigsaw
      z1 = F.normalize(m.siam_predictor(latent[:, 0]), dim=1)
      z2 = F.normalize(m.siam_predictor(latent2[:, 0]), dim=1)
      logits = z1 @ z2.T / m.temperature
      labels = torch.arange(z1.shape[0], device=z1.device)
      return loss + F.cross_entropy(logits, labels) * m.w_siam

  return JointLoss()


def measure(args):
  import torch
  import timm

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch.manual_seed(0)
  if args.peer == "timm":
    model = build_timm_mae(args.img, args.patch, args.embed_dim, args.depth, args.heads,
                           args.mlp_ratio, args.decoder_dim, args.decoder_depth,
                           args.decoder_heads, args.mask_ratio)
  elif args.peer.startswith("mae:"):
    model = build_official_mae(args.peer[len("mae:"):], args)
  elif args.peer.startswith("sjmae:"):
    model = build_official_sjmae(args.peer[len("sjmae:"):], args)
  else:
    raise ValueError(f"--peer {args.peer!r}: expected timm, mae:/path/to/mae or "
                     "sjmae:/path/to/SJ-MAE")
  model = model.to(device).train()
  num_params = sum(p.numel() for p in model.parameters())
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                fused=cuda)
  use_amp = cuda and args.dtype == "bfloat16"
  compiled = args.compile == "on" or (args.compile == "auto" and cuda)
  if cuda:  # JAX's default float32 matmul precision on these GPUs is TF32 too
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  else:  # CPU runs are smoke tests: on a busy shared machine OpenMP's spinning threads made
    torch.set_num_threads(1)  # the tiny step ~100x slower than one thread
  forward = torch.compile(model) if compiled else model
  views = 2 if args.peer.startswith("sjmae:") else 1
  images = [torch.randn(args.batch, 3, args.img, args.img, device=device) for _ in range(views)]

  def train_step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
      loss = forward(*images)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  def sync():
    if cuda:
      torch.cuda.synchronize()

  start = time.perf_counter()
  for _ in range(args.warmup):
    loss = train_step()
  sync()
  warmup_seconds = time.perf_counter() - start
  seconds = []
  for _ in range(args.repeats):
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
      loss = train_step()
    sync()
    seconds.append(time.perf_counter() - start)
  step_seconds = statistics.median(seconds) / args.steps
  profile = profile_kernels(train_step, sync, args) if args.profile_steps else None
  result = {
      "peer": args.peer.split(":")[0],
      "device": torch.cuda.get_device_name() if cuda else "cpu",
      "images_per_second": args.batch / step_seconds, "step_ms": 1e3 * step_seconds,
      "step_ms_all": [1e3 * s / args.steps for s in seconds], "warmup_s": warmup_seconds,
      "loss": loss.item(), "params": num_params, "amp_bf16": use_amp, "compiled": compiled,
      "torch": torch.__version__, "timm": timm.__version__}
  if profile:
    result["profile"] = profile
  return result


def profile_kernels(train_step, sync, args) -> dict:
  """`args.profile_steps` steps under torch.profiler: the kernels on CUDA (the ops' own time on
  a CPU), one CSV row each (name, kind, calls and ms per step) in args.profile_out; returns
  {kind: ms per step} with 'gaps' (CUDA: the traced span with no kernel running)."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import kernel_table  # pylint: disable=import-outside-toplevel
  cuda = torch.cuda.is_available()
  activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
  sync()
  with profile(activities=activities) as prof:
    for _ in range(args.profile_steps):
      train_step()
    sync()
  steps = args.profile_steps
  rows = []
  for event in prof.key_averages():
    on_device = str(getattr(event, "device_type", "")).endswith("CUDA")
    if cuda != on_device:
      continue
    us = (getattr(event, "self_device_time_total", None) or
          getattr(event, "self_cuda_time_total", 0)) if cuda else event.self_cpu_time_total
    if us > 0:
      rows.append((event.key, kernel_table.kind_of_kernel_name(event.key), event.count / steps,
                   us / 1e3 / steps))
  rows.sort(key=lambda row: -row[3])
  kinds = {}
  for _, kind, _, ms in rows:
    kinds[kind] = kinds.get(kind, 0.0) + ms
  if cuda:
    kernels = [kernel_table.KernelEvent(e.name, "", "", e.time_range.start * 1e3,
                                        (e.time_range.end - e.time_range.start) * 1e3)
               for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    busy, span = kernel_table.busy_and_span_ns(kernels)
    kinds["gaps"] = max(0.0, span - busy) / 1e6 / steps
  if args.profile_out:
    import csv  # pylint: disable=import-outside-toplevel
    with open(args.profile_out, "w", newline="", encoding="utf-8") as f:
      writer = csv.writer(f)
      writer.writerow(["kernel", "kind", "calls_per_step", "ms_per_step"])
      writer.writerows([name, kind, f"{calls:g}", f"{ms:.4f}"] for name, kind, calls, ms in rows)
  return {"device": "cuda" if cuda else "cpu (op self times)", "kinds": kinds,
          "top": [list(row) for row in rows[:30]]}


def main(argv=None):
  args = parse_args(argv)
  try:
    result = measure(args)
  except (FileNotFoundError, ImportError) as e:  # no clone / no torch: skip with the reason
    result = {"peer": args.peer.split(":")[0], "skipped": f"{type(e).__name__}: {e}"}
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
