r"""MedDINOv3 domain-adaptive pretraining (DINO + iBOT + KoLeo, optional Gram anchoring) on CT.

  mfjax pretrain --config configs/pretrain.py --config.data.folders=/data/ct/imagesTr --workdir runs/pretrain
  mfjax pretrain --config configs/pretrain.py:tiny=true --config.data.folders=DIR --workdir runs/tiny

Arguments (after the colon): model, batch, epochs, epoch_length, lr, seed, global_size,
local_size, n_local, tiny; every field below can also be set with --config.<path>=<value>.
`data.folders` is one folder of *.nii.gz / *.nii CT volumes, or several separated by commas.

Defaults are DINOv3's `vitl_im1k_lin834.yaml` recipe (MedDINOv3's stated Stage-1 base) on the
released MedDINOv3 ViT-B/16 architecture: 2 global crops at 224 and 8 local at 96, heads
65536/256/2048, Sinkhorn-Knopp centering, AdamW (0.9, 0.999) at 4e-3 * sqrt(batch / 1024) with
10 warmup epochs then cosine to 1e-6, weight decay cosine 0.04 -> 0.4, layer-wise LR decay 0.9,
patch-embed LR x0.2, clip 3.0, teacher momentum cosine 0.992 -> 1, teacher temperature
0.04 -> 0.07 over 30 epochs, drop path 0.3, 100 epochs of 1250 iterations, batch 512.
Gram anchoring is off (gram.weight = 0). Stages 2 (Gram anchoring) and 3 (high resolution) are
further runs: model.init_from_run continues an earlier run's EMA teacher, heads included;
gram.checkpoint names an exported backbone (export_every_steps keeps intermediate ones);
gram.refresh_every, loss.local_weight_schedule, gram.weight_schedule and data.mixed_sizes carry
DINOv3's other stage settings. The README's "Pretrain" section gives the commands.

tiny=true keeps every code path at toy size (width 32, 2 blocks, 2 heads, 8-px patches,
32-px globals, 16-px locals, 64 prototypes): a few steps take seconds on a CPU.
"""
import ml_collections

from mfjax.config import parse_arg

ARGS = dict(model="meddinov3_vitb16", batch=512, epochs=100, epoch_length=1250, lr=4e-3, seed=0, global_size=224,
            local_size=96, n_local=8, tiny=False)
TINY_ARGS = dict(batch=4, epochs=2, epoch_length=2, global_size=32, local_size=16, n_local=2)
TINY_MODEL = dict(width=32, depth=2, heads=2, mlp_hidden=64, patch_size=8, native_resolution=(32, 32))


