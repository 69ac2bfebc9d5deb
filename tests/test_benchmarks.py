"""benchmarks/: the analytic FLOP count (MAE ViT-B/16 = 58.7 GFLOP/img, and XLA's count of the
compiled step), the PyTorch peer's model, BENCHMARKS.md appending, the fast-path options added to
the ViT, and CPU smoke runs of train_step.py. The smoke runs check that the script runs and
prints its table; there are no timing assertions."""
import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import flops, train_step
from helpers import REPO, load_config, tiny_config
from sjmae_jax import trainer
from sjmae_jax.models import vit


def run_script(*args, timeout=1200):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_step.py"), *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "FAILED" not in result.stdout
  return result.stdout


def table_rows(stdout: str) -> list:
  """The cells of each row of the printed table (after its header and rule)."""
  lines = stdout.splitlines()
  header = lines.index(train_step.TABLE_HEADER)
  assert lines[header + 1] == train_step.TABLE_RULE
  rows = []
  for line in lines[header + 2:]:
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in line.strip("|").split("|")])
  return rows


def xla_over_analytic(stdout: str, label: str) -> float:
  line = next(line for line in stdout.splitlines() if line.startswith(label + " "))
  return float(re.search(r"XLA/analytic ([0-9.]+)", line).group(1))


# ----------------------------------------------------------------------------- FLOPs

def test_mae_vit_b16_is_58_7_gflop_per_image():
  config = load_config("mae", "model=vit_base,data=cifar10,img=224")
  parts = flops.forward_macs_per_image(config, batch_size=256)
  # Encoder: 196 patches embedded (768 x 768), 12 blocks on 1 + 49 tokens.
  block = lambda tokens, dim: tokens * 12 * dim * dim + 2 * tokens * tokens * dim
  assert parts["encoder"] == 196 * 768 * 768 + 12 * block(50, 768)
  # Decoder: embed 50 tokens 768 -> 512, 8 blocks on 197 tokens, predict 196 x 768 pixels.
  assert parts["decoder"] == 50 * 768 * 512 + 8 * block(197, 512) + 196 * 512 * 768
  assert flops.train_flops_per_image(config, 256) / 1e9 == pytest.approx(58.7, abs=0.05)


def test_sjmae_flops_are_mae_plus_the_second_pass_and_heads():
  mae = load_config("mae", "model=vit_base,data=cifar10,img=224")
  sjmae = load_config("sjmae", "model=vit_base,data=cifar10,img=224")
  parts = flops.forward_macs_per_image(sjmae, batch_size=256)
  mae_parts = flops.forward_macs_per_image(mae, batch_size=256)
  assert parts["encoder pass 1"] == parts["encoder pass 2"] == mae_parts["encoder"]
  assert parts["decoder"] == mae_parts["decoder"]
  assert parts["jigsaw head"] == 49 * (2 * 768 * 768 + 768 * 196)
  assert parts["contrastive logits"] == 256 * 768  # B x B x D per batch
  assert flops.train_flops_per_image(sjmae, 256) / flops.train_flops_per_image(mae, 256) == (
      pytest.approx(1.458, abs=0.002))
  # With the extra terms off SJ-MAE is MAE, FLOP for FLOP.
  sjmae.sjmae.w_jigsaw = sjmae.sjmae.w_con = 0.0
  assert flops.train_flops_per_image(sjmae, 256) == flops.train_flops_per_image(mae, 256)


def test_peak_table_and_mfu():
  assert flops.bf16_peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
  assert flops.bf16_peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
  assert flops.bf16_peak_flops("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
  assert flops.bf16_peak_flops("TPU v5 lite") == pytest.approx(197e12)
  assert flops.bf16_peak_flops("cpu") is None
  assert flops.mfu_percent(58.7e9, 7500, "cpu") is None
  assert flops.mfu_percent(58.7e9, 7500, "NVIDIA H100 80GB HBM3") == pytest.approx(44.5, abs=0.1)
  assert flops.mfu_percent(58.7e9, 15000, "NVIDIA H100 80GB HBM3", num_devices=2) == (
      pytest.approx(44.5, abs=0.1))


def _lowered_step(config):
  """The train step lowered to StableHLO from abstract shapes (no compile, no init)."""
  from sjmae_jax import optim, sharding
  model = trainer.build_model(config)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch=10)
  mesh = sharding.make_mesh(config.mesh)
  state = trainer.abstract_train_state(config)
  batch = jax.eval_shape(lambda: trainer.sample_batch(config, config.batch_size))
  step = trainer.make_train_step(model, tx, schedule, mesh,
                                 kernel_dtype=trainer.kernel_cast_dtype(config))
  return jax.jit(step).lower(state, batch)


