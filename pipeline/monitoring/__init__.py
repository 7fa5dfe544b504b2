"""After the model ships: is the new data different, does it hurt, and what to retrain.

``pipeline drift NEW --against CACHE_OR_RESULTS`` (:func:`pipeline.monitoring.run.drift`). The
statistics live one idea per module: :mod:`~pipeline.monitoring.classifier` (the domain
classifier), :mod:`~pipeline.monitoring.kernel` (the MMD test), :mod:`~pipeline.monitoring.novelty`
(new images unlike any reference image), :mod:`~pipeline.monitoring.outputs` (the model's
predicted classes and softmax), :mod:`~pipeline.monitoring.harm` (ATC and the
measured accuracy). Importing this package loads no framework.
"""
