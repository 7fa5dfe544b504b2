"""Distillation: a stage-2 head on cached features taught by a fine-tuned network or a head.

- ``teacher.py``: the teacher (a ``.net`` or ``.head`` file) and its predictions on a cache's
  images and an unlabelled pool, stored once beside the caches;
- ``run.py``: :func:`distill`, the student trained on the soft targets, chosen on validation,
  and its rows beside the head without teacher and the teacher itself.

It sits above ``finetuning`` and ``deploy``: a fine-tuned teacher is rebuilt by
``pipeline.finetuning.network`` and run over images by ``pipeline.deploy.predict``.
"""
