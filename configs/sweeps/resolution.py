r"""Table 3, resolution: the foundations at 1024 px (position embeddings interpolated), unfrozen.

  mfjax sweep --sweep configs/sweeps/resolution.py:data_root=~/data,checkpoint_root=ckpt --runs-dir runs/res1024

At 1024 px a ViT-B step needs remat (`model.remat=True`, set here) and a GPU/TPU; DINOv2 runs
at 1022 px, the nearest multiple of its 14-px patches. bf16 compute is on. The default models are
Table 3's five; `models=` adds others (DeiT-B, DINO, ResNet-152 have no published 1024 px number).
"""

from configs.sweeps.paper import DATASETS, LEARNING_RATES
from mfjax.config import parse_arg

MODELS = ("sam_vitb", "seem_focalt", "openclip_vitb16", "dinov2_vitb14", "blip_vitb16")  # Table 3


def get_sweep(arg: str = "") -> dict:
  a = parse_arg(arg, data_root="", checkpoint_root="", models="+".join(MODELS), datasets="+".join(DATASETS),
                protocol="unfrozen_linear", res=1024, seeds=5, batch=16)
  return dict(
      config="configs/paper.py", data_root=a.data_root, checkpoint_root=a.checkpoint_root,
      axes={"model": a.models.split("+"), "dataset": a.datasets.split("+"), "protocol": [a.protocol],
            "res": [a.res], "lr": list(LEARNING_RATES), "seed": list(range(a.seeds))},
      fixed={"model.remat": True, "model.dtype": "bfloat16", "batch_size": a.batch},
      per_model={m: {"data.resolution": a.res // 14 * 14} for m in a.models.split("+") if "14" in m})