@pytest.mark.parametrize("method", ["mae", "sjmae"])
def test_flops_from_the_lowered_dots_match_the_analytic_count(method):
  """The program's dots are the analytic count minus the patch embedding's input gradient,
  which the images do not need: exactly, for the forward and backward of every matmul. With
  gather_impl=permute only the kept patches are embedded, and the count says so."""
  from benchmarks import step_hlo
  config = train_step.build_config(method, "vit_micro", train_step.parse_args(["--smoke"]),
                                   train_step.Setup())
  encoder = vit.vit_kwargs(config.model)
  patches = (encoder["img_size"] // encoder["patch_size"]) ** 2
  patch_dim = encoder["patch_size"] ** 2 * encoder["in_chans"]
  passes = 2 if method == "sjmae" else 1
  input_gradient = passes * 2 * patches * patch_dim * encoder["embed_dim"]
  counted = step_hlo.dot_flops(_lowered_step(config).as_text())
  analytic = flops.train_flops_per_image(config, config.batch_size)
  assert sum(counted.values()) / config.batch_size == analytic - input_gradient
  assert counted["conv"] > 0 and "attention" not in counted  # XLA attention: plain dots

  config.model.gather_impl = "permute"  # embeds only the kept patches: a dot, no conv
  counted = step_hlo.dot_flops(_lowered_step(config).as_text())
  kept = int(patches * 0.25)
  embedding = passes * 4 * kept * patch_dim * encoder["embed_dim"]  # forward + weight gradient
  assert "conv" not in counted
  assert sum(counted.values()) / config.batch_size == (
      analytic - passes * 6 * patches * patch_dim * encoder["embed_dim"] + embedding)


def test_dot_flops_reads_dots_convolutions_and_cudnn_attention():
  from benchmarks import step_hlo
  lhs, rhs = jax.ShapeDtypeStruct((2, 3, 5), jnp.float32), jax.ShapeDtypeStruct((5, 7), jnp.float32)
  text = jax.jit(lambda a, b: a @ b).lower(lhs, rhs).as_text()
  assert step_hlo.dot_flops(text) == {"dot": 2 * 2 * 3 * 5 * 7}
  images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  kernel = jax.ShapeDtypeStruct((4, 4, 3, 16), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (4, 4), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  text = jax.jit(conv).lower(images, kernel).as_text()
  assert step_hlo.dot_flops(text) == {"conv": 2 * (2 * 2 * 2 * 16) * (4 * 4 * 3)}
  # cuDNN attention is a custom call in the lowered program: counted from q's and k's shapes
  fmha = ("%1 = stablehlo.custom_call @__cudnn$fmhaSoftmax(%q, %k, %v) : (tensor<2x50x12x64xbf16>,"
          " tensor<2x50x12x64xbf16>, tensor<2x50x12x64xbf16>) -> tensor<2x50x12x64xbf16>")
  forward = 4 * 2 * 12 * 50 * 50 * 64
  assert step_hlo.dot_flops(fmha) == {"attention": forward}
  assert step_hlo.dot_flops(fmha.replace("Softmax(", "SoftmaxBackward(")) == {
      "attention": 2 * forward}


def test_inventory_counts_kernels_casts_and_saved_residuals():
  from benchmarks import step_hlo
  x = jnp.ones((64, 256), jnp.float32)
  cast = step_hlo.inventory(jax.jit(lambda v: v.astype(jnp.bfloat16)).lower(x).compile())
  assert cast["converts"] >= 1 and cast["cast_kernels"] >= 1 and cast["kernels"] >= 1
  plain = step_hlo.inventory(jax.jit(lambda v: jnp.sin(v) * 2).lower(x).compile())
  assert plain["converts"] == 0 and plain["cast_kernels"] == 0
  assert plain["temp_bytes"] >= 0 and plain["argument_bytes"] == 64 * 256 * 4
  assert plain["scatters"] == plain["scatter_bytes"] == 0
  ids = jnp.argsort(jax.random.uniform(jax.random.PRNGKey(0), (64, 256)), axis=1)[:, :16]
  take_grad = jax.grad(lambda v, w: (jnp.take_along_axis(v, ids, axis=1) * w).sum())
  scatter = step_hlo.inventory(jax.jit(take_grad).lower(x, x[:, :16]).compile())  # scatter-add
  assert scatter["scatters"] >= 1 and scatter["scatter_bytes"] >= 64 * 256 * 4
  # sin's derivative cos(x) is what autodiff keeps: 64 x 256 float32
  assert step_hlo.residual_bytes(lambda v: jnp.sin(v).sum(), x) == 64 * 256 * 4
  assert step_hlo.residual_bytes(lambda v: (2 * v).sum(), x) == 0


# ----------------------------------------------------------------------------- PyTorch peer

def test_torch_peer_is_the_same_mae():
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from benchmarks import torch_peer
  config = tiny_config("mae", **{"model.embed_dim": 64, "model.num_heads": 4,
                                 "decoder.embed_dim": 32, "decoder.depth": 2,
                                 "decoder.num_heads": 2})
  config.model.img_size = config.data.img_size = 32
  config.model.patch_size = 8
  encoder = vit.vit_kwargs(config.model)
  ours = trainer.abstract_train_state(config)["params"]
  peer = torch_peer.build_timm_mae(32, 8, encoder["embed_dim"], encoder["depth"],
                                   encoder["num_heads"], decoder_dim=32, decoder_depth=2,
                                   decoder_heads=2)
  assert sum(p.numel() for p in peer.parameters()) == sum(
      int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(ours))
  loss = peer(torch.randn(4, 3, 32, 32))
  loss.backward()
  assert torch.isfinite(loss) and 0.5 < loss.item() < 5.0  # norm-pix MSE of an untrained model


# ----------------------------------------------------------------------------- BENCHMARKS.md

def test_append_puts_rows_in_the_train_step_table_only(tmp_path):
  path = tmp_path / "BENCHMARKS.md"
  before = ["## Input pipeline", "", "| case | images/s |", "|---|---:|", "| (a) | 3,589 |", ""]
  section = [train_step.SECTION_TITLE, "", "intro", "", train_step.TABLE_HEADER,
             train_step.TABLE_RULE, "| old row |", "", "Runs (versions and command):",
             "- old run", "", "notes", "", "## Later section", "| other | table |", ""]
  path.write_text("\n".join(before + section))
  train_step.append_to_benchmarks(str(path), ["| new 1 |", "| new 2 |"], "- new run")
  lines = path.read_text().split("\n")
  assert lines[:len(before)] == before
  table = lines.index(train_step.TABLE_HEADER)
  assert lines[table + 2:table + 6] == ["| old row |", "| new 1 |", "| new 2 |", ""]
  runs = lines.index("- old run")
  assert lines[runs + 1] == "- new run" and lines[runs + 2] == ""
  assert lines[-3:] == ["## Later section", "| other | table |", ""]

  path.write_text("\n".join(before))
  with pytest.raises(ValueError, match="no '## Train step' section"):
    train_step.append_to_benchmarks(str(path), ["| row |"], "- run")


# ----------------------------------------------------------------------------- levers / ViT

def test_lever_setups_and_configs():
  base = train_step.Setup()
  cpu = train_step.lever_setups(base, "sjmae", list(train_step.LEVERS), "cpu",
                                flag_sets=["--a=1", "--b=2"])
  tags = [setup.tags("sjmae") if setup else skipped for setup, skipped in cpu]
  assert tags[0] == ["dtype=float32"]
  assert "cuDNN needs a CUDA GPU" in tags[1]
  assert tags[2:] == [["remat=full"], [f"remat={train_step.REMAT_POLICY_LEVER}"],
                      ["donate=off"], ["batch_passes=off"], ["norm_impl=fused"],
                      ["gelu_impl=fused"], ["gelu_approximate=on"], ["gather_impl=permute"],
                      ["cast_params_once=on"], ["qkv_impl=split"], ["norm_impl=pallas"],
                      ["gelu_impl=pallas"], ["optim_flatten=on"], ["xla_flags=--a=1"],
                      ["xla_flags=--b=2"],
                      ["batch x2"]]
  gpu = train_step.lever_setups(base, "mae", ["attention", "batch_passes"], "gpu")
  assert [setup.tags("mae") for setup, _ in gpu] == [["attention=xla"]]  # no SJ-MAE lever
  fast = dataclasses.replace(base, norm_impl="fused")  # a lever switches back from its fast value
  assert train_step.lever_setups(fast, "mae", ["norm_impl"], "cpu")[0][0].norm_impl == "flax"
  pallas = dataclasses.replace(base, norm_impl="pallas")
  assert train_step.lever_setups(pallas, "mae", ["norm_pallas"], "cpu")[0][0].norm_impl == "flax"

  args = train_step.parse_args(["--smoke", "--method", "sjmae"])
  setup = train_step.Setup(dtype="float32", attention="xla", remat="dots_saveable",
                           batch_passes=False, norm_impl="pallas", gather_impl="permute",
                           cast_params_once=True, qkv_impl="split", optim_flatten=True,
                           batch_scale=2)
  config = train_step.build_config("sjmae", "vit_micro", args, setup)
  assert (config.compute_dtype, config.model.attention_impl, config.model.remat,
          config.model.remat_policy, config.sjmae.batch_passes) == (
              "float32", "xla", True, "dots_saveable", False)
  assert (config.model.norm_impl, config.model.gelu_impl, config.model.gather_impl,
          config.model.cast_params_once, config.model.qkv_impl, config.optim.flatten) == (
              "pallas", "flax", "permute", True, "split", True)
  assert (config.model.depth, config.decoder.embed_dim, config.batch_size) == (2, 128, 16)
  assert train_step.model_label(config, "vit_micro") == "vit_128x2_dec128x1_patch4"
  standard = train_step.build_config("mae", "vit_base", train_step.parse_args([]), base)
  assert train_step.model_label(standard, "vit_base") == "vit_base_patch16"
  # a child process given setup_argv measures the same setup
  child = train_step.parse_args(["--smoke"] + train_step.setup_argv(setup))
  assert child.setup == dataclasses.replace(setup, batch_scale=1)
  assert train_step.parse_args(["--fast"]).setup == dataclasses.replace(
      base, norm_impl="fused", gelu_impl="fused", gather_impl="permute", cast_params_once=True)


def test_best_combines_the_levers_that_gained():
  base = train_step.Setup()
  rows = [(dataclasses.replace(base, norm_impl="fused"), 110.0),
          (dataclasses.replace(base, gelu_impl="fused"), 101.0),  # under the 2 % bar
          (dataclasses.replace(base, gelu_approximate=True), 150.0),  # a different function
          (dataclasses.replace(base, xla_flags="--a=1"), 104.0),
          (dataclasses.replace(base, xla_flags="--b=2"), 105.0),
          (dataclasses.replace(base, attention="xla"), 90.0)]
  best, won = train_step.best_setup(base, 100.0, rows)
  assert best == dataclasses.replace(base, norm_impl="fused", xla_flags="--a=1 --b=2")
  assert won == ["norm_impl=fused", "xla_flags=--a=1 --b=2"]
  assert train_step.best_setup(base, 100.0, rows[1:3])[1] == []


def test_remat_policy_reaches_jax_checkpoint():
  config = tiny_config("mae")
  config.model.remat = True
  config.model.drop_path_rate = 0.1
  config.model.remat_policy = "dots_with_no_batch_dims_saveable"
  model = vit.VisionTransformer(**vit.vit_kwargs(config.model))
  images = jnp.zeros((1, config.model.img_size, config.model.img_size, 3))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  jaxpr = jax.make_jaxpr(model.apply)(params, images)
  policies = [eqn.params["policy"] for eqn in jaxpr.eqns if "policy" in eqn.params]  # remat
  assert policies == [jax.checkpoint_policies.dots_with_no_batch_dims_saveable] * 2  # 2 blocks

  def loss(params):  # train=True under remat: drop path's Python branch needs a static `train`
    tokens = model.apply(params, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    return tokens.sum()
  jax.make_jaxpr(jax.grad(loss))(params)

  config.model.remat = False  # same parameter tree, so checkpoints move between the two
  plain = vit.VisionTransformer(**vit.vit_kwargs(config.model))
  assert jax.tree.structure(jax.eval_shape(plain.init, jax.random.PRNGKey(0), images)) == (
      jax.tree.structure(params))

  with pytest.raises(ValueError, match="not a jax.checkpoint_policies name"):
    vit.remat_policy("dots_savable")
  config.model.remat_policy = "dots_savable"  # caught when the model is built, before compiling
  with pytest.raises(ValueError, match="dots_savable"):
    vit.vit_kwargs(config.model)
  config.model.remat_policy = ""
  config.model.attention_impl = "flash"
  with pytest.raises(ValueError, match="model.attention_impl: unknown value 'flash'"):
    vit.vit_kwargs(config.model)


def test_auto_attention_is_xla_off_gpu():
  q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 2, 8))
  auto = vit.dot_product_attention(q, k, v, implementation="auto")
  np.testing.assert_array_equal(auto, jax.nn.dot_product_attention(q, k, v, implementation="xla"))
  if jax.default_backend() != "gpu":
    with pytest.raises((NotImplementedError, RuntimeError)):  # what 'auto' falls back from
      jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


@pytest.mark.no_tf  # also runs in the virtualenv without TensorFlow (.ci/run)
def test_profile_summary_names_the_ops(tmp_path):
  from benchmarks import profile_ops

  @jax.jit
  def step(x):
    return jnp.tanh(x @ x) @ x

  x = jnp.ones((128, 128))
  step(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      x = step(x)
    x.block_until_ready()
  device, ops = profile_ops.top_ops(str(tmp_path), count=50)
  assert device in ("/host:CPU", "/device:GPU:0", "/device:TPU:0")
  assert ops and sum(share for _, _, share, _ in ops) == pytest.approx(1.0)
  assert all(ps > 0 for _, ps, _, _ in ops)
  assert "time by op on" in profile_ops.format_top_ops(str(tmp_path))


# ----------------------------------------------------------------------------- smoke runs

@pytest.mark.slow
def test_suite_speed_stage_smoke(tmp_path):
  """`SMOKE=1 bash benchmarks/gpu_suite.sh speed`: issue 16's one-call stage at tiny sizes on
  the CPU: peers (timm; the two clones absent here, so their rows say skipped), the base rows,
  every lever alone (the XLA flag sets each in a process of its own), the best combination, the
  op profiles, and the rows appended to $OUT/BENCHMARKS.md only."""
  pytest.importorskip("timm")
  out = tmp_path / "out"
  original = (REPO / "BENCHMARKS.md").read_text()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", SMOKE="1", OUT=str(out),
             CACHE_DIR=str(tmp_path / "cache"), MAE_DIR=str(tmp_path / "no_mae"),
             SJMAE_DIR=str(tmp_path / "no_sjmae"), PYTHON=sys.executable)
  result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "speed"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
  stdout = result.stdout
  assert result.returncode == 0, stdout[-3000:] + result.stderr[-3000:]
  assert "FAILED" not in stdout and "not run (past --deadline" not in stdout
  assert (out / "speed.log").read_text() == stdout
  assert (REPO / "BENCHMARKS.md").read_text() == original

  rows = table_rows(stdout)
  assert all(len(row) == len(train_step.COLUMNS) and row[1] == "cpu" for row in rows)
  by_label = {row[2]: row for row in rows}
  assert float(by_label["peer timm (mae)"][6].replace(",", "")) > 0
  assert by_label["peer mae (mae) (skipped)"][6] == ""
  assert "peer sjmae (sjmae) (skipped)" in by_label
  mae, sjmae = by_label["mae"], by_label["sjmae"]
  assert mae[3] == "vit_128x2_dec128x1_patch4" and mae[4:6] == ["32", "8"]
  assert mae[8] == "timm" and re.fullmatch(r"[0-9.]+x", mae[10]) and mae[7] == ""  # no CPU MFU
  assert sjmae[8] == "sjmae (skipped)"
  assert float(mae[11]) > 0 and float(mae[12]) > 0  # step ms, MiB/img
  levers = ["norm_impl=pallas", "gelu_impl=pallas", "qkv_impl=split", "optim_flatten=on",
            "gather_impl=permute", "norm_impl=fused", "gelu_impl=fused",
            *(f"xla_flags={flags}" for flags in train_step.XLA_FLAG_SETS),
            "cast_params_once=on", "gelu_approximate=on"]
  assert [label for label in by_label if label.startswith("mae [") and "best" not in label] == (
      [f"mae [{lever}]" for lever in levers] + ["mae [batch x2]"])
  assert by_label["mae [batch x2]"][5] == "16"
  assert "lever attention: auto is XLA's on cpu; cuDNN needs a CUDA GPU: skipped" in stdout
  best = re.search(r"^best mae vit_128x2_dec128x1_patch4: (.*)$", stdout, re.M).group(1)
  if best != "no lever gained >= 2 %":  # timing on a shared CPU decides which levers won
    assert f"mae [best: {best}]" in by_label and f"sjmae [best: {best}]" in by_label
  assert re.search(r"^sjmae/mae step time, vit_128x2_dec128x1_patch4: [0-9.]+x", stdout, re.M)
  # XLA counts the analytic matmuls plus the elementwise work and the optimizer (~8 % here in
  # bfloat16) minus the patch embedding's input gradient; the dots of the lowered program are
  # the analytic count minus that gradient.
  for label in ("mae", "sjmae"):
    line = next(line for line in stdout.splitlines() if line.startswith(label + " vit_"))
    assert 0.99 < xla_over_analytic(stdout, label) < 1.12, line
    assert 0.97 < float(re.search(r"dots/analytic ([0-9.]+)", line).group(1)) < 1.0, line

  summary = (out / "profile" / "summary.txt").read_text()
  assert "## mae_vit_128x2_dec128x1_patch4\n" in summary and "time by kind of op" in summary
  appended = (out / "BENCHMARKS.md").read_text()
  assert appended.startswith(original[:original.index(train_step.SECTION_TITLE)])
  assert "| " + " | ".join(mae) + " |" in appended.split("\n")
  assert re.search(r"^- \d{4}-\d\d-\d\d, cpu: Python .*, jax .*, torch .*: "
                   r"`python benchmarks/train_step.py --method mae,sjmae", appended, re.M)


@pytest.mark.no_tf  # also runs in the virtualenv without TensorFlow (.ci/run)
@pytest.mark.slow
def test_smoke_run_end_to_end_and_levers(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for name in ("airplane", "cat"):  # a 16-image CIFAR-shaped ImageFolder
    folder = tmp_path / "cifar" / "train" / name
    folder.mkdir(parents=True)
    for index in range(8):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
          folder / f"{index}.png")
  stdout = run_script("--smoke", "--method", "mae", "--levers", "attention", "--e2e", "cifar10",
                      "--cifar-dir", str(tmp_path / "cifar"), "--data-dir", str(tmp_path / "cache"))
  rows = table_rows(stdout)
  assert [row[2] for row in rows] == ["mae", "mae [e2e cifar10, views on host]",
                                      "mae [e2e cifar10, views on device]"]
  assert all(float(row[6].replace(",", "")) > 0 for row in rows)
  assert "lever attention: auto is XLA's on cpu; cuDNN needs a CUDA GPU: skipped" in stdout
  device_line = next(line for line in stdout.splitlines()
                     if line.startswith("mae [e2e cifar10, views on device]"))
  assert "XLA/analytic" in device_line and "loss" in device_line
