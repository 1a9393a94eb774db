r"""Fig. 6, model size: DINOv2 ViT-S/B/L/g-14 under the four protocols.

  mfjax sweep --sweep configs/sweeps/model_size.py:dataset=aptos2019,data_root=~/data,checkpoint_root=ckpt \
      --runs-dir runs/model_size
"""

from configs.sweeps.paper import LEARNING_RATES, PROTOCOLS
from mfjax.config import parse_arg


def get_sweep(arg: str = "") -> dict:
  a = parse_arg(arg, dataset="aptos2019", data_root="", checkpoint_root="", seeds=5,
                protocols="+".join(PROTOCOLS))
  return dict(
      config="configs/paper.py", data_root=a.data_root, checkpoint_root=a.checkpoint_root,
      axes={"model": [f"dinov2_vit{s}14" for s in "sblg"], "dataset": [a.dataset],
            "protocol": a.protocols.split("+"), "lr": list(LEARNING_RATES), "seed": list(range(a.seeds))},
      fixed={})
