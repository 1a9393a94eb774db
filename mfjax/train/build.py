"""From a config to a classifier: the foundation (converted or random), its head, its weights."""
import logging
import re

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from mfjax import models, parallel
from mfjax.config import ConfigError, check_choice
from mfjax.models import heads
from mfjax.train import optim, protocols

log = logging.getLogger("mfjax")

# Fields of vit.Model the stacked DeiT-B head shares with a converted DeiT-B.
_DEIT_FIELDS = ("width", "depth", "heads", "mlp_hidden", "ln_eps")


IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def input_norm(config) -> tuple | None:
  """The (mean, std) the images are normalised with: None for data.norm=dataset (the dataset's constants,
  as the paper's code does for every model); for data.norm=model the model's own pretraining constants:
  CLIP's for OpenCLIP and BLIP, ImageNet's for the others (SAM's and SEEM's pixel mean/std are ImageNet's)."""
  check_choice("data.norm", config.data.norm, ("dataset", "model"))
  if config.data.norm == "dataset":
    return None
  return CLIP_NORM if config.model.name.startswith(("openclip_", "blip_")) else IMAGENET_NORM


# The paper's code resizes these models' position tables once, when it loads them (SAM's
# filter_interpolate_weights, open_clip's force_image_size), and trains the resized tables; the
# other models resize theirs at every forward, as mfjax does for all by default.
RESIZED_AT_LOAD = ("sam_", "openclip_")


def load_resolution(config, name: str, module) -> tuple[int, int] | None:
  """The resolution `model.resize_at_load` resizes the foundation's position tables to, or None."""
  if not (config.model.get("resize_at_load") and name.startswith(RESIZED_AT_LOAD)):
    return None
  resolution = (config.data.resolution,) * 2
  return resolution if resolution != tuple(module.native_resolution) else None


def pretrained_foundation(config) -> dict:
  """The variables of the converted foundation at model.checkpoint, its position tables resized
  at load where `load_resolution` says so."""
  _, variables = models.load(config.model.checkpoint)
  # The module as this run builds it: `model.overrides` (another `posemb` or `rel_pos_resize`, say)
  # decide the resampling, as they do where tables are resized at every forward.
  name, overrides = _foundation_spec_as_stored(config)
  module = models.create(name, **overrides)
  resolution = load_resolution(config, config.model.name, module)
  if resolution:
    log.info("%s: position tables resized once to %dx%d px at load, as the paper's code does", config.model.name,
             *resolution)
    variables = models.at_resolution(config.model.name, module, variables, resolution)
  return variables


# jax_default_matmul_precision's levels that a run may ask for (float32 inputs only; bfloat16 is unaffected).
MATMUL_PRECISIONS = ("highest", "float32", "high", "tensorfloat32", "bfloat16", "default")


def use_matmul_precision(config) -> None:
  """Make float32 matmuls and convolutions run at `model.matmul_precision` (default "highest":
  full float32, as PyTorch runs them; XLA's own default is TF32 on a GPU and one bfloat16 pass
  on a TPU, which moves a converted model's features by about 1e-3 to 1e-2). A CPU computes
  float32 either way. Process-wide, as it must be before anything is traced."""
  precision = config.model.get("matmul_precision", "highest")
  check_choice("model.matmul_precision", precision, MATMUL_PRECISIONS)
  jax.config.update("jax_default_matmul_precision", precision)


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(config) -> None:
  check_choice("model.dtype", config.model.get("dtype", "float32"), COMPUTE_DTYPES)


