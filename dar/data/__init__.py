"""Data in model space: datasets (:mod:`dar.data.datasets`), pre-computed VAE latents
(:mod:`dar.data.latents`) and pixel conversions and sample grids (:mod:`dar.data.images`)."""

from dar.data.datasets import (
    BACKGROUND,
    BUILTIN_PATH,
    DATASETS,
    FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    PADDED_SIZE,
    SPLITS,
    ArrayDataset,
    ImageFolderDataset,
    center_crop_arr,
    find_idx_file,
    load_builtin_arrays,
    load_idx_split,
    load_latents,
    make_dataset,
    read_idx,
)
from dar.data.images import pad_square, save_labelled_grid, to_uint8, uint8_to_model
from dar.data.latents import STORE_MODES, LatentShards

__all__ = [
    "BACKGROUND",
    "BUILTIN_PATH",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "PADDED_SIZE",
    "SPLITS",
    "STORE_MODES",
    "ArrayDataset",
    "ImageFolderDataset",
    "LatentShards",
    "center_crop_arr",
    "find_idx_file",
    "load_builtin_arrays",
    "load_idx_split",
    "load_latents",
    "make_dataset",
    "pad_square",
    "read_idx",
    "save_labelled_grid",
    "to_uint8",
    "uint8_to_model",
]
