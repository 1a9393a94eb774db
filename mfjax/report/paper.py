"""The paper's published numbers (Huix et al., WACV 2024), as data, and its names for things.

PUBLISHED is Tables 1, 2, 3, B.1 and B.2 verbatim: one row per (table, foundation state,
resolution, classifier, foundation, dataset) with the mean and std over the paper's five runs
(Table 3 prints no std). `published()` parses it; `lookup()` finds one cell.
"""
import csv
import functools
import io
import re

PUBLISHED = """\
table,foundation_state,resolution,classifier,foundation,dataset,metric,mean,std
table1,frozen,224,linear,dinov1,aptos2019,quadratic_kappa,0.878,0.004
table1,frozen,224,linear,dinov1,cbis_ddsm,roc_auc,0.912,0.002
table1,frozen,224,linear,dinov1,isic2019,macro_recall,0.588,0.015
table1,frozen,224,linear,dinov1,chexpert,mean_roc_auc,0.738,0.001
table1,frozen,224,linear,imnet1k_sup,aptos2019,quadratic_kappa,0.864,0.007
table1,frozen,224,linear,imnet1k_sup,cbis_ddsm,roc_auc,0.908,0.001
table1,frozen,224,linear,imnet1k_sup,isic2019,macro_recall,0.513,0.015
table1,frozen,224,linear,imnet1k_sup,chexpert,mean_roc_auc,0.719,0.001
table1,frozen,224,linear,resnet152,aptos2019,quadratic_kappa,0.824,0.003
table1,frozen,224,linear,resnet152,cbis_ddsm,roc_auc,0.883,0.001
table1,frozen,224,linear,resnet152,isic2019,macro_recall,0.461,0.027
table1,frozen,224,linear,resnet152,chexpert,mean_roc_auc,0.712,0.000
table1,frozen,224,linear,sam,aptos2019,quadratic_kappa,0.873,0.010
table1,frozen,224,linear,sam,cbis_ddsm,roc_auc,0.916,0.004
table1,frozen,224,linear,sam,isic2019,macro_recall,0.402,0.014
table1,frozen,224,linear,sam,chexpert,mean_roc_auc,0.724,0.001
table1,frozen,224,linear,seem,aptos2019,quadratic_kappa,0.852,0.003
table1,frozen,224,linear,seem,cbis_ddsm,roc_auc,0.891,0.001
table1,frozen,224,linear,seem,isic2019,macro_recall,0.527,0.007
table1,frozen,224,linear,seem,chexpert,mean_roc_auc,0.731,0.001
table1,frozen,224,linear,openclip,aptos2019,quadratic_kappa,0.857,0.003
table1,frozen,224,linear,openclip,cbis_ddsm,roc_auc,0.897,0.002
table1,frozen,224,linear,openclip,isic2019,macro_recall,0.489,0.010
table1,frozen,224,linear,openclip,chexpert,mean_roc_auc,0.702,0.001
table1,frozen,224,linear,dinov2,aptos2019,quadratic_kappa,0.881,0.002
table1,frozen,224,linear,dinov2,cbis_ddsm,roc_auc,0.905,0.001
table1,frozen,224,linear,dinov2,isic2019,macro_recall,0.569,0.012
table1,frozen,224,linear,dinov2,chexpert,mean_roc_auc,0.722,0.000
table1,frozen,224,linear,blip,aptos2019,quadratic_kappa,0.818,0.014
table1,frozen,224,linear,blip,cbis_ddsm,roc_auc,0.845,0.005
table1,frozen,224,linear,blip,isic2019,macro_recall,0.416,0.021
table1,frozen,224,linear,blip,chexpert,mean_roc_auc,0.647,0.000
table1,frozen,224,deit_b,sam,aptos2019,quadratic_kappa,0.890,0.005
table1,frozen,224,deit_b,sam,cbis_ddsm,roc_auc,0.940,0.007
table1,frozen,224,deit_b,sam,isic2019,macro_recall,0.740,0.015
table1,frozen,224,deit_b,sam,chexpert,mean_roc_auc,0.788,0.003
table1,frozen,224,deit_b,seem,aptos2019,quadratic_kappa,0.887,0.002
table1,frozen,224,deit_b,seem,cbis_ddsm,roc_auc,0.925,0.006
table1,frozen,224,deit_b,seem,isic2019,macro_recall,0.747,0.028
table1,frozen,224,deit_b,seem,chexpert,mean_roc_auc,0.777,0.001
table1,frozen,224,deit_b,openclip,aptos2019,quadratic_kappa,0.903,0.006
table1,frozen,224,deit_b,openclip,cbis_ddsm,roc_auc,0.948,0.004
table1,frozen,224,deit_b,openclip,isic2019,macro_recall,0.748,0.010
table1,frozen,224,deit_b,openclip,chexpert,mean_roc_auc,0.790,0.001
table1,frozen,224,deit_b,dinov2,aptos2019,quadratic_kappa,0.901,0.005
table1,frozen,224,deit_b,dinov2,cbis_ddsm,roc_auc,0.945,0.008
table1,frozen,224,deit_b,dinov2,isic2019,macro_recall,0.790,0.010
table1,frozen,224,deit_b,dinov2,chexpert,mean_roc_auc,0.798,0.001
table1,frozen,224,deit_b,blip,aptos2019,quadratic_kappa,0.895,0.009
table1,frozen,224,deit_b,blip,cbis_ddsm,roc_auc,0.945,0.004
table1,frozen,224,deit_b,blip,isic2019,macro_recall,0.763,0.011
table1,frozen,224,deit_b,blip,chexpert,mean_roc_auc,0.785,0.000
table2,unfrozen,224,linear,dinov1,aptos2019,quadratic_kappa,0.886,0.004
table2,unfrozen,224,linear,dinov1,cbis_ddsm,roc_auc,0.958,0.004
table2,unfrozen,224,linear,dinov1,isic2019,macro_recall,0.775,0.007
table2,unfrozen,224,linear,dinov1,chexpert,mean_roc_auc,0.794,0.001
table2,unfrozen,224,linear,imnet1k_sup,aptos2019,quadratic_kappa,0.904,0.006
table2,unfrozen,224,linear,imnet1k_sup,cbis_ddsm,roc_auc,0.960,0.003
table2,unfrozen,224,linear,imnet1k_sup,isic2019,macro_recall,0.823,0.008
table2,unfrozen,224,linear,imnet1k_sup,chexpert,mean_roc_auc,0.797,0.002
table2,unfrozen,224,linear,resnet152,aptos2019,quadratic_kappa,0.899,0.002
table2,unfrozen,224,linear,resnet152,cbis_ddsm,roc_auc,0.960,0.003
table2,unfrozen,224,linear,resnet152,isic2019,macro_recall,0.817,0.007
table2,unfrozen,224,linear,resnet152,chexpert,mean_roc_auc,0.807,0.000
table2,unfrozen,224,linear,sam,aptos2019,quadratic_kappa,0.894,0.007
table2,unfrozen,224,linear,sam,cbis_ddsm,roc_auc,0.950,0.006
table2,unfrozen,224,linear,sam,isic2019,macro_recall,0.798,0.010
table2,unfrozen,224,linear,sam,chexpert,mean_roc_auc,0.801,0.001
table2,unfrozen,224,linear,seem,aptos2019,quadratic_kappa,0.902,0.003
table2,unfrozen,224,linear,seem,cbis_ddsm,roc_auc,0.958,0.003
table2,unfrozen,224,linear,seem,isic2019,macro_recall,0.835,0.009
table2,unfrozen,224,linear,seem,chexpert,mean_roc_auc,0.808,0.001
table2,unfrozen,224,linear,openclip,aptos2019,quadratic_kappa,0.903,0.013
table2,unfrozen,224,linear,openclip,cbis_ddsm,roc_auc,0.945,0.012
table2,unfrozen,224,linear,openclip,isic2019,macro_recall,0.818,0.008
table2,unfrozen,224,linear,openclip,chexpert,mean_roc_auc,0.806,0.001
table2,unfrozen,224,linear,dinov2,aptos2019,quadratic_kappa,0.909,0.009
table2,unfrozen,224,linear,dinov2,cbis_ddsm,roc_auc,0.966,0.003
table2,unfrozen,224,linear,dinov2,isic2019,macro_recall,0.859,0.007
table2,unfrozen,224,linear,dinov2,chexpert,mean_roc_auc,0.812,0.001
table2,unfrozen,224,linear,blip,aptos2019,quadratic_kappa,0.891,0.006
table2,unfrozen,224,linear,blip,cbis_ddsm,roc_auc,0.961,0.003
table2,unfrozen,224,linear,blip,isic2019,macro_recall,0.798,0.016
table2,unfrozen,224,linear,blip,chexpert,mean_roc_auc,0.797,0.000
table2,unfrozen,224,deit_b,sam,aptos2019,quadratic_kappa,0.890,0.005
table2,unfrozen,224,deit_b,sam,cbis_ddsm,roc_auc,0.951,0.004
table2,unfrozen,224,deit_b,sam,isic2019,macro_recall,0.778,0.013
table2,unfrozen,224,deit_b,sam,chexpert,mean_roc_auc,0.796,0.002
table2,unfrozen,224,deit_b,seem,aptos2019,quadratic_kappa,0.901,0.007
table2,unfrozen,224,deit_b,seem,cbis_ddsm,roc_auc,0.946,0.002
table2,unfrozen,224,deit_b,seem,isic2019,macro_recall,0.808,0.022
table2,unfrozen,224,deit_b,seem,chexpert,mean_roc_auc,0.802,0.001
table2,unfrozen,224,deit_b,openclip,aptos2019,quadratic_kappa,0.907,0.011
table2,unfrozen,224,deit_b,openclip,cbis_ddsm,roc_auc,0.955,0.010
table2,unfrozen,224,deit_b,openclip,isic2019,macro_recall,0.809,0.013
table2,unfrozen,224,deit_b,openclip,chexpert,mean_roc_auc,0.805,0.001
table2,unfrozen,224,deit_b,dinov2,aptos2019,quadratic_kappa,0.904,0.007
table2,unfrozen,224,deit_b,dinov2,cbis_ddsm,roc_auc,0.966,0.004
table2,unfrozen,224,deit_b,dinov2,isic2019,macro_recall,0.822,0.011
table2,unfrozen,224,deit_b,dinov2,chexpert,mean_roc_auc,0.812,0.001
table2,unfrozen,224,deit_b,blip,aptos2019,quadratic_kappa,0.897,0.001
table2,unfrozen,224,deit_b,blip,cbis_ddsm,roc_auc,0.955,0.002
table2,unfrozen,224,deit_b,blip,isic2019,macro_recall,0.806,0.016
table2,unfrozen,224,deit_b,blip,chexpert,mean_roc_auc,0.799,0.000
table3,unfrozen,1024,linear,sam,aptos2019,quadratic_kappa,0.908,
table3,unfrozen,1024,linear,sam,cbis_ddsm,roc_auc,0.984,
table3,unfrozen,1024,linear,sam,isic2019,macro_recall,0.804,
table3,unfrozen,1024,linear,sam,chexpert,mean_roc_auc,0.820,
table3,unfrozen,1024,linear,seem,aptos2019,quadratic_kappa,0.911,
table3,unfrozen,1024,linear,seem,cbis_ddsm,roc_auc,0.967,
table3,unfrozen,1024,linear,seem,isic2019,macro_recall,0.868,
table3,unfrozen,1024,linear,seem,chexpert,mean_roc_auc,0.821,
table3,unfrozen,1024,linear,openclip,aptos2019,quadratic_kappa,0.904,
table3,unfrozen,1024,linear,openclip,cbis_ddsm,roc_auc,0.980,
table3,unfrozen,1024,linear,openclip,isic2019,macro_recall,0.852,
table3,unfrozen,1024,linear,openclip,chexpert,mean_roc_auc,0.813,
table3,unfrozen,1024,linear,dinov2,aptos2019,quadratic_kappa,0.917,
table3,unfrozen,1024,linear,dinov2,cbis_ddsm,roc_auc,0.983,
table3,unfrozen,1024,linear,dinov2,isic2019,macro_recall,0.895,
table3,unfrozen,1024,linear,dinov2,chexpert,mean_roc_auc,0.825,
table3,unfrozen,1024,linear,blip,aptos2019,quadratic_kappa,0.909,
table3,unfrozen,1024,linear,blip,cbis_ddsm,roc_auc,0.984,
table3,unfrozen,1024,linear,blip,isic2019,macro_recall,0.839,
table3,unfrozen,1024,linear,blip,chexpert,mean_roc_auc,0.813,
tableB1,frozen,224,linear,resnet152,aptos2019,quadratic_kappa,0.824,0.003
tableB1,frozen,224,linear,resnet152,cbis_ddsm,roc_auc,0.883,0.001
tableB1,frozen,224,linear,resnet152,isic2019,macro_recall,0.461,0.027
tableB1,frozen,224,linear,resnet152,chexpert,mean_roc_auc,0.712,0.000
tableB1,frozen,224,linear,resnet152_dino_indomain,aptos2019,quadratic_kappa,0.855,0.004
tableB1,frozen,224,linear,resnet152_dino_indomain,cbis_ddsm,roc_auc,0.920,0.001
tableB1,frozen,224,linear,resnet152_dino_indomain,isic2019,macro_recall,0.610,0.020
tableB1,frozen,224,linear,resnet152_dino_indomain,chexpert,mean_roc_auc,0.708,0.000
tableB1,frozen,224,linear,dinov2,aptos2019,quadratic_kappa,0.881,0.002
tableB1,frozen,224,linear,dinov2,cbis_ddsm,roc_auc,0.905,0.001
tableB1,frozen,224,linear,dinov2,isic2019,macro_recall,0.569,0.012
tableB1,frozen,224,linear,dinov2,chexpert,mean_roc_auc,0.722,0.000
tableB2,unfrozen,224,linear,resnet152,aptos2019,quadratic_kappa,0.899,0.002
tableB2,unfrozen,224,linear,resnet152,cbis_ddsm,roc_auc,0.960,0.003
tableB2,unfrozen,224,linear,resnet152,isic2019,macro_recall,0.817,0.007
tableB2,unfrozen,224,linear,resnet152,chexpert,mean_roc_auc,0.807,0.000
tableB2,unfrozen,224,linear,resnet152_dino_indomain,aptos2019,quadratic_kappa,0.898,0.006
tableB2,unfrozen,224,linear,resnet152_dino_indomain,cbis_ddsm,roc_auc,0.954,0.004
tableB2,unfrozen,224,linear,resnet152_dino_indomain,isic2019,macro_recall,0.818,0.002
tableB2,unfrozen,224,linear,resnet152_dino_indomain,chexpert,mean_roc_auc,0.810,0.000
tableB2,unfrozen,224,linear,dinov2,aptos2019,quadratic_kappa,0.909,0.009
tableB2,unfrozen,224,linear,dinov2,cbis_ddsm,roc_auc,0.966,0.003
tableB2,unfrozen,224,linear,dinov2,isic2019,macro_recall,0.859,0.007
tableB2,unfrozen,224,linear,dinov2,chexpert,mean_roc_auc,0.812,0.001
"""