def check_names(config) -> None:
  """The model and protocol names, and the values a typo would otherwise send deep into JAX or the data
  pipeline, checked before anything slow (building the dataset) runs."""
  from mfjax.data.pipeline import UNCERTAINTY_POLICIES
  from mfjax.models import layers, posemb, sam
  check_choice("model", config.model.name, models.NAMES)
  if "protocol" in config:
    check_choice("protocol", config.protocol.name, protocols.PROTOCOLS)
    check_protocol_fields(config.protocol)
  uncertainty = config.data.get("uncertainty", "zeros")
  check_choice("data.uncertainty", uncertainty, UNCERTAINTY_POLICIES)
  # Set for every cell of a sweep, these may reach cells that ignore them: said, not refused.
  if uncertainty != "zeros" and config.data.get("name", "chexpert") != "chexpert":
    log.warning("data.uncertainty=%r applies to CheXpert's uncertain labels only: ignored on %s", uncertainty,
                config.data.name)
  if "protocol" in config and config.get("head", {}).get("checkpoint") and protocols.head_of(
      config.protocol.name, config.protocol.get("head")) != "deit":
    log.warning("head.checkpoint is for the stacked DeiT-B head: ignored by protocol %s, which trains a linear head",
                config.protocol.name)
  check_dtype(config)
  check_choice("model.matmul_precision", config.model.get("matmul_precision", "highest"), MATMUL_PRECISIONS)
  for field in ("epochs", "batch_size", "log_every_steps", "checkpoint_every_steps"):
    if field in config and (isinstance(config[field], bool) or not (isinstance(config[field], int)
                                                                    and config[field] >= 1)):
      raise ConfigError(f"{field}={config[field]!r} must be an int >= 1")
  if "seed" in config and (isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0):
    raise ConfigError(f"seed={config.seed!r} must be an int >= 0")
  for i, rule in enumerate(config.get("sharding_rules", [])):
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
            and rule[1] in ("replicate", "fsdp")):
      raise ConfigError(f"sharding_rules[{i}]={rule!r} must be a (regex, 'replicate' or 'fsdp') pair")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ConfigError(f"sharding_rules[{i}]: {rule[0]!r} is not a regular expression ({e})") from None
  if "optim" in config:
    optim.check_optim(config.optim)
  overrides = dict(config.model.get("overrides", {}))
  for field, valid in (("posemb", posemb.POSEMB_METHODS), ("attn_impl", layers.ATTENTION_IMPLS),
                       ("rel_pos_resize", sam.REL_POS_RESIZE), ("remat_policy", layers.REMAT_POLICIES)):
    if field in overrides:
      check_choice(f"model.overrides.{field}", overrides[field], valid)
  resolution = config.get("data", {}).get("resolution")
  if resolution is not None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
      raise ConfigError(f"data.resolution={resolution!r} must be an int >= 1 (pixels)")
    try:  # the model as the run builds it: its checkpoint's model.json may set another patch size
      name, stored = _foundation_spec_as_stored(config)
    except OSError:  # a checkpoint not there yet (`sweep --list` before converting): its name's default
      name, stored = config.model.name, overrides
    patch = getattr(models.create(name, **stored), "patch_size", None)
    if patch and resolution % patch:
      raise ConfigError(f"data.resolution={resolution} is not a multiple of {config.model.name}'s patch size {patch}")


# Protocol fields that only one protocol reads, with their defaults; set under another one, they
# would be ignored and a mistyped experiment would run as a different one.
PROTOCOL_FIELDS = {"unfreeze_from": ("progressive", 0), "keep_blocks": ("decapitation", 0),
                   "decapitation_trained": ("decapitation", False)}


def check_protocol_fields(protocol) -> None:
  name = protocol.name
  if "head" in protocol:
    check_choice("protocol.head", protocol.head, ("linear", "deit"))
    if name != "progressive" and protocol.head not in ("linear", protocols.head_of(name)):
      raise ConfigError(f"protocol.head={protocol.head!r} does not apply to protocol {name} (its head is "
                        f"{protocols.head_of(name)}); protocol.head chooses the head of progressive only")
  for field, (owner, default) in PROTOCOL_FIELDS.items():
    if field in protocol and name != owner and protocol[field] != default:
      raise ConfigError(f"protocol.{field}={protocol[field]!r} applies to protocol {owner} only, not to {name}")


def foundation_spec(config, meta: dict | None = None) -> tuple[str, dict]:
  """(model name, constructor overrides) of the foundation, from the checkpoint (or `meta`, its
  model.json as a run recorded it) and the config."""
  name, overrides = _foundation_spec_as_stored(config, meta)
  resolution = load_resolution(config, name, models.create(name, **overrides))
  if resolution:
    overrides["native_resolution"] = resolution
  return name, overrides


def resized_at_load(config) -> bool:
  """Whether this run's foundation has its position tables resized at load (`load_resolution`)."""
  name, overrides = _foundation_spec_as_stored(config)
  return load_resolution(config, name, models.create(name, **overrides)) is not None


def checkpoint_models(config, head: bool = True) -> dict:
  """{"model": {"name", "overrides"}, "head": ...} of the checkpoints a run loads (the stacked head's
  only with that head), as their model.json records them. Results keep it, so that the report can
  tell a changed architecture from the paper's model without the checkpoint at hand."""
  sections = ["model"]
  if head and "protocol" in config and protocols.head_of(config.protocol.name, config.protocol.get("head")) == "deit":
    sections.append("head")
  found = {}
  for section in sections:
    path = config[section].get("checkpoint")
    if path:
      meta = models.read_model_json(path)
      found[section] = {"name": meta["name"], "overrides": meta["overrides"]}
  return found


