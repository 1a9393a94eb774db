r"""MedDINOv3 2-D segmentation on an nnU-Net raw dataset (MedDINOv3's nnU-Net recipe).

  mfjax segment --config configs/segment.py:raw=nnUNet_raw/Dataset219_AMOS2022_postChallenge_task2,fold=0 \
      --config.model.checkpoint=ckpt/meddinov3_vitb16 --workdir runs/amos_fold0

Arguments (after the colon): raw, model, fold, patch, spacing, batch, epochs, iters, seed, tiny;
every field below can also be set with --config.<path>=<value>. The recipe: AdamW (0.9, 0.98),
decoder lr 3e-4, backbone lr 3e-5 (MedDINOv3 weights; 1e-4 for the original DINOv3's), weight
decay 0.05 on everything, poly decay (1 - epoch / epochs)^1 stepped per epoch, gradient clipping
at 12, Dice + cross-entropy, 1000 epochs x 250 iterations, a third of each batch centred on
foreground. `spacing` finer than the data's upsamples in-plane: MedDINOv3's 2d_896 trick is
patch=896 with spacing = the median spacing x (its plan's patch / 896).
`tiny=true`: a 4-block width-32 DINOv3 on 32-px patches, for smoke tests (seconds per epoch).
"""
import ml_collections

from mfjax.config import parse_arg

TINY_BACKBONE = dict(width=32, depth=4, heads=2, mlp_hidden=64, patch_size=8)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  defaults = dict(raw="", model="meddinov3_vitb16", fold="0", patch=512, spacing=0.0, batch=8, epochs=1000,
                  iters=250, seed=0, tiny=False)
  if parse_arg(arg, **defaults).tiny:
    defaults.update(patch=32, epochs=2, iters=10)
  a = parse_arg(arg, **defaults)
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.epochs = a.epochs
  c.iters_per_epoch = a.iters
  c.batch_size = a.batch
  c.checkpoint_every_epochs = 1

  c.data = ml_collections.ConfigDict()
  c.data.raw = a.raw                 # the nnU-Net raw dataset folder (dataset.json, imagesTr, labelsTr)
  c.data.preprocessed = ""           # "" = WORKDIR/preprocessed; share one folder between runs
  c.data.fold = a.fold               # 0..4 (nnU-Net's 5-fold split or the dataset's splits_final.json) | all
  c.data.patch = a.patch             # square training / sliding-window patch, pixels
  c.data.spacing = a.spacing         # in-plane target spacing in mm; 0 = the median of the training cases
  c.data.foreground_fraction = 0.33  # nnU-Net's oversample_foreground_percent
  c.data.augment = True
  c.data.num_workers = 8             # threads cutting and augmenting each batch's patches (0: one)

  c.model = ml_collections.ConfigDict()
  c.model.name = a.model             # a DINOv3-family backbone (dinov3_vitb16, meddinov3_vitb16, ...)
  c.model.checkpoint = ""            # a converted backbone folder (python -m convert dinov3 ...); "" = random
  c.model.interaction_indices = (2, 5, 8, 11)  # blocks whose final-normed tokens feed the decoder
  c.model.dtype = "float32"          # compute dtype (bfloat16 for speed); parameters stay float32
  c.model.matmul_precision = "highest"  # float32 matmuls as PyTorch's (XLA's GPU default: TF32); see README
  c.model.remat = False
  c.model.drop_path = 0.0
  c.model.overrides = ml_collections.ConfigDict()

  c.optim = ml_collections.ConfigDict()
  c.optim.lr_decoder = 3e-4
  c.optim.lr_backbone = 3e-5
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 12.0
  c.optim.poly_exponent = 1.0

  c.eval = ml_collections.ConfigDict()
  c.eval.mirror = True               # average logits over the flips of each tile
  c.eval.step = 0.5                  # sliding-window step, a fraction of the patch
  c.eval.batch_size = 8
  c.eval.save_predictions = True     # WORKDIR/validation/CASE.nii.gz
  c.eval.save_probabilities = False  # and CASE.npz + CASE.pkl beside them, as nnU-Net's --npz
  c.eval.probabilities_reader = "SimpleITKIO"  # whose array order: the nnU-Net models' reader
  c.eval.surface_metrics = True      # HD95 and NSD (MONAI's definitions) besides Dice
  c.eval.nsd_tolerance_mm = 1.0

  c.log_every_steps = 50

  if a.tiny:
    c.model.overrides = ml_collections.ConfigDict(TINY_BACKBONE)
    c.model.interaction_indices = (0, 1, 2, 3)
    c.eval.mirror = False
    c.log_every_steps = 1
  return c
