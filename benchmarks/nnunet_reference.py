"""nnU-Net's side of a MedDINOv3 network it trained, for tests and benchmarks: random DINOv3
weights under the official release's keys (and timm's model loaded from them), the torch
Primus_Multiscale its predictor runs (`torch_reference.Segmenter` on that model), and the model
folder nnU-Net writes (plans.json, dataset.json, fold_0/checkpoint_final.pth), plus CT-like
input volumes."""
import json
import os

import nibabel as nib
import numpy as np
import timm
import torch
from timm.models.eva import checkpoint_filter_fn

from benchmarks import torch_reference

TRAINER = "meddinov3_base_primus_multiscale_Trainer"
CLASSES = {"background": 0, "liver": 1, "kidney": 2}
DATASET = {"channel_names": {"0": "CT"}, "labels": CLASSES, "numTraining": 3, "file_ending": ".nii.gz"}


def official_state(width=768, depth=12, heads=12, qkv_bias=True, seed=0) -> dict[str, torch.Tensor]:
  """Random tensors under the official release's keys; the key third of qkv.bias is non-zero but masked."""
  gen = torch.Generator().manual_seed(seed)
  rand = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=gen)
  head_dim = width // heads
  state = {
      "cls_token": rand(1, 1, width), "storage_tokens": rand(1, 4, width), "mask_token": rand(1, width),
      "patch_embed.proj.weight": rand(width, 3, 16, 16, scale=768 ** -0.5),
      "patch_embed.proj.bias": rand(width, scale=0.1),
      # The release stores its periods buffer in bfloat16.
      "rope_embed.periods": (100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))).to(torch.bfloat16),
      "norm.weight": 1 + rand(width, scale=0.2), "norm.bias": rand(width, scale=0.1),
  }
  for i in range(depth):
    b = f"blocks.{i}."
    state.update({
        b + "norm1.weight": 1 + rand(width, scale=0.2), b + "norm1.bias": rand(width, scale=0.1),
        b + "attn.qkv.weight": rand(3 * width, width, scale=width ** -0.5),
        b + "attn.proj.weight": rand(width, width, scale=width ** -0.5), b + "attn.proj.bias": rand(width, scale=0.1),
        b + "ls1.gamma": rand(width, scale=0.3),
        b + "norm2.weight": 1 + rand(width, scale=0.2), b + "norm2.bias": rand(width, scale=0.1),
        b + "mlp.fc1.weight": rand(4 * width, width, scale=width ** -0.5),
        b + "mlp.fc1.bias": rand(4 * width, scale=0.1),
        b + "mlp.fc2.weight": rand(width, 4 * width, scale=(4 * width) ** -0.5),
        b + "mlp.fc2.bias": rand(width, scale=0.1),
        b + "ls2.gamma": rand(width, scale=0.3),
    })
    if qkv_bias:
      state[b + "attn.qkv.bias"] = rand(3 * width, scale=0.1)
      state[b + "attn.qkv.bias_mask"] = torch.cat([torch.ones(width), torch.zeros(width), torch.ones(width)])
  return state


def timm_reference(name: str, state: dict, **kwargs):
  """A timm DINOv3 loaded from an official-layout state dict by timm's own checkpoint filter."""
  model = timm.create_model(name, pretrained=False, **kwargs).eval()
  model.load_state_dict(checkpoint_filter_fn(dict(state), model), strict=True)
  return model


def random_network(seed: int = 11, num_classes: int = len(CLASSES), width: int = 768, depth: int = 12,
                   heads: int = 12):
  """(official-layout backbone state, the torch Primus on it): a random MedDINOv3 ViT (no qkv bias,
  LayerNorm eps 1e-6) and a decoder perturbed away from its init so every class is predicted
  somewhere."""
  import functools
  backbone = official_state(width, depth, heads, qkv_bias=False, seed=seed)
  vit = timm_reference("vit_base_patch16_dinov3", backbone, norm_layer=functools.partial(timm.layers.LayerNorm, eps=1e-6))
  torch.manual_seed(seed)
  net = torch_reference.Segmenter("meddinov3_vitb16", num_classes, vit=vit).eval()
  with torch.no_grad():
    for p in net.up_projection.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return backbone, net


def nnunet_plans(transpose, spacing_2d, patch, reader="SimpleITKIO") -> dict:
  """A plans.json as nnU-Net's ExperimentPlanner writes it, with one 2-D configuration."""
  resampling = lambda is_seg, order: {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}
  config = {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 12,
            "patch_size": list(patch), "median_image_size_in_voxels": list(patch), "spacing": list(spacing_2d),
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resampling(False, 3), "resampling_fn_seg_kwargs": resampling(True, 1),
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": resampling(False, 1),
            "architecture": {"network_class_name": "Primus_Multiscale", "arch_kwargs": {}, "_kw_requires_import": []},
            "batch_dice": True}
  return {"dataset_name": "Dataset042_Synth", "plans_name": "nnUNetPlans",
          "original_median_spacing_after_transp": [3.0, *spacing_2d], "original_median_shape_after_transp": [6, 60, 50],
          "image_reader_writer": reader, "transpose_forward": list(transpose),
          "transpose_backward": [int(a) for a in np.argsort(transpose)],
          "configurations": {"2d": config, "3d_fullres": {**config, "patch_size": [6, 32, 48]}},
          "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
          "foreground_intensity_properties_per_channel": {"0": {
              "max": 400.0, "mean": 60.0, "median": 55.0, "min": -300.0, "percentile_00_5": -150.0,
              "percentile_99_5": 300.0, "std": 80.0}}}


def model_folder(root, backbone, net, plans, dataset=None, extra_weights=None) -> str:
  """nnUNet_results/Dataset042_Synth/TRAINER__nnUNetPlans__2d with fold_0/checkpoint_final.pth as
  nnU-Net saves it (init_args with a torch.device, its log with NumPy floats)."""
  folder = os.path.join(str(root), "nnUNet_results", "Dataset042_Synth", f"{TRAINER}__nnUNetPlans__2d")
  os.makedirs(os.path.join(folder, "fold_0"), exist_ok=True)
  weights = {**{"dino_encoder." + k: v for k, v in backbone.items()},
             **{"up_projection." + k: v for k, v in net.up_projection.state_dict().items()}, **(extra_weights or {})}
  torch.save({"network_weights": weights, "trainer_name": TRAINER, "current_epoch": 1000,
              "init_args": {"configuration": "2d", "fold": 0, "device": torch.device("cpu"), "plans": plans},
              "inference_allowed_mirroring_axes": (0, 1), "optimizer_state": {"state": {}, "param_groups": []},
              "logging": {"ema_fg_dice": [np.float64(0.25), np.float64(0.5)], "epoch_end_timestamps": [1.5]}},
             os.path.join(folder, "fold_0", "checkpoint_final.pth"))
  dataset = dataset or DATASET
  for name, content in (("plans.json", plans), ("dataset.json", dataset)):
    with open(os.path.join(folder, name), "w") as f:
      json.dump(content, f)
  return folder


def ct_volume(path, shape, affine, seed=3):
  """A CT-like volume, zero outside the scanned body (so nnU-Net's crop to nonzero acts), in the
  file orientation `affine` gives."""
  rng = np.random.default_rng(seed)
  volume = np.zeros(shape, np.float32)
  body = tuple(slice(s // 10, s - s // 10) if s > 10 else slice(None) for s in shape)
  volume[body] = rng.normal(40, 90, volume[body].shape)
  organ = tuple(slice(s // 5, s // 2) if s > 10 else slice(None) for s in shape)
  volume[organ] += 150
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(volume, affine), path)
  return path
