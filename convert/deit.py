"""DeiT (ImageNet-1k supervised ViT-B/16): the original `deit_base_patch16_224-*.pth` and HF ViT folders.

original: {'model': timm-named state dict}; the classifier `head.*` is ignored. The position
  embedding is resized like the paper's DeiT: F.interpolate(scale_factor=sqrt(n_new/n_old)).
hf: a `ViTModel`/`ViTForImageClassification` folder (e.g. facebook/deit-base-patch16-224);
  resized like HF (F.interpolate(size=grid)); pooler and classifier ignored.
"""
from convert import core, vit

FORMATS = ("original", "hf")
NAME = "deit_base_patch16"


def add_arguments(parser):
  pass


def convert(state_dict, *, fmt="original", hf_config=None, source="checkpoint"):
  if fmt == "hf":
    return convert_hf(state_dict, hf_config, source)
  arch = vit.arch_timm(state_dict, source)
  conv = vit.new_conversion(state_dict, NAME, arch, source)
  vit.map_timm(conv, arch["depth"])
  conv.ignore(r"head\..*|head_dist\..*|fc_norm\..*")
  return NAME, arch, conv.finish()


def convert_hf(state, config, source):
  if vit.hf_model_type(config) not in ("vit", "deit"):
    raise core.ConversionError(f"{source}: model_type {config.get('model_type')!r} is not a HF ViT/DeiT")
  pre = vit.hf_prefix(state, "embeddings.cls_token", ("", "vit.", "deit."))
  if pre + "embeddings.distillation_token" in state:
    raise core.ConversionError(f"{source}: a distilled DeiT (distillation token) is not the paper's "
                               "DeiT-B; use the non-distilled checkpoint")
  arch = dict(vit.hf_common_arch(config), mlp_hidden=config["intermediate_size"],
              mlp_act=vit.hf_act(config, source), qkv_bias=config.get("qkv_bias", True), posemb="size")
  conv = vit.new_conversion(state, NAME, arch, source)
  vit.map_hf_embeddings(conv, pre + "embeddings.", "cls_token", "position_embeddings",
                        "patch_embeddings.projection")
  for i in range(arch["depth"]):
    vit.map_split_qkv_block(conv, f"params/blocks_{i}", f"{pre}encoder.layer.{i}", vit.HF_VIT_BLOCK)
  vit._map_norm(conv, "norm", pre + "layernorm")
  conv.ignore(r"(vit\.|deit\.)?pooler\..*|classifier\..*|(vit\.|deit\.)?embeddings\.mask_token")
  return NAME, arch, conv.finish()


def from_checkpoint(raw, hf_config, fmt, args):
  source = args.checkpoint
  if fmt == "hf":
    return convert_hf(raw, hf_config, source)
  return convert(core.flatten_state_dict(core.unwrap(raw, ["model", "state_dict"])), source=source)
