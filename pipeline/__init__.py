"""Bottleneck features from pretrained CNNs, cached in HDF5, for heads and fine-tuning."""

from pipeline.backbones import BackboneSpec, list_backbones, resolve_backbone
from pipeline.cache import cache_info, list_caches, read_split
from pipeline.data import ImageSet, load_image_set
from pipeline.errors import BackboneError, CacheError, DataError, PipelineError, WeightsError
from pipeline.extract import ExtractResult, extract_features

__all__ = [
    "BackboneError",
    "BackboneSpec",
    "CacheError",
    "DataError",
    "ExtractResult",
    "ImageSet",
    "PipelineError",
    "WeightsError",
    "cache_info",
    "extract_features",
    "list_backbones",
    "list_caches",
    "load_image_set",
    "read_split",
    "resolve_backbone",
]