def _foundation_spec_as_stored(config, meta: dict | None = None) -> tuple[str, dict]:
  """`foundation_spec` before position tables are resized at load."""
  name, overrides = config.model.name, {}
  if config.model.checkpoint:
    meta = meta or models.read_model_json(config.model.checkpoint)
    if meta["name"] != name:
      raise ConfigError(f"model.name={name!r} but {config.model.checkpoint} holds {meta['name']!r}")
    overrides.update(meta["overrides"])
  check_choice("model", name, models.NAMES)
  overrides.update(dict(config.model.overrides))
  module_fields = set(models.create(name).__dataclass_fields__)
  for key in ("dtype", "remat", "drop_path"):
    if key in module_fields:
      overrides[key] = config.model[key]
  protocol = config.protocol.name if "protocol" in config else None  # `mfjax segment` has none
  if protocol == "decapitation":
    if config.protocol.keep_blocks <= 0:
      raise ConfigError("protocol decapitation needs protocol.keep_blocks >= 1")
    cut = next((f for f in ("num_blocks", "num_stages") if f in module_fields), None)
    if cut is None:
      raise ConfigError(f"model {name} cannot be decapitated (no num_blocks/num_stages field)")
    units, unit = protocols.units_of(models.create(name, **overrides))
    if config.protocol.keep_blocks > units:
      raise ConfigError(f"protocol.keep_blocks={config.protocol.keep_blocks} but {name} has {units} {unit}")
    overrides[cut] = config.protocol.keep_blocks
  if protocol == "progressive":
    units, unit = protocols.units_of(models.create(name, **overrides))
    if not 0 <= config.protocol.unfreeze_from <= units:
      raise ConfigError(f"protocol.unfreeze_from={config.protocol.unfreeze_from} must be in 0..{units}: {name} "
                        f"has {units} {unit}")
  return name, overrides


# Parameters that are 1-D in the PyTorch original but not here, which the paper's rule (no weight
# decay on biases and 1-D parameters) must name: OpenCLIP's class_embedding is (width,), mfjax's
# cls_token (1, 1, width).
ONE_DIM_IN_TORCH = {"openclip_": ("foundation/cls_token",)}


def one_dim_in_torch(config) -> tuple[str, ...]:
  return next((paths for prefix, paths in ONE_DIM_IN_TORCH.items() if config.model.name.startswith(prefix)), ())


def head_fields(config) -> dict:
  fields = {"dtype": config.model.dtype, "remat": config.model.remat, "drop_path": config.head.drop_path}
  if config.head.checkpoint:
    meta = models.read_model_json(config.head.checkpoint)
    if models.family_of(meta["name"]) != "vit":
      raise ConfigError(f"head.checkpoint {config.head.checkpoint} holds a {meta['name']}; the stacked head is a "
                        "DeiT-B (a converted deit_base_patch16, or another plain ViT)")
    deit = models.create(meta["name"], **meta["overrides"])
    fields.update({k: getattr(deit, k) for k in _DEIT_FIELDS})
    fields["native_grid"] = deit.native_grid
  fields.update(dict(config.head.overrides))
  unknown = set(fields) - set(heads.StackedDeiT.__dataclass_fields__)
  if unknown:
    raise ConfigError(f"unknown head.overrides {sorted(unknown)}; valid: "
                      f"{sorted(set(heads.StackedDeiT.__dataclass_fields__) - {'parent', 'name', 'num_classes'})}")
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def build_classifier(config, num_classes: int) -> heads.Classifier:
  check_choice("protocol", config.protocol.name, protocols.PROTOCOLS)
  name, overrides = foundation_spec(config)
  foundation = models.create(name, **overrides)
  head = protocols.head_of(config.protocol.name, config.protocol.head)
  check_choice("protocol.head", head, ("linear", "deit"))
  return heads.Classifier(foundation, num_classes, head, tuple(sorted(head_fields(config).items())))


def abstract_params(classifier, input_shape: tuple[int, ...]):
  """Shapes of `classifier.init`'s variables for inputs of `input_shape` (without the batch)."""
  inputs = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  return jax.eval_shape(classifier.init, jax.random.PRNGKey(0), inputs)