# Table 3 prints, in parentheses, the gain in points (x100) over the lower resolution. Most
# equal Table 3 minus Table 2's linear row; BLIP's four equal Table 3 minus Table 2's DeiT-B row,
# and SEEM/DDSM's (0.2) matches neither (0.967 - 0.958 = 0.9). Kept as printed.
TABLE3_PRINTED_GAIN = {
    "sam": (1.4, 3.4, 0.6, 1.9),
    "seem": (0.9, 0.2, 3.3, 1.3),
    "openclip": (0.1, 3.5, 3.4, 0.7),
    "dinov2": (0.8, 1.7, 3.6, 1.3),
    "blip": (1.2, 2.9, 3.3, 1.4),
}

DATASETS = ("aptos2019", "cbis_ddsm", "isic2019", "chexpert")  # the paper's column order
DATASET_TITLES = {"aptos2019": "APTOS2019, κ", "cbis_ddsm": "DDSM, AUC", "isic2019": "ISIC2019, Rec.",
                  "chexpert": "CheXpert, AUC"}
# The paper's metric per dataset, and mfjax's headline metric that computes the same quantity.
METRICS = {"aptos2019": "quadratic_kappa", "cbis_ddsm": "roc_auc", "isic2019": "macro_recall",
           "chexpert": "mean_roc_auc"}
