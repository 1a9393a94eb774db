"""MedDINOv3 domain-adaptive pretraining: DINO + iBOT + KoLeo (+ Gram anchoring) on CT slices.

  heads.py     DINOv3's projection heads (separate DINO and iBOT heads)
  losses.py    Sinkhorn-Knopp centering, DINO CLS, iBOT masked-patch, KoLeo and Gram losses
  masking.py   DINOv2/DINOv3 block-wise iBOT masks
  augment.py   multi-crop of CT slices and MedDINOv3's CT input normalisation
  pretrain.py  `mfjax pretrain`: the training loop, from NIfTI folders to a converted backbone
"""