def fill_pretrained(target_flat: dict, source: dict, prefix: tuple, what: str, drop_extra_blocks=False,
                    fill_all=False, fresh: tuple[str, ...] = ()) -> int:
  """Replace leaves of `target_flat` under `prefix` by `source`'s, keeping each leaf's sharding.

  Every source leaf must exist in the model with the same shape (blocks beyond a decapitation
  cut excepted), and with `fill_all` every model leaf under `prefix` but the new layers named in
  `fresh` must come from `source` (a checkpoint with fewer blocks than the configured model is not
  silently topped up with random weights); problems are collected and raised together.
  """
  problems, n = [], 0
  if fill_all:
    filled = {prefix + path for path in traverse_util.flatten_dict(source)}
    problems += [f"missing {'/'.join(key[len(prefix):])} (the model has it, the checkpoint does not)"
                 for key in target_flat if key[:len(prefix)] == prefix and key not in filled
                 and key[len(prefix)] not in fresh]
  for path, value in traverse_util.flatten_dict(source).items():
    key = prefix + path
    if key not in target_flat:
      if not (drop_extra_blocks and protocols.block_number(path[0]) is not None):
        problems.append(f"unexpected {'/'.join(path)}")
      continue
    old = target_flat[key]
    if tuple(old.shape) != tuple(np.shape(value)):
      problems.append(f"{'/'.join(path)}: {np.shape(value)} vs model {tuple(old.shape)}")
      continue
    target_flat[key] = parallel.put_global(np.asarray(value, dtype=old.dtype), old.sharding)
    n += 1
  if problems:
    raise ConfigError(f"{what} does not fit the model:\n  " + "\n  ".join(problems))
  return n


def with_checkpoint(tree: dict, checkpoint: str, prefix: tuple, what: str, adapt=None) -> dict:
  """`tree` (initialised, possibly sharded) with the converted model at `checkpoint` put in under
  `prefix`; every leaf there must come from the checkpoint, with its shape (`fill_pretrained`).
  `adapt(params) -> params` changes the checkpoint's parameters first (e.g. its input channels)."""
  flat = traverse_util.flatten_dict(tree)
  _, pretrained = models.load(checkpoint)
  params = adapt(pretrained["params"]) if adapt else pretrained["params"]
  n = fill_pretrained(flat, params, prefix, f"{what} checkpoint {checkpoint}", fill_all=True)
  log.info("loaded %d tensors of the %s from %s", n, what, checkpoint)
  return traverse_util.unflatten_dict(flat)


def load_pretrained(classifier: heads.Classifier, config, variables: dict) -> dict:
  """`variables` (randomly initialised, possibly sharded) with the converted foundation and
  DeiT-B weights put in where the config names them."""
  flat = traverse_util.flatten_dict(variables)
  if isinstance(classifier, heads.LinearProbe):
    return variables  # the foundation ran once, when its features were cached
  if config.model.checkpoint:
    pretrained = pretrained_foundation(config)
    for collection, tree in pretrained.items():
      n = fill_pretrained(flat, tree, (collection, "foundation"), f"foundation checkpoint {config.model.checkpoint}",
                          drop_extra_blocks=config.protocol.name == "decapitation", fill_all=True)
      log.info("loaded %d %s tensors of the foundation from %s", n, collection, config.model.checkpoint)
  else:
    log.warning("model.checkpoint is empty: the foundation starts from random weights")
  if classifier.head == "deit":
    if config.head.checkpoint:
      _, deit = models.load(config.head.checkpoint)
      # The head bypasses the patch embedding; any other part (OpenCLIP's norm_pre, registers) it lacks.
      unused = sorted(k for k in deit["params"] if k not in ("cls_token", "pos_embed", "norm", "patch_embed")
                      and not k.startswith("blocks_"))
      if unused:
        raise ConfigError(f"head.checkpoint {config.head.checkpoint} has {unused}, which the stacked DeiT-B head "
                          "has no place for: use a converted DeiT-B (deit_base_patch16) or another plain ViT")
      keep = {k: v for k, v in deit["params"].items() if k != "patch_embed"}
      n = fill_pretrained(flat, keep, ("params", "stacked"), f"DeiT-B checkpoint {config.head.checkpoint}",
                          fill_all=True, fresh=("projector", "projector_norm", "fc"))
      log.info("loaded %d tensors of the stacked DeiT-B from %s", n, config.head.checkpoint)
    else:
      log.warning("head.checkpoint is empty: the stacked DeiT-B starts from random weights")
  return traverse_util.unflatten_dict(flat)
