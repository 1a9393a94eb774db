r"""Fig. 5, decapitation: the first k blocks (stages) of the foundation + the DeiT-B head,
foundation frozen and trained.

  mfjax sweep --sweep configs/sweeps/decapitation.py:model=dinov2_vitb14,dataset=aptos2019,data_root=~/data,checkpoint_root=ckpt \
      --runs-dir runs/decapitation
"""

from configs.sweeps.paper import LEARNING_RATES
from mfjax.config import parse_arg
from mfjax.train.protocols import block_count


def get_sweep(arg: str = "") -> dict:
  a = parse_arg(arg, model="dinov2_vitb14", dataset="aptos2019", data_root="", checkpoint_root="",
                depth=0, seeds=5)
  depth = a.depth or block_count(a.model)  # 0: all of the model's blocks (ViT) or stages (FocalNet, ResNet)
  return dict(
      config="configs/paper.py", data_root=a.data_root, checkpoint_root=a.checkpoint_root,
      axes={"model": [a.model], "dataset": [a.dataset], "protocol": ["decapitation"],
            "protocol.keep_blocks": list(range(1, depth + 1)),
            "protocol.decapitation_trained": [False, True],
            "lr": list(LEARNING_RATES), "seed": list(range(a.seeds))},
      fixed={})