SAME_METRIC = {"quadratic_kappa": "quadratic_kappa", "roc_auc": "roc_auc", "macro_recall": "macro_recall",
               "mean_auc": "mean_roc_auc"}

# mfjax model name -> the paper's foundation key (as in PUBLISHED).
FOUNDATIONS = {
    "deit_base_patch16": "imnet1k_sup",
    "dino_vitb16": "dinov1",
    "resnet152": "resnet152",
    "sam_vitb": "sam",
    "seem_focalt": "seem",
    "openclip_vitb16": "openclip",
    "dinov2_vitb14": "dinov2",
    "blip_vitb16": "blip",
}
FOUNDATION_TITLES = {"imnet1k_sup": "ImNet-1k-Sup", "dinov1": "DINOv1", "resnet152": "ResNet152", "sam": "SAM",
                     "seem": "SEEM", "openclip": "OpenCLIP", "dinov2": "DINOv2", "blip": "BLIP",
                     "resnet152_dino_indomain": "ResNet152 (in-domain DINOv1)"}
FOUNDATION_ORDER = ("dinov1", "imnet1k_sup", "resnet152", "sam", "seem", "openclip", "dinov2", "blip")
# Other sizes and variants of the paper's foundations (Fig. 6 uses the DINOv2 sizes).
SIZES = {"s": "ViT-S/14", "b": "ViT-B/14", "l": "ViT-L/14", "g": "ViT-g/14"}
VARIANT_TITLES = {**{f"dinov2_vit{s}14": f"DINOv2 {t}" for s, t in SIZES.items() if s != "b"},
                  **{f"dinov2_vit{s}14_reg4": f"DINOv2 {t} reg4" for s, t in SIZES.items()}}
