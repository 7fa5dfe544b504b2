"""distill: a student taught by a fine-tuned network or a head; stored teacher predictions
reused; the student exported; teachers that cannot teach refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.options import DistillOptions
from pipeline.deploy.export import ExportOptions, export_model
from pipeline.distillation import teacher as teacher_module
from pipeline.distillation.run import distill
from pipeline.distillation.teacher import TeacherError
from pipeline.finetuning.network import FinetunedNetwork
from pipeline.heads.logreg import LogRegHead
from pipeline.models.backbones import build_classifier, replace_classifier, resolve_backbone
from pipeline.store.cache import cache_info, read_split
from pipeline.store.persistence import load_head, save_head
from tests.conftest import extract_tiny, fit_and_write, make_split_folder, write_image
from tests.heads.unlabelled_data import one_torch_thread, planted_pair

one_thread = pytest.fixture(autouse=True)(one_torch_thread)
FAST = DistillOptions(temperatures=(2.0,), alphas=(0.5,), student="linear")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny split image set and a flat pool folder, their caches (random-init resnet18), a
    head teacher and a fine-tuned network teacher."""
    root = tmp_path_factory.mktemp("distill")
    data = make_split_folder(root / "images", {"train": 6, "val": 3, "test": 4})
    for i in range(8):
        write_image(root / "pool" / f"{i:02d}.png", seed=500 + i)
    cache = extract_tiny(data, cache_dir=root / "cache").cache_path
    pool = extract_tiny(root / "pool", cache_dir=root / "cache").cache_path
    heads = fit_and_write([cache], root / "heads", heads=("logreg",))
    info = cache_info(cache)
    spec = resolve_backbone("resnet18", "none", image_size=32)
    module = build_classifier(spec)
    replace_classifier(spec, module, len(info["classes"]))
    with torch.no_grad():
        module.fc.weight.mul_(4)
    net = FinetunedNetwork.from_module(module, spec, info["classes"], request=info["request"],
                                       cache_key=info["key"], unfrozen=1).save(root / "t.net")
    return {"cache": cache, "pool": pool, "head": Path(heads.rows[0]["model"]), "net": net,
            "root": root}


def test_a_network_teacher_gives_three_paired_rows_and_is_asked_once(real, monkeypatch):
    result = distill(real["cache"], teacher=real["net"], pool=real["pool"], options=FAST,
                     progress=False)
    student, alone, teacher = result.rows
    assert student["head"] == "linear+distill" and alone["head"] == "linear (no teacher)"
    assert teacher["head"] == "teacher finetune-1" and teacher["method"] == "fine-tune"
    assert {r["test_n"] for r in result.rows} == {8} and result.pool["pool_used"] == 8
    assert 0 <= student["agreement_ci_low"] <= student["agreement"] <= \
        student["agreement_ci_high"] <= 1
    assert student["base_head"] == alone["head"] and "p_vs_base" in student
    assert not result.teacher["reused"]
    stores = sorted(Path(real["cache"]).parent.glob("*.teacher-*.npz"))
    assert len(stores) == 2  # beside the labelled cache and beside the pool
    stamps = [s.stat().st_mtime_ns for s in stores]

    def asked(*_args, **_kwargs):
        raise AssertionError("the teacher was run again")

    monkeypatch.setattr(teacher_module, "_network_targets", asked)
    again = distill(real["cache"], teacher=real["net"], pool=real["pool"], options=FAST,
                    progress=False)
    assert again.teacher["reused"] and [s.stat().st_mtime_ns for s in stores] == stamps
    assert again.rows[2]["test_accuracy"] == teacher["test_accuracy"]


def test_the_student_is_saved_and_exported_like_any_head(real, tmp_path):
    result = distill(real["cache"], teacher=real["head"], options=FAST, progress=False)
    files = result.write(tmp_path / "out")
    assert {"results.json", "grid.md", "run.json"} <= {f.name for f in files}
    student = Path(result.rows[0]["model"])
    saved = load_head(student)
    assert saved.meta["head"] == "linear+distill"
    exported = export_model(student, options=ExportOptions(format="torchscript"))
    assert exported.write(tmp_path / "student.pt") == [tmp_path / "student.pt"]
    assert exported.path.exists() and exported.classes == cache_info(real["cache"])["classes"]
    test = read_split(real["cache"], "test")
    np.testing.assert_allclose(saved.estimator.predict_proba(test.X),
                               result.predictions["linear+distill"].proba, atol=1e-6)


def test_a_teacher_of_other_classes_or_features_is_refused(real, tmp_path):
    saved = load_head(real["head"])
    other = save_head(tmp_path / "other.head", saved.estimator,
                      {**saved.meta, "classes": ["cat", "cow"]})
    with pytest.raises(TeacherError, match="classes"):
        distill(real["cache"], teacher=other, options=FAST)
    narrow = save_head(tmp_path / "narrow.head", saved.estimator, {**saved.meta, "dim": 7})
    with pytest.raises(TeacherError, match="dim 7 vs 512"):
        distill(real["cache"], teacher=narrow, options=FAST)
    with pytest.raises(TeacherError, match="saved head"):
        distill(real["cache"], teacher=real["cache"], options=FAST)


def test_a_teacher_that_knows_the_clusters_teaches_through_the_pool(tmp_path):
    cache, pool, labelled_pool = planted_pair(tmp_path, shots=2, spread=2.0, pool_n=1000)
    info = cache_info(cache)
    known = read_split(labelled_pool, "train")  # the pool's own labels train the teacher
    head = LogRegHead(Cs=(1.0,)).fit(known.X, known.y)
    teacher = save_head(tmp_path / "teacher.head", head,
                        {"head": "logreg", "backbone": "synthetic", "classes": info["classes"],
                         "dim": 20, "cache_key": "elsewhere", "spec": info["spec"],
                         "request": {}})
    result = distill(cache, teacher=teacher, pool=pool, progress=False,
                     options=DistillOptions(student="linear", temperatures=(2.0,),
                                            alphas=(0.9,)))
    student, alone, taught_by = result.rows
    assert student["test_accuracy"] > alone["test_accuracy"] + 0.05
    assert student["diff_vs_base_ci_low"] > 0
    assert student["agreement"] > 0.9
    assert not result.teacher["same_cache"]  # trained elsewhere: said in the result
