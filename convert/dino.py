"""DINOv1 ViT (`dino_vitbase16_pretrain.pth`, or a full training checkpoint's teacher).

The pretrain file is a flat timm-named state dict. A full checkpoint
(`dino_vitbase16_pretrain_full_checkpoint.pth`) holds {'teacher': {'backbone.*', 'head.*'},
'student': {'module.backbone.*', ...}, 'args': argparse.Namespace, ...}: the teacher backbone is
converted and its DINO head ignored. Position embeddings are resized as DINO does:
F.interpolate(scale_factor=(g + 0.1) / M).
"""
from convert import core, vit

FORMATS = ("original",)
NAME = "dino_vitb16"


def add_arguments(parser):
  parser.add_argument("--from-student", action="store_true",
                      help="in a full training checkpoint, convert the student instead of the teacher")


def convert(state_dict, *, source="checkpoint"):
  arch = vit.arch_timm(state_dict, source)
  conv = vit.new_conversion(state_dict, NAME, arch, source)
  vit.map_timm(conv, arch["depth"])
  conv.ignore(r"head\..*")  # the DINO projection head (full checkpoints) or a classifier
  return NAME, arch, conv.finish()


def from_checkpoint(raw, hf_config, fmt, args):
  if isinstance(raw, dict) and "teacher" in raw:
    if args.from_student and "student" not in raw:
      raise core.ConversionError(f"{args.checkpoint}: --from-student, but the checkpoint holds no 'student' "
                                 f"(its top-level keys: {sorted(raw)[:10]})")
    state = core.flatten_state_dict(raw["student" if args.from_student else "teacher"])
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
  elif args.from_student:
    raise core.ConversionError(f"{args.checkpoint}: --from-student reads a full training checkpoint "
                               "({'teacher': ..., 'student': ...}); this file holds one set of weights (the "
                               "pretrained teacher's): convert it without --from-student")
  else:
    state = core.flatten_state_dict(raw)
  return convert(state, source=args.checkpoint)
