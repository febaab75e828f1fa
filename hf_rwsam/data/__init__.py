"""Data for image classification with label noise: loaders, noise, transforms and the collator."""

from .collator import collate_images
from .indexed import ExampleIndexed
from .loading import DataUnavailableError, load_image_dataset
from .noise import NOISE_TYPES, add_label_noise, label_noise_info
from .transforms import image_transforms, prepare_dataset

__all__ = [
    "DataUnavailableError",
    "ExampleIndexed",
    "NOISE_TYPES",
    "add_label_noise",
    "collate_images",
    "image_transforms",
    "label_noise_info",
    "load_image_dataset",
    "prepare_dataset",
]
