"""Bottleneck features from pretrained CNNs, cached in HDF5, for heads and fine-tuning.

The public API below is imported on first use (PEP 562), so ``import pipeline`` loads no
framework and changes nothing in the process: torch, timm, scikit-learn and matplotlib are
imported by the functions that need them.
"""

from __future__ import annotations

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "BackboneError": "pipeline.errors",
    "CacheError": "pipeline.errors",
    "DataError": "pipeline.errors",
    "PipelineError": "pipeline.errors",
    "WeightsError": "pipeline.errors",
    "BackboneSpec": "pipeline.backbones",
    "list_backbones": "pipeline.backbones",
    "resolve_backbone": "pipeline.backbones",
    "parse_weights": "pipeline.weights",
    "ExtractOptions": "pipeline.options",
    "FinetuneConfig": "pipeline.options",
    "HeadsOptions": "pipeline.options",
    "cache_info": "pipeline.cache",
    "list_caches": "pipeline.cache",
    "read_split": "pipeline.cache",
    "verify_cache": "pipeline.cache",
    "fit_heads": "pipeline.compare",
    "ImageSet": "pipeline.data",
    "load_image_set": "pipeline.data",
    "export_cache": "pipeline.export",
    "ExtractResult": "pipeline.extract",
    "extract_features": "pipeline.extract",
    "finetune": "pipeline.finetune",
    "sweep_depths": "pipeline.finetune",
    "find_lr": "pipeline.lr_find",
    "LinearProbe": "pipeline.heads",
    "LogRegHead": "pipeline.heads",
    "MLPHead": "pipeline.heads",
    "make_head": "pipeline.heads",
    "predict_images": "pipeline.predict",
    "load_model": "pipeline.persistence",
    "FinetunedNetwork": "pipeline.network",
    "write_report": "pipeline.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
