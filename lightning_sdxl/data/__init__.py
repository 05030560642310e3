"""Datasets and datamodules: the procedural toy world, a folder of real images, and prompts."""

from lightning_sdxl.data.coco import CocoCaptionsDataset
from lightning_sdxl.data.datamodules import (
    CocoCaptionsDataModule,
    FolderDataModule,
    ManifestDataModule,
    ToyWorldDataModule,
    WebDatasetDataModule,
)
from lightning_sdxl.data.folder import IMAGE_EXTENSIONS, FolderDataset
from lightning_sdxl.data.prompts import PromptDataset
from lightning_sdxl.data.toy_world import (
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeSpec,
    ToyWorld,
    render_scene,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_RGB",
    "IMAGE_EXTENSIONS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "CocoCaptionsDataModule",
    "CocoCaptionsDataset",
    "FolderDataModule",
    "FolderDataset",
    "ManifestDataModule",
    "PromptDataset",
    "Scene",
    "ShapeSpec",
    "ToyWorld",
    "ToyWorldDataModule",
    "WebDatasetDataModule",
    "render_scene",
]
