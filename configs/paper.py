r"""One cell of the paper's grid: model x dataset x protocol.

  mfjax train --config configs/paper.py:model=dinov2_vitb14,dataset=aptos2019,protocol=unfrozen_linear \
      --config.model.checkpoint=ckpt/dinov2_vitb14 --config.head.checkpoint=ckpt/deit_base_patch16 \
      --workdir runs/dinov2_aptos_unfrozen_linear

Arguments (after the colon): model, dataset, protocol, res, lr, seed, epochs, batch; every
field below can also be set with --config.<path>=<value>. The paper trains 100 epochs at batch 64
with AdamW (lr searched in [1e-5, 1e-3], weight decay 1e-5), linear warmup from 1e-8 (5 epochs
for APTOS/DDSM, 1000 steps for ISIC/CheXpert), gradient clipping at 1.0, and keeps the epoch with
the best validation metric. On one A100 a ViT-B cell takes a few hours.
"""
import ml_collections

from mfjax.config import parse_arg

# Per dataset: warmup as in the paper's classification.py.
WARMUP = {"aptos2019": {"epochs": 5}, "cbis_ddsm": {"epochs": 5}, "isic2019": {"steps": 1000},
          "chexpert": {"steps": 1000}}


# Protocols under which the foundation can run in training mode (decapitation when decapitation_trained).
TRAINED_PROTOCOLS = ("unfrozen_linear", "unfrozen_deit", "decapitation")


def paper_drop_path(model: str, protocol: str) -> float:
  """As the paper's code: SEEM's D2FocalNet has drop-path 0.3, which acts where the foundation trains."""
  return 0.3 if model == "seem_focalt" and protocol in TRAINED_PROTOCOLS else 0.0


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = parse_arg(arg, model="dinov2_vitb14", dataset="aptos2019", protocol="unfrozen_linear", res=224,
                lr=1e-4, seed=0, epochs=100, batch=64)
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.epochs = a.epochs
  c.batch_size = a.batch

  c.model = ml_collections.ConfigDict()
  c.model.name = a.model
  c.model.checkpoint = ""          # a folder written by `python -m convert`; "" = random init
  c.model.dtype = "float32"        # compute dtype (bfloat16 for speed); parameters stay float32
  c.model.matmul_precision = "highest"  # float32 matmuls as PyTorch's (XLA's GPU default: TF32); see README
  c.model.remat = False
  c.model.drop_path = paper_drop_path(a.model, a.protocol)
  c.model.overrides = ml_collections.ConfigDict()  # any other constructor field of the model
  # SAM and OpenCLIP: position tables resized once at load and trained at the run's resolution, as
  # the paper's code does (mfjax.train.build.RESIZED_AT_LOAD); False: resized at every forward.
  c.model.resize_at_load = True
  # Foundation parameters the classifier never uses (SAM's neck) stay frozen and uncounted; False trains
  # them as mfjax did before (2026-12-07): a run started then resumes so.
  c.model.freeze_unused = True

  c.head = ml_collections.ConfigDict()
  c.head.checkpoint = ""           # converted DeiT-B folder for the stacked classifier; "" = random
  c.head.drop_path = 0.0
  c.head.overrides = ml_collections.ConfigDict()  # e.g. a smaller stacked head: width, depth, heads

  c.protocol = ml_collections.ConfigDict()
  c.protocol.name = a.protocol
  c.protocol.head = "linear"       # for progressive: linear or deit
  c.protocol.unfreeze_from = 0     # progressive: blocks/stages >= this train
  c.protocol.keep_blocks = 0       # decapitation: keep the first k blocks/stages
  c.protocol.decapitation_trained = False

  c.data = ml_collections.ConfigDict()
  c.data.name = a.dataset
  c.data.manual_dir = ""           # the dataset's download folder, as unpacked
  c.data.data_dir = "~/mfjax_data"  # where the built array_record dataset lives
  c.data.resolution = a.res
  c.data.options = ml_collections.ConfigDict()  # dataset options (e.g. uncertainty policy)
  c.data.norm = "dataset"          # dataset: the paper's per-dataset mean/std; model: the model's own (CLIP / ImageNet)
  c.data.uncertainty = "zeros"     # multi-label uncertain labels: zeros (paper) | ones | ignore
  c.data.num_workers = 0
  c.data.augment = True            # False: eval transforms only; frozen_linear then trains on cached features
  c.data.cache_features = True     # with frozen_linear and augment=False: train the head on cached features
  c.data.feature_cache = "~/.cache/mfjax/features"

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = a.lr
  c.optim.weight_decay = 1e-5
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0
  c.optim.warmup_epochs = WARMUP.get(a.dataset, {}).get("epochs", 0)
  c.optim.warmup_steps = WARMUP.get(a.dataset, {}).get("steps", 0)
  c.optim.warmup_start = 1e-8
  c.optim.plateau_patience = 2     # epochs without improvement before lr /= 10; -1 switches it off
  c.optim.plateau_factor = 0.1
  c.optim.plateau_after_warmup = True  # the epochs of the warmup do not count towards the plateau rule
  c.optim.mu_dtype = ""            # e.g. bfloat16 for Adam's first moment

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.sharding_rules = [(".*", "fsdp")]  # (regex on the state path, replicate|fsdp), first match wins
  c.min_fsdp_mb = 4.0

  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  return c
