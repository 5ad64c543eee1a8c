"""Evaluation building blocks: pure functions that the CLI commands and training monitors call.

Import from the submodules (``from interclr_cli.eval.rankme import rankme``); this package
imports nothing itself, so importing it stays cheap.

- :mod:`.rankme` - RankMe effective rank (Garrido et al., ICML 2023)
- :mod:`.knn` - weighted kNN classification (Wu et al., CVPR 2018; DINO)
- :mod:`.metrics` - NMI, AMI, ARI, purity, Hungarian accuracy, ``cluster_report``
- :mod:`.linear` - linear evaluation on cached features, ``topk_accuracy``
- :mod:`.subsets` - stratified and list-based label subsets (ImageNet 1% / 10%)
- :mod:`.export` - torchvision-format safetensors, TorchScript, ONNX, MoCo checkpoint conversion
- :mod:`.contact_sheet` - PNG grids of cluster members
"""
