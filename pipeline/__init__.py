"""Bottleneck features from pretrained CNNs, cached in HDF5, for heads and fine-tuning."""

from pipeline.backbones import BackboneSpec, list_backbones, resolve_backbone
from pipeline.cache import cache_info, list_caches, read_split
from pipeline.compare import fit_heads
from pipeline.data import ImageSet, load_image_set
from pipeline.errors import BackboneError, CacheError, DataError, PipelineError, WeightsError
from pipeline.export import export_cache
from pipeline.extract import ExtractResult, extract_features
from pipeline.finetune import finetune, sweep_depths
from pipeline.heads import LinearProbe, LogRegHead, MLPHead, make_head
from pipeline.predict import predict_images
from pipeline.report import write_report

__all__ = [
    "BackboneError",
    "BackboneSpec",
    "CacheError",
    "DataError",
    "ExtractResult",
    "ImageSet",
    "LinearProbe",
    "LogRegHead",
    "MLPHead",
    "PipelineError",
    "WeightsError",
    "cache_info",
    "export_cache",
    "extract_features",
    "finetune",
    "fit_heads",
    "list_backbones",
    "list_caches",
    "load_image_set",
    "make_head",
    "predict_images",
    "read_split",
    "resolve_backbone",
    "sweep_depths",
    "write_report",
]
