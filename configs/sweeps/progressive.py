r"""Fig. 4, progressive freezing: blocks 0..k-1 frozen, k = 0 .. depth, linear head.

  mfjax sweep --sweep configs/sweeps/progressive.py:model=dinov2_vitb14,dataset=aptos2019,data_root=~/data,checkpoint_root=ckpt \
      --runs-dir runs/progressive
"""

from configs.sweeps.paper import LEARNING_RATES
from mfjax.config import parse_arg
from mfjax.train.protocols import block_count


def get_sweep(arg: str = "") -> dict:
  a = parse_arg(arg, model="dinov2_vitb14", dataset="aptos2019", data_root="", checkpoint_root="",
                depth=0, seeds=5, head="linear")
  depth = a.depth or block_count(a.model)  # 0: all of the model's blocks (ViT) or stages (FocalNet, ResNet)
  return dict(
      config="configs/paper.py", data_root=a.data_root, checkpoint_root=a.checkpoint_root,
      axes={"model": [a.model], "dataset": [a.dataset], "protocol": ["progressive"],
            "protocol.unfreeze_from": list(range(depth + 1)), "lr": list(LEARNING_RATES),
            "seed": list(range(a.seeds))},
      fixed={"protocol.head": a.head})
