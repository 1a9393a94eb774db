r"""A tiny version of any paper cell, for smoke tests and the CPU demo: same code path, small shapes.

  mfjax train --config configs/tiny.py:model=deit_base_patch16,dataset=aptos2019,protocol=frozen_deit \
      --config.data.manual_dir=PATH --workdir runs/tiny

The foundation keeps its family and wiring but shrinks (ViT, SAM, DINOv3: width 32, 2 blocks,
2 heads, 8-px patches (SAM: 2x2 windows, block 1 global);
FocalNet: width 16, one block per stage; ResNet: one bottleneck per stage); the stacked DeiT-B
head shrinks alike; inputs are 32 px. Weights are random unless
model.checkpoint names a converted model of the same tiny shape. Takes seconds per epoch on a CPU.
"""
import ml_collections

from configs import paper

TINY_FOUNDATION = {
    "vit": dict(width=32, depth=2, heads=2, mlp_hidden=64, patch_size=8, native_resolution=(32, 32)),
    "sam": dict(width=32, depth=2, heads=2, mlp_hidden=64, patch_size=8, window=2, global_blocks=(1,),
                neck_features=16, native_resolution=(32, 32)),
    "dinov3": dict(width=32, depth=2, heads=2, mlp_hidden=64, patch_size=8, native_resolution=(32, 32)),
    "focalnet": dict(embed_dim=16, depths=(1, 1, 1, 1), native_resolution=(32, 32)),
    "resnet": dict(depths=(1, 1, 1, 1), native_resolution=(32, 32)),
}
TINY_HEAD = dict(width=32, depth=2, heads=2, mlp_hidden=64, native_grid=(4, 4))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  defaults = "res=32,epochs=2,batch=8"
  c = paper.get_config(defaults + ("," + arg if arg else ""))
  from mfjax import models
  family = models.family_of(c.model.name)
  if family not in TINY_FOUNDATION:
    raise ValueError(f"configs/tiny.py has no tiny shape for the {family} family")
  c.model.overrides = ml_collections.ConfigDict(TINY_FOUNDATION[family])
  c.head.overrides = ml_collections.ConfigDict(TINY_HEAD)
  c.optim.warmup_epochs = 0
  c.optim.warmup_steps = 0
  c.log_every_steps = 1
  return c
