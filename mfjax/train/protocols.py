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

# Top-level foundation parameter names that belong to a block (ViT, SAM, DINOv3: blocks_3) or a
# stage (FocalNet: layers_2_blocks_0, layers_2_downsample, norm2; ResNet: layer3_5, 1-based).
# The number orders them; names that match none (embeddings, final norm, projection) are neither.
BLOCK_NAME = re.compile(r"^(?:blocks_(\d+)|layers_(\d+)_.*|norm(\d+)|layer(\d+)_\d+)$")


# Top-level foundation parameters the classifier never uses: SAM's neck (the paper's code drops it
# at load). They stay frozen, get no optimizer state, and are not counted as the model's parameters.
UNUSED_BY_CLASSIFIER = ("neck",)


def count_used(params: dict) -> int:
  """Parameters of a classifier's params tree, less those the classifier never uses."""
  flat = traverse_util.flatten_dict(params)
  return int(sum(v.size for p, v in flat.items()
                 if not (len(p) > 1 and p[0] == "foundation" and p[1] in UNUSED_BY_CLASSIFIER)))


def block_number(name: str) -> int | None:
  m = BLOCK_NAME.match(name)
  return None if m is None else int(next(g for g in m.groups() if g is not None))


def head_of(protocol: str, head: str | None = None) -> str:
  if protocol.endswith("_linear"):
    return "linear"
  if protocol.endswith("_deit") or protocol == "decapitation":
    return "deit"
  return head or "linear"


def foundation_trains(protocol: str, decapitation_trained: bool = False) -> bool:
  """Whether the foundation runs in training mode (drop-path on, BatchNorm on batch statistics).

  True when the whole foundation trains. Progressive freezing keeps it in inference mode, as the
  paper's code does (its partially unfrozen blocks still ran in eval()), so frozen stages never
  see their BatchNorm statistics move.
  """
  return protocol.startswith("unfrozen") or (protocol == "decapitation" and decapitation_trained)


def units_of(module) -> tuple[int, str]:
  """The units of progressive freezing and decapitation: (count, "blocks") of a ViT, SAM or DINOv3,
  (count, "stages") of FocalNet / ResNet."""
  return (len(module.depths), "stages") if hasattr(module, "depths") else (module.depth, "blocks")


def block_count(model_name: str) -> int:
  """How many blocks / stages the registered model `model_name` has (12 for ViT-B, 4 for ResNet-152)."""
  from mfjax import models
  return units_of(models.create(model_name))[0]


def block_groups(foundation_params: dict) -> list[list[str]]:
  """The foundation's top-level parameter names grouped by block/stage, in order."""
  groups: dict[int, list[str]] = {}
  for k in foundation_params:
    number = block_number(k)
    if number is not None:
      groups.setdefault(number, []).append(k)
  return [sorted(groups[n]) for n in sorted(groups)]


def trainable_mask(params: dict, protocol: str, unfreeze_from: int = 0,
                   decapitation_trained: bool = False, freeze_unused: bool = True) -> dict:
  """A pytree of booleans like `params`: True where the parameter is trained."""
  blocks = block_groups(params.get("foundation", {}))
  if protocol == "progressive" and not 0 <= unfreeze_from <= len(blocks):
    raise ValueError(f"unfreeze_from={unfreeze_from} outside 0..{len(blocks)} (the foundation has "
                     f"{len(blocks)} blocks/stages)")
  # FocalNet's output norms (norm0..3) are grouped with their stages so that decapitation drops them,
  # but they are not in SEEM's `layers`, which the paper's progressive unfreezing walks: they stay frozen.
  trained_blocks = {name for group in blocks[unfreeze_from:] for name in group if not re.match(r"norm\d+$", name)}
  everything = foundation_trains(protocol, decapitation_trained)

  def rule(path, _):
    if path[0] != "foundation":
      return True
    if freeze_unused and path[1] in UNUSED_BY_CLASSIFIER:
      return False
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
