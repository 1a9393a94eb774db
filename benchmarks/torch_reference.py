"""The PyTorch side of the benchmarks: each mfjax model's reference implementation with the
paper's heads and protocols, and its train and inference steps.

References (random weights; only the compute matters here):
  deit_base_patch16, dino_vitb16, blip_vitb16   timm vit_base_patch16_224 (the same ViT-B/16)
  dinov2_vit{s,b,l,g}14[_reg4]                   timm vit_{small,base,large,giant}_patch14[_reg4]_dinov2
  openclip_vitb16                                open_clip ViT-B-16 visual tower
  dinov3_vit{s,b,l}16, meddinov3_vitb16          timm vit_{small,base,large}_patch16_dinov3[_qkvb] (RoPE, 4 registers)
  sam_vit{b,l,h}                                 segment_anything ImageEncoderViT (windowed, rel-pos, neck)
  focalnet_*                                     the timm FocalNet of the same name
  seem_focalt                                    SEEM's FocalNet-T: timm's FocalNet with SEEM's changes
                                                 (`seem_focalt_net`, also the parity tests' reference)
  resnet50/101/152                               torchvision
Also nnU-Net's resize_segmentation (batchgenerators), the reference for mfjax's label resampling.
Each foundation returns (pooled, tokens) like the mfjax model and exposes its blocks or stages in
order, so progressive freezing and decapitation act on the same units as in mfjax.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from mfjax import models
from mfjax.train import protocols


class Reference(nn.Module):
  """A reference foundation: `net`, and its trainable units (blocks or stages) at the dotted
  attribute path UNITS, which progressive freezing and decapitation act on."""
  UNITS = "net.blocks"

  def __init__(self, net):
    super().__init__()
    self.net = net

  def _owner(self):
    *path, attr = self.UNITS.split(".")
    owner = self
    for name in path:
      owner = getattr(owner, name)
    return owner, attr

  @property
  def units(self):
    owner, attr = self._owner()
    return getattr(owner, attr)

  def cut(self, k):
    owner, attr = self._owner()
    setattr(owner, attr, self.units[:k])


def map_outputs(x):
  """(pooled, tokens) of a (B, C, H, W) feature map: its spatial mean and its flattened positions."""
  return x.mean((2, 3)), x.flatten(2).transpose(1, 2)


class ViT(Reference):
  """timm VisionTransformer or Eva: pooled = final-normed CLS, tokens = final-normed patch tokens."""

  def forward(self, x):
    x = self.net.forward_features(x)
    return x[:, 0], x[:, self.net.num_prefix_tokens:]


class OpenCLIP(Reference):
  UNITS = "net.transformer.resblocks"

  def __init__(self, visual):
    visual.output_tokens = True
    super().__init__(visual)

  def forward(self, x):
    return self.net(x)


class FocalNet(Reference):
  """timm FocalNet; a cut network skips the final norm (its width belongs to the last stage)."""
  UNITS = "net.layers"

  def cut(self, k):
    super().cut(k)
    if k < 4:
      self.net.norm = nn.Identity()

  def forward(self, x):
    return map_outputs(self.net.norm(self.net.layers(self.net.stem(x))))


class SEEMFocalNet(FocalNet):
  """SEEM's FocalNet-T (`seem_focalt_net`); a cut network ends with that stage's output norm."""

  def cut(self, k):
    Reference.cut(self, k)
    if k < 4:
      self.net.norm = self.net.stage_norms[k - 1]


def _seem_block_forward(self, x):
  x = x + self.dw1(x)
  x = self.norm1_post(x + self.ls1(self.modulation(x)))
  x = x + self.dw2(x)
  return self.norm2_post(x + self.ls2(self.mlp(x)))


def seem_focalt_net():
  """SEEM's FocalNet-T (focal_dw) as timm's FocalNet with SEEM's four changes: depthwise 3x3
  convs added residually before the modulation and the MLP, LayerNorm after the residual add,
  stem padding 3, and a LayerNorm on each of the first three stages' outputs (`stage_norms`,
  SEEM's res2..res4; the last stage uses `norm`). Random weights from timm's init."""
  from timm.layers import LayerNorm2d
  from timm.models.focalnet import FocalNet as TimmFocalNet
  import types
  model = TimmFocalNet(embed_dim=96, depths=(2, 2, 6, 2), focal_levels=(3,) * 4, focal_windows=(3,) * 4,
                       use_overlap_down=True, use_post_norm=True, normalize_modulator=True,
                       layerscale_value=1e-4, num_classes=0)
  model.stem.proj.padding = (3, 3)
  for stage in model.layers:
    for block in stage.blocks:
      block.dw1 = nn.Conv2d(block.dim, block.dim, 3, padding=1, groups=block.dim)
      block.dw2 = nn.Conv2d(block.dim, block.dim, 3, padding=1, groups=block.dim)
      block.forward = types.MethodType(_seem_block_forward, block)
  model.stage_norms = nn.ModuleList(LayerNorm2d(d, eps=1e-5) for d in (96, 192, 384))
  return model


class ResNet(Reference):
  UNITS = "stages"

  def __init__(self, net):
    super().__init__(net)
    self.stages = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)

  def forward(self, x):
    n = self.net
    return map_outputs(self.stages(n.maxpool(n.relu(n.bn1(n.conv1(x))))))


class SAM(Reference):
  """segment_anything's encoder up to its last block, like mfjax's `pooled`/`tokens` (the neck
  is not part of the features the paper probes)."""

  def forward(self, x):
    x = self.net.patch_embed(x) + self.net.pos_embed
    for block in self.net.blocks:
      x = block(x)
    return map_outputs(x.permute(0, 3, 1, 2))


_SAM = {"sam_vitb": (768, 12, 12, (2, 5, 8, 11)), "sam_vitl": (1024, 24, 16, (5, 11, 17, 23)),
        "sam_vith": (1280, 32, 16, (7, 15, 23, 31))}
_DINOV2_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}


def foundation(name: str, resolution: int) -> tuple[nn.Module, str]:
  """(reference module, what it is) for the mfjax model `name` at `resolution`."""
  import timm
  family = models.family_of(name)
  if name in ("deit_base_patch16", "dino_vitb16", "blip_vitb16"):
    return ViT(timm.create_model("vit_base_patch16_224", img_size=resolution, num_classes=0)), \
        "timm vit_base_patch16_224"
  if name.startswith("dinov2_vit"):
    size = _DINOV2_SIZES[name[len("dinov2_vit")]]
    timm_name = f"vit_{size}_patch14{'_reg4' if name.endswith('_reg4') else ''}_dinov2"
    return ViT(timm.create_model(timm_name, img_size=resolution, num_classes=0)), f"timm {timm_name}"
  if family == "dinov3":
    size = {"s": "small", "b": "base", "l": "large"}[name.split("_vit")[1][0]]
    # MedDINOv3 trains its ViT-B without qkv biases; DINOv3's released ViTs have them.
    timm_name = f"vit_{size}_patch16_dinov3{'' if name.startswith('med') else '_qkvb'}"
    return ViT(timm.create_model(timm_name, img_size=resolution, num_classes=0)), f"timm {timm_name}"
  if name == "openclip_vitb16":
    import open_clip
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=resolution)
    return OpenCLIP(model.visual), "open_clip ViT-B-16 visual"
  if name in _SAM:
    from segment_anything.modeling import ImageEncoderViT
    width, depth, heads, global_blocks = _SAM[name]
    net = ImageEncoderViT(img_size=resolution, embed_dim=width, depth=depth, num_heads=heads,
                          global_attn_indexes=global_blocks, window_size=14, use_rel_pos=True, out_chans=256,
                          qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    return SAM(net), "segment_anything ImageEncoderViT"
  if name == "seem_focalt":
    return SEEMFocalNet(seem_focalt_net()), "SEEM FocalNet-T (timm FocalNet + SEEM's focal_dw changes)"
  if family == "focalnet":
    return FocalNet(timm.create_model(name, num_classes=0, drop_path_rate=0.0)), f"timm {name}"
  if family == "resnet":
    import torchvision
    return ResNet(getattr(torchvision.models, name)()), f"torchvision {name}"
  raise ValueError(f"no PyTorch reference is wired for {name!r} (family {family}); references exist for "
                   "DeiT/DINO/BLIP/DINOv2/DINOv3/OpenCLIP ViTs, SAM, FocalNet and ResNet")


class StackedDeiT(nn.Module):
  """The paper's stacked classifier: Linear -> LayerNorm -> DeiT-B CLS + posemb -> 12 blocks -> norm -> fc."""

  def __init__(self, in_dim, num_tokens, num_classes, width=768, depth=12, heads=12):
    super().__init__()
    from timm.models.vision_transformer import Block
    self.projector = nn.Linear(in_dim, width)
    self.projector_norm = nn.LayerNorm(width)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + num_tokens, width) * 0.02)
    norm = functools.partial(nn.LayerNorm, eps=1e-6)
    self.blocks = nn.Sequential(*[Block(width, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
    self.norm = norm(width)
    self.fc = nn.Linear(width, num_classes)

  def forward(self, tokens):
    x = self.projector_norm(self.projector(tokens))
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    return self.fc(self.norm(self.blocks(x))[:, 0])


class Classifier(nn.Module):
  def __init__(self, foundation_module, head, num_classes, resolution):
    super().__init__()
    self.foundation = foundation_module
    self.head = head
    with torch.no_grad():
      pooled, tokens = foundation_module.eval()(torch.zeros(1, 3, resolution, resolution))
    if head == "linear":
      self.fc = nn.Linear(pooled.shape[-1], num_classes)
    else:
      self.stacked = StackedDeiT(tokens.shape[-1], tokens.shape[1], num_classes)

  def forward(self, x):
    pooled, tokens = self.foundation(x)
    return self.fc(pooled) if self.head == "linear" else self.stacked(tokens)


def classifier(name, resolution, num_classes, protocol, unfreeze_from=0, keep_blocks=0,
               decapitation_trained=False, head=None, num_blocks=None) -> tuple[Classifier, str]:
  """The reference classifier with `protocol` applied as mfjax applies it: the same head, the
  same trained parameters, the foundation in training mode only when all of it trains.
  `num_blocks`: keep the first blocks/stages only, as mfjax's `model.overrides.num_blocks`."""
  net, what = foundation(name, resolution)
  if protocol == "decapitation":
    net.cut(keep_blocks)
  elif num_blocks:
    net.cut(num_blocks)
    what += f", first {num_blocks} blocks"
  model = Classifier(net, protocols.head_of(protocol, head), num_classes, resolution)
  trains = protocols.foundation_trains(protocol, decapitation_trained)
  for p in net.parameters():
    p.requires_grad_(trains)
  if protocol == "progressive":
    for unit in list(net.units)[unfreeze_from:]:
      for p in unit.parameters():
        p.requires_grad_(True)
  model.train()
  net.train(trains)
  return model, what


def adamw(params, lr=1e-4, weight_decay=1e-5, b1=0.9, b2=0.999, eps=1e-8) -> tuple[torch.optim.Optimizer, str]:
  """torch AdamW, decay on matrices only (as mfjax); the fused kernel where this torch has it."""
  groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
  try:
    return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps, fused=True), "fused"
  except (RuntimeError, ValueError):
    return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps, foreach=True), "foreach"


def train_step(model, images, labels, device, bf16=False, compile_model=False, clip_norm=1.0,
               loss_fn=F.cross_entropy, optimizer=None):
  """One optimizer step (forward, loss (default CE), backward, grad clipping, AdamW (or
  `optimizer`: (torch optimizer, description))) as a no-argument function that returns when the
  step is done, and a description of the optimizer."""
  params = [p for p in model.parameters() if p.requires_grad]
  opt, kind = optimizer or adamw(params)
  net = torch.compile(model) if compile_model else model

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      logits = net(images)
    loss = loss_fn(logits.float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip_norm)
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()
    return loss

  return step, f"AdamW ({kind})"


def inference_step(model, images, device, bf16=False, compile_model=False):
  model.eval()
  net = torch.compile(model) if compile_model else model

  def step():
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      out = net(images)
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  return step


def count_flops(fn) -> float | None:
  """FLOPs of one call of `fn` as torch's FlopCounterMode counts them (matmuls and convolutions)."""
  from torch.utils.flop_counter import FlopCounterMode
  with FlopCounterMode(display=False) as counter:
    fn()
  return float(counter.get_total_flops())


# ------------------------------------------------------------------ MedDINOv3 segmentation


class LayerNormNd(nn.Module):
  """dynamic_network_architectures' LayerNormNd: LayerNorm over the channels of NCHW, eps 1e-6."""

  def __init__(self, channels):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(channels))
    self.bias = nn.Parameter(torch.zeros(channels))

  def forward(self, x):
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return self.weight[None, :, None, None] * (x - u) / torch.sqrt(s + 1e-6) + self.bias[None, :, None, None]