CLASSIFIERS = {"linear": "Linear", "deit": "DeiT-B"}
BASELINE_MODEL = "deit_base_patch16"  # ImNet-1k-Sup, the paper's baseline


@functools.cache
def published() -> tuple[dict, ...]:
  """Every published cell as a dict with typed mean/std (std None where the paper prints none)."""
  rows = []
  for row in csv.DictReader(io.StringIO(PUBLISHED)):
    row["resolution"] = int(row["resolution"])
    row["mean"] = float(row["mean"])
    row["std"] = float(row["std"]) if row["std"] else None
    rows.append(row)
  return tuple(rows)


def lookup(state: str, resolution: int, classifier: str, foundation: str, dataset: str) -> dict | None:
  """The published cell of Tables 1-3 (frozen/unfrozen, 224 or 1024 px, linear/deit_b), or None."""
  classifier = {"deit": "deit_b"}.get(classifier, classifier)
  for row in published():
    if (row["table"] in ("table1", "table2", "table3") and row["foundation_state"] == state
        and row["resolution"] == resolution and row["classifier"] == classifier
        and row["foundation"] == foundation and row["dataset"] == dataset):
      return row
  return None


def foundation_of(model: str) -> str | None:
  return FOUNDATIONS.get(model)


def title_of(model: str) -> str:
  """The paper's name for a model (e.g. DINOv2), or the mfjax name when the paper has none."""
  key = FOUNDATIONS.get(model)
  return FOUNDATION_TITLES[key] if key else VARIANT_TITLES.get(model, model)


# MedDINOv3 (Li et al., arXiv 2509.02379) on AMOS22: mean Dice of its Tables 1 and 3 as quoted in
# the authors' repository (issue #4). Its segmentation network with the original DINOv3 ViT-B/16
# weights, and with MedDINOv3's CT-3M weights. Its third figure, 0.7839, is DINOv3 ViT-B under a plain
# Primus decoder, which mfjax does not build.
MEDDINOV3_AMOS22_DICE = {"dinov3_vitb16": 0.8481, "meddinov3_vitb16": 0.8551}


def meddinov3_published(dataset: str, model: str, backbone: str) -> float | None:
  """MedDINOv3's published AMOS22 mean Dice for an `mfjax segment` run on an AMOS dataset (its
  name holds "AMOS") from converted DINOv3 or MedDINOv3 weights; None for anything else."""
  if backbone == "random init" or not re.search("amos", dataset, re.IGNORECASE):
    return None
  return MEDDINOV3_AMOS22_DICE.get(model)