def weight_schedule(start: float = 0.0, peak: float = 0.0, end: float = 0.0, warmup_epochs: int = 0,
                    cosine_epochs: int = -1, enabled: bool = False) -> ml_collections.ConfigDict:
  """DINOv3's linear_warmup_cosine_decay of a loss weight: linear start -> peak over warmup_epochs,
  cosine peak -> end over cosine_epochs (-1: the rest of the run), then constant end."""
  return ml_collections.ConfigDict(dict(enabled=enabled, start=start, peak=peak, end=end,
                                        warmup_epochs=warmup_epochs, cosine_epochs=cosine_epochs))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = parse_arg(arg, **ARGS)
  if a.tiny:
    a = parse_arg(arg, **{**ARGS, **TINY_ARGS})
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.batch_size = a.batch
  c.epochs = a.epochs
  c.epoch_length = a.epoch_length    # iterations per "epoch" (DINOv2's OFFICIAL_EPOCH_LENGTH)

  c.model = ml_collections.ConfigDict()
  c.model.name = a.model             # any dinov3-family name of mfjax.models
  c.model.checkpoint = ""            # a converted model folder to start the backbone from; "" = random init
  c.model.init_from_run = ""         # a pretrain workdir: student and teacher (backbone and both heads) start
                                     # as its latest EMA teacher; step, optimizer and schedules start afresh
  c.model.drop_path = 0.3            # the student's; the teachers run without
  c.model.dtype = "float32"          # compute dtype (bfloat16 for speed); parameters stay float32
  c.model.matmul_precision = "highest"  # float32 matmuls as PyTorch's (XLA's GPU default: TF32); see README
  c.model.overrides = ml_collections.ConfigDict()  # any other constructor field of the model

  c.heads = ml_collections.ConfigDict()
  c.heads.dino_prototypes = 65536
  c.heads.ibot_prototypes = 65536
  c.heads.hidden_dim = 2048
  c.heads.bottleneck_dim = 256

  c.data = ml_collections.ConfigDict()
  c.data.folders = ""                # folder(s) of *.nii.gz / *.nii CT volumes, comma-separated
  c.data.global_size = a.global_size
  c.data.local_size = a.local_size
  c.data.n_local = a.n_local
  c.data.global_scale = (0.32, 1.0)
  c.data.local_scale = (0.05, 0.32)
  c.data.horizontal_flips = True     # False: no flips (DINOv3's ViT-7B Gram and high-resolution stages)
  c.data.pool_volumes = 16           # volumes held in memory; slices are drawn from these
  c.data.new_volumes_per_step = 1    # how many pool volumes are replaced after each step
  c.data.num_workers = 8             # threads cropping the batch's slices; 0 = the main thread
  c.data.mixed_sizes = ()            # high-resolution adaptation: ((global, local, gram, share), ...); each step
                                     # draws one (global, local, gram) size set with probability share / sum of
                                     # shares, in place of global_size, local_size and gram.crop_size

  c.masking = ml_collections.ConfigDict()
  c.masking.probability = 0.5        # share of global crops that are masked
  c.masking.ratio = (0.1, 0.5)
  c.masking.min_patches = 4
  c.masking.min_aspect = 0.3
  c.masking.max_fraction = 0.5       # of the crop's patches, per rectangle
  c.masking.group_crops = 0          # masks are collated per group of this many global crops (each group gets
                                     # DINOv3's spread of mask ratios); 0 = each device's crops, as DINOv3
                                     # per GPU. Set it to keep masks the same on any device count.

  c.loss = ml_collections.ConfigDict()
  c.loss.student_temp = 0.1
  c.loss.local_weight = 1.0          # DINO local-crop term ...
  c.loss.local_weight_schedule = weight_schedule()  # ... or, when enabled, this schedule of it
  c.loss.ibot_weight = 1.0
  c.loss.koleo_weight = 0.1          # times the sum over the two global crops
  c.loss.sinkhorn_iterations = 3
  c.loss.koleo_group_size = 0        # KoLeo over groups of this many images (DINOv3 computes it per GPU's
                                     # share, e.g. 64 for 512 on 8 GPUs); 0 = over the whole batch

  c.teacher = ml_collections.ConfigDict()
  c.teacher.momentum = 0.992
  c.teacher.final_momentum = 1.0
  c.teacher.warmup_temp = 0.04
  c.teacher.temp = 0.07
  c.teacher.temp_warmup_epochs = 30

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = a.lr             # lr = base_lr * sqrt(batch_size / 1024)
  c.optim.min_lr = 1e-6
  c.optim.warmup_epochs = 10
  c.optim.weight_decay = 0.04
  c.optim.final_weight_decay = 0.4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 3.0
  c.optim.layer_decay = 0.9
  c.optim.patch_embed_lr_mult = 0.2
  c.optim.freeze_last_layer_epochs = 1  # the heads' last layers have learning rate 0 this long

  c.gram = ml_collections.ConfigDict()
  c.gram.weight = 0.0                # > 0: Gram anchoring on, with this weight ...
  c.gram.weight_schedule = weight_schedule()  # ... or, when enabled, this schedule of it
  c.gram.checkpoint = ""             # converted model folder of the Gram teacher; "" = the EMA teacher ...
  c.gram.teacher_step = 0            # ... copied at this step; the Gram loss counts from this step on
  c.gram.crop_size = 0               # Gram teacher input size; 0 = the global crops themselves
  c.gram.distortions = True          # the Gram teacher sees the student's photometric draw (False: none)
  c.gram.img_level = True            # one Gram matrix per image (False: one over each device's crops, as DINOv3)
  c.gram.refresh_every = 0           # > 0: after every this many steps the EMA teacher replaces the Gram teacher ...
  c.gram.first_refresh = 0           # ... from this step on ...
  c.gram.max_refreshes = 0           # ... at most this many times (0: no limit); DINOv3's rep_update

  c.log_every_steps = 20
  c.checkpoint_every_steps = 1250
  c.export_every_steps = 0           # > 0: also export the EMA teacher's backbone to backbones/step_N this often

  if a.tiny:
    c.model.overrides = ml_collections.ConfigDict(TINY_MODEL)
    c.model.drop_path = 0.1
    c.heads.dino_prototypes = c.heads.ibot_prototypes = 64
    c.heads.hidden_dim = 32
    c.heads.bottleneck_dim = 16
    c.data.pool_volumes = 2
    c.data.num_workers = 2
    c.teacher.temp_warmup_epochs = 1
    c.optim.warmup_epochs = 1
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
  return c
