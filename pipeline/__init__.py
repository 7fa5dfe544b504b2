"""Bottleneck features from pretrained CNNs, cached in HDF5, for heads and fine-tuning.

The public API below is imported on first use (PEP 562), so ``import pipeline`` loads no
framework and changes nothing in the process: torch, timm, scikit-learn and matplotlib are
imported by the functions that need them.
"""

from __future__ import annotations

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "BackboneError": "pipeline.core.errors",
    "CacheError": "pipeline.core.errors",
    "DataError": "pipeline.core.errors",
    "PipelineError": "pipeline.core.errors",
    "WeightsError": "pipeline.core.errors",
    "OptionError": "pipeline.core.errors",
    "MissingExtraError": "pipeline.core.errors",
    "Options": "pipeline.core.contract",
    "Result": "pipeline.core.contract",
    "BackboneSpec": "pipeline.models.backbone_spec",
    "list_backbones": "pipeline.models.backbones",
    "resolve_backbone": "pipeline.models.backbones",
    "parse_weights": "pipeline.models.weights",
    "ExtractOptions": "pipeline.core.options",
    "FinetuneOptions": "pipeline.core.options",
    "OptimizerOptions": "pipeline.core.options",
    "NetworkOptions": "pipeline.core.options",
    "TrainingOptions": "pipeline.core.options",
    "ActivationOptions": "pipeline.core.options",
    "PredictOptions": "pipeline.core.options",
    "HeadsOptions": "pipeline.core.options",
    "AuditOptions": "pipeline.core.options",
    "AdviseOptions": "pipeline.core.options",
    "ReportOptions": "pipeline.core.options",
    "ExportOptions": "pipeline.core.options",
    "CacheExportOptions": "pipeline.core.options",
    "cache_info": "pipeline.store.cache",
    "list_caches": "pipeline.store.catalog",
    "read_split": "pipeline.store.cache",
    "verify_cache": "pipeline.store.integrity",
    "fit_heads": "pipeline.heads.compare",
    "SelfTrainOptions": "pipeline.core.options",
    "DistillOptions": "pipeline.core.options",
    "self_train": "pipeline.heads.self_training",
    "SelfTrainResult": "pipeline.heads.self_training",
    "StudentHead": "pipeline.heads.student",
    "distill": "pipeline.distillation.run",
    "drift": "pipeline.monitoring.run",
    "DriftResult": "pipeline.monitoring.result",
    "DriftOptions": "pipeline.monitoring.options",
    "DistillResult": "pipeline.distillation.run",
    "HeadsResult": "pipeline.heads.compare",
    "audit": "pipeline.auditing.run",
    "AuditResult": "pipeline.auditing.run",
    "advise": "pipeline.advice.run",
    "AdviceResult": "pipeline.advice.rule",
    "ImageSet": "pipeline.data.images",
    "load_image_set": "pipeline.data.images",
    "decode_image": "pipeline.data.decode",
    "export_cache": "pipeline.store.export",
    "CacheExportResult": "pipeline.store.export",
    "ExtractResult": "pipeline.extract.features",
    "extract_features": "pipeline.extract.features",
    "finetune": "pipeline.finetuning.run",
    "FinetuneResult": "pipeline.finetuning.run",
    "sweep_depths": "pipeline.finetuning.run",
    "find_lr": "pipeline.finetuning.lr_find",
    "LinearProbe": "pipeline.heads",
    "LogRegHead": "pipeline.heads",
    "MLPHead": "pipeline.heads",
    "MultiLayerHead": "pipeline.heads",
    "make_head": "pipeline.heads",
    "predict_images": "pipeline.deploy.predict",
    "PredictResult": "pipeline.deploy.predict",
    "export_model": "pipeline.deploy.export",
    "ExportResult": "pipeline.deploy.export",
    "load_model": "pipeline.store.persistence",
    "FinetunedNetwork": "pipeline.finetuning.network",
    "compare_results": "pipeline.report.summary",
    "ReportResult": "pipeline.report.summary",
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
