"""ResNet-50/101/152 checkpoints from torchvision (`resnet152-394f9c45.pth`, what
`torch.hub.load('pytorch/vision', 'resnet152', pretrained=True)` downloads) and timm (a state dict
file, or a Hugging Face folder such as timm/resnet152.a1h_in1k). Both use the same names.

BatchNorm running statistics go to the `batch_stats` collection; `num_batches_tracked` and the
ImageNet classifier `fc.*` are ignored explicitly (the benchmark replaces fc by Identity).
"""
import re

import numpy as np

from convert import core, timm_hub

FORMATS = ("original", "hf")


def _model_names() -> tuple[str, ...]:
  from mfjax.models import resnet
  return tuple(resnet.MODELS)


def add_arguments(parser) -> None:
  parser.add_argument("--model", choices=sorted(_model_names()), default=None,
                      help="model to convert into; default: detected from the number of blocks")


def _batchnorm(c: core.Conversion, dst: str, src: str) -> None:
  c.map(f"params/{dst}/scale", f"{src}.weight")
  c.map(f"params/{dst}/bias", f"{src}.bias")
  c.map(f"batch_stats/{dst}/mean", f"{src}.running_mean")
  c.map(f"batch_stats/{dst}/var", f"{src}.running_var")


def convert(state_dict: dict[str, np.ndarray], model: str = "resnet152",
            source: str = "checkpoint") -> dict:
  """Flax variables ({'params', 'batch_stats'}) of `model` from a torchvision/timm state dict."""
  from mfjax import models
  if models.family_of(model) != "resnet":
    raise ValueError(f"{model!r} is not a ResNet model; valid: {', '.join(_model_names())}")
  module = models.create(model)
  c = core.Conversion(state_dict, models.abstract_variables(module), source=source)
  c.ignore(r"fc\.(weight|bias)")
  c.ignore(r".*\.num_batches_tracked")
  c.map("params/conv1/kernel", "conv1.weight", core.conv)
  _batchnorm(c, "bn1", "bn1")
  for s, depth in enumerate(module.depths):
    for i in range(depth):
      src, dst = f"layer{s + 1}.{i}", f"layer{s + 1}_{i}"
      for k in (1, 2, 3):
        c.map(f"params/{dst}/conv{k}/kernel", f"{src}.conv{k}.weight", core.conv)
        _batchnorm(c, f"{dst}/bn{k}", f"{src}.bn{k}")
      if i == 0:  # every stage's first block projects the shortcut (channels or stride change)
        c.map(f"params/{dst}/downsample_conv/kernel", f"{src}.downsample.0.weight", core.conv)
        _batchnorm(c, f"{dst}/downsample_bn", f"{src}.downsample.1")
  return c.finish()


def detect_model(state: dict, source: str) -> str:
  """The registered ResNet whose blocks per stage match the state dict's."""
  from mfjax.models import resnet
  blocks: dict[int, int] = {}  # stage -> number of blocks
  for key in state:
    if m := re.match(r"layer([1-4])\.(\d+)\.", key):
      blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
  depths = tuple(blocks.get(s, 0) for s in (1, 2, 3, 4))
  for name, cfg in resnet.MODELS.items():
    if tuple(cfg["depths"]) == depths:
      return name
  shown = ", ".join(sorted(state)[:8]) or "no tensors at all"
  known = ", ".join(f"{n} {cfg['depths']}" for n, cfg in resnet.MODELS.items())
  raise core.ConversionError(
      f"{source}: blocks per stage {depths} match no registered ResNet ({known}); is it a "
      f"torchvision or timm ResNet state dict? Its keys begin: {shown}. Pass --model to convert "
      "anyway and see every mismatch.")


def from_checkpoint(raw, hf_config, fmt, args):
  source = getattr(args, "checkpoint", "checkpoint")
  if fmt == "hf":
    name = timm_hub.architecture(hf_config, _model_names(), "resnet")
    if args.model and args.model != name:
      raise core.ConversionError(
          f"{source}: config.json says {name!r}, but --model {args.model} was given")
    state = raw
  else:
    if not isinstance(raw, dict):
      raise core.ConversionError(f"{source}: holds a {type(raw).__name__}, not a state dict")
    state = core.flatten_state_dict(core.unwrap(raw, ("state_dict", "model")))
    name = args.model or detect_model(state, source)
  return name, {}, convert(state, model=name, source=source)
