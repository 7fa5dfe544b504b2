"""After the model ships: is the new data different, does it hurt, and what to retrain.

``pipeline drift NEW --against CACHE_OR_RESULTS`` (:func:`pipeline.drift.run.drift`). The
statistics live one idea per module: :mod:`~pipeline.drift.classifier` (the domain
classifier), :mod:`~pipeline.drift.kernel` (the MMD test), :mod:`~pipeline.drift.outputs`
(the model's predicted classes and softmax), :mod:`~pipeline.drift.harm` (ATC and the
measured accuracy). Importing this package loads no framework.
"""
