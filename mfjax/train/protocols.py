"""The paper's protocols as data: which head, which foundation parameters train, where to cut.

  frozen_linear     frozen foundation + linear head            (paper protocol 1)
  frozen_deit       frozen foundation + stacked DeiT-B          (2)
  unfrozen_linear   trained foundation + linear head            (3)
  unfrozen_deit     trained foundation + stacked DeiT-B         (4)
  progressive       blocks/stages >= unfreeze_from train, everything else in the foundation
                    stays frozen (the paper's `partial.unfreeze_cutoff`; embeddings, final
                    norm and projection stay frozen as in its code)
  decapitation      only the first keep_blocks blocks/stages, then the stacked DeiT-B;
                    foundation frozen or trained (decapitation_trained)

Unlike the paper's code, partial unfreezing also takes effect under a stacked head (its
`freeze_foundation()` re-froze the whole foundation on every forward).
"""
import re

import flax.traverse_util as traverse_util

PROTOCOLS = ("frozen_linear", "frozen_deit", "unfrozen_linear", "unfrozen_deit", "progressive",
             "decapitation")

# Top-level foundation parameter names that are blocks (ViT, SAM, DINOv3) or stages (FocalNet,
# ResNet); the trailing number orders them.
BLOCK_NAME = re.compile(r"^(?:blocks|layers|stages|layer)_?(\d+)$")


def head_of(protocol: str, head: str | None = None) -> str:
  if protocol.endswith("_linear"):
    return "linear"
  if protocol.endswith("_deit") or protocol == "decapitation":
    return "deit"
  return head or "linear"


def foundation_trains(protocol: str, decapitation_trained: bool = False) -> bool:
  """Whether any foundation parameter is trained (then it runs in training mode)."""
  return protocol.startswith("unfrozen") or protocol == "progressive" or (
      protocol == "decapitation" and decapitation_trained)


def block_order(foundation_params: dict) -> list[str]:
  """Names of the foundation's blocks/stages, in order."""
  found = [(int(m.group(1)), k) for k in foundation_params if (m := BLOCK_NAME.match(k))]
  return [k for _, k in sorted(found)]


def trainable_mask(params: dict, protocol: str, unfreeze_from: int = 0,
                   decapitation_trained: bool = False) -> dict:
  """A pytree of booleans like `params`: True where the parameter is trained."""
  blocks = block_order(params.get("foundation", {}))
  if protocol == "progressive" and not 0 <= unfreeze_from <= len(blocks):
    raise ValueError(f"unfreeze_from={unfreeze_from} outside 0..{len(blocks)} (the foundation has "
                     f"{len(blocks)} blocks/stages)")
  trained_blocks = set(blocks[unfreeze_from:])
  everything = foundation_trains(protocol, decapitation_trained) and protocol != "progressive"

  def rule(path, _):
    if path[0] != "foundation":
      return True
    if protocol == "progressive":
      return path[1] in trained_blocks
    return everything

  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: rule(p, v) for p, v in flat.items()})


def split(params: dict, mask: dict) -> tuple[dict, dict]:
  """(trainable, frozen) partitions of `params`, each a nested dict with only its leaves."""
  flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
  trainable = {p: v for p, v in flat.items() if flat_mask[p]}
  frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)
