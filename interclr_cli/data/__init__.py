"""The data layer: index a data root, load and augment images, sample and batch them."""

from .builtin import BUILTIN_DATASETS, resolve_builtin
from .datasets import ImageDataset, collate_skip, load_rgb
from .device_aug import DeviceAugment, crop_flip_transform
from .loader import build_eval_loader, build_loader, eval_shard, loader_from_config
from .memory import InMemoryImages
from .samplers import EpochBatchSampler, aug_seeds
from .sources import IMAGE_EXTENSIONS, SOURCES, FileIndex, index_source, resolve_eval_split
from .transforms import eval_transform, linear_train_transform, moco_v2_transform

__all__ = [
    "DeviceAugment",
    "InMemoryImages",
    "crop_flip_transform",
    "BUILTIN_DATASETS",
    "IMAGE_EXTENSIONS",
    "SOURCES",
    "EpochBatchSampler",
    "FileIndex",
    "ImageDataset",
    "aug_seeds",
    "build_eval_loader",
    "build_loader",
    "collate_skip",
    "eval_shard",
    "eval_transform",
    "index_source",
    "linear_train_transform",
    "load_rgb",
    "loader_from_config",
    "moco_v2_transform",
    "resolve_builtin",
    "resolve_eval_split",
]