class PatchDecode(nn.Module):
  """MedDINOv3's PatchDecode: `decode` = stages x Sequential[ConvTranspose2d(2, 2), LayerNormNd, GELU],
  then a 1x1 Conv2d; its state dict has MedDINOv3's names (decode.{s}.0, decode.{s}.1, decode.{stages})."""

  def __init__(self, channels: int, num_classes: int, stages: int):
    super().__init__()
    blocks = []
    for _ in range(stages):
      blocks.append(nn.Sequential(nn.ConvTranspose2d(channels, channels // 2, 2, 2), LayerNormNd(channels // 2),
                                  nn.GELU()))
      channels //= 2
    self.decode = nn.Sequential(*blocks, nn.Conv2d(channels, num_classes, 1))

  def forward(self, x):
    return self.decode(x)


class Segmenter(nn.Module):
  """MedDINOv3's Primus_Multiscale on a timm DINOv3 (`vit`, or a random one of model `name`): 1 -> 3
  channels, normed intermediates of `indices` concatenated, PatchDecode to full-resolution logits.
  `depth` keeps the first blocks of a random one (`model.overrides.num_blocks` on the JAX side)."""

  def __init__(self, name: str, num_classes: int, indices=(2, 5, 8, 11), vit=None, depth=None):
    super().__init__()
    import timm
    if vit is None:
      timm_name = {"meddinov3_vitb16": "vit_base_patch16_dinov3", "dinov3_vitb16": "vit_base_patch16_dinov3_qkvb"}[name]
      vit = timm.create_model(timm_name, pretrained=False, norm_layer=functools.partial(timm.layers.LayerNorm, eps=1e-6),
                              **({"depth": depth} if depth else {}))
    self.vit = vit
    self.indices = list(indices)
    self.up_projection = PatchDecode(self.vit.embed_dim * len(self.indices), num_classes, 4)

  def forward(self, x):
    feats = self.vit.forward_intermediates(x.repeat(1, 3, 1, 1), indices=self.indices, norm=True,
                                           intermediates_only=True)
    return self.up_projection(torch.cat(feats, 1))


def resize_segmentation(labels, shape):
  """nnU-Net's label resampling as it runs: batchgenerators' resize_segmentation with order 1,
  nnU-Net's default for labels (each label value's mask resampled by skimage, the largest wins)."""
  from batchgenerators.augmentations.utils import resize_segmentation as nnunets
  return nnunets(labels, shape, order=1)


def dice_ce_loss(logits, target, smooth=1e-5, ignore_label=None):
  """nnU-Net's DC_and_CE_loss(batch_dice=True, do_bg=False, ignore_label) with
  MemoryEfficientSoftDiceLoss, NCHW."""
  mask = None if ignore_label is None else (target != ignore_label)[:, None]
  target_dice = target if mask is None else torch.where(mask[:, 0], target, 0)
  if ignore_label is None:
    ce = F.cross_entropy(logits, target)
  else:  # RobustCrossEntropyLoss(ignore_index), skipped when every pixel is ignored
    ce = F.cross_entropy(logits, target, ignore_index=ignore_label) if mask.sum() > 0 else 0
  x = torch.softmax(logits, 1)[:, 1:]
  with torch.no_grad():
    y = F.one_hot(target_dice, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(x.dtype)
    sum_gt = (y if mask is None else y * mask).sum((2, 3)).sum(0)
  if mask is None:
    intersect, sum_pred = (x * y).sum((2, 3)).sum(0), x.sum((2, 3)).sum(0)
  else:
    intersect, sum_pred = (x * y * mask).sum((2, 3)).sum(0), (x * mask).sum((2, 3)).sum(0)
  return ce - ((2 * intersect + smooth) / torch.clip(sum_gt + sum_pred + smooth, 1e-8)).mean()


def dice_bce_loss(logits, target, regions, smooth=1e-5, ignore_label=None):
  """nnU-Net's DC_and_BCE_loss (BCEWithLogitsLoss + MemoryEfficientSoftDiceLoss(sigmoid,
  batch_dice=True, do_bg=True), use_ignore_label) on region targets, NCHW; `regions`: lists of
  label values. With an ignore label the target gets its mask as a last channel, as nnU-Net's
  ConvertSegmentationToRegionsTransform does."""
  with torch.no_grad():
    channels = [torch.isin(target, torch.tensor(ids)) for ids in regions]
    if ignore_label is not None:
      channels.append(target == ignore_label)
    y = torch.stack(channels, 1).to(logits.dtype)
  if ignore_label is not None:
    mask, y = (1 - y[:, -1:]).bool(), y[:, :-1]
  else:
    mask = None
  x = torch.sigmoid(logits)
  if mask is None:
    bce = F.binary_cross_entropy_with_logits(logits, y)
    intersect, sum_pred, sum_gt = (x * y).sum((2, 3)).sum(0), x.sum((2, 3)).sum(0), y.sum((2, 3)).sum(0)
  else:
    bce = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * mask).sum() / torch.clip(
        mask.sum(), min=1e-8)
    intersect, sum_pred = (x * y * mask).sum((2, 3)).sum(0), (x * mask).sum((2, 3)).sum(0)
    sum_gt = (y * mask).sum((2, 3)).sum(0)
  return bce - ((2 * intersect + smooth) / torch.clip(sum_gt + sum_pred + smooth, 1e-8)).mean()


def segment_optimizer(model: Segmenter, lr_backbone=3e-5, lr_decoder=3e-4):
  """MedDINOv3's: AdamW (0.9, 0.98), weight decay 0.05 on every parameter, two learning rates."""
  groups = [{"params": list(model.vit.parameters()), "lr": lr_backbone},
            {"params": list(model.up_projection.parameters()), "lr": lr_decoder}]
  try:
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.05, fused=True), "AdamW, 2 groups (fused)"
  except (RuntimeError, ValueError):
    return (torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.05, foreach=True),
            "AdamW, 2 groups (foreach)")
