r"""Tables 1 and 2: every foundation x dataset x the four protocols, 4 learning rates x 5 seeds.

  mfjax sweep --sweep configs/sweeps/paper.py:data_root=~/data,checkpoint_root=ckpt --runs-dir runs/paper
  mfjax report runs/paper

data_root holds one download folder per dataset (aptos2019/, isic2019/, chexpert/, cbis_ddsm/);
checkpoint_root one converted model per name (`python -m convert ... --out ckpt/<model>`).
Arguments: data_root, checkpoint_root, models (a '+'-joined subset), datasets, protocols, seeds, and
the build options of two downloads: cbis_layout (cbis: the TCIA release, the default; lists: the
paper's DDSM image lists, with their official split) and chexpert_views (all, as the paper; frontal).
The full grid is 8 x 4 x 4 x 4 x 5 = 2,560 runs of 100 epochs: spread it with `--list` and a
launcher, or narrow it with the arguments. The paper's stacked DeiT-B rows cover SAM, SEEM, OpenCLIP,
DINOv2 and BLIP only; the 480 runs of DeiT-B, DINO and ResNet-152 under frozen_deit/unfrozen_deit
have no published counterpart (leave them out with two sweeps: protocols=frozen_linear+unfrozen_linear
for all models, then the _deit protocols with models=sam_vitb+seem_focalt+openclip_vitb16+dinov2_vitb14+blip_vitb16).
"""
import numpy as np

from mfjax.config import check_choice, parse_arg
from mfjax.data import chexpert

MODELS = ("deit_base_patch16", "dino_vitb16", "dinov2_vitb14", "openclip_vitb16", "blip_vitb16",
          "sam_vitb", "seem_focalt", "resnet152")
DATASETS = ("aptos2019", "cbis_ddsm", "isic2019", "chexpert")
PROTOCOLS = ("frozen_linear", "frozen_deit", "unfrozen_linear", "unfrozen_deit")
LEARNING_RATES = tuple(float(f"{v:.1e}") for v in np.logspace(-5, -3, 4))  # 1e-5 .. 1e-3


def get_sweep(arg: str = "") -> dict:
  a = parse_arg(arg, data_root="", checkpoint_root="", models="+".join(MODELS),
                datasets="+".join(DATASETS), protocols="+".join(PROTOCOLS), seeds=5, cbis_layout="cbis",
                chexpert_views="all")
  check_choice("cbis_layout", a.cbis_layout, ("cbis", "lists"))
  check_choice("chexpert_views", a.chexpert_views, chexpert.VIEWS)
  per_dataset = {}  # only what differs from the defaults: runs made without the argument keep their config
  if a.cbis_layout != "cbis":
    per_dataset["cbis_ddsm"] = {"data.options.layout": a.cbis_layout, "data.options.split": "official"}
  if a.chexpert_views != "all":
    per_dataset["chexpert"] = {"data.options.views": a.chexpert_views}
  return dict(
      config="configs/paper.py",
      data_root=a.data_root, checkpoint_root=a.checkpoint_root,
      axes=dict(model=a.models.split("+"), dataset=a.datasets.split("+"),
                protocol=a.protocols.split("+"), lr=list(LEARNING_RATES), seed=list(range(a.seeds))),
      fixed={}, per_dataset=per_dataset)
