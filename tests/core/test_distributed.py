"""Several processes under torchrun: sharded extraction and DDP fine-tuning, 2 ranks on gloo/CPU.

The launches are the documented commands (docs/scale-out.md) on tiny data: ``torchrun
--standalone --nproc-per-node 2 -m pipeline ...`` for one machine, and the ``--nnodes``
rendezvous form for several, played here by two launchers on this machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.core import distributed
from pipeline.models.backbones import build_classifier, resolve_backbone
from pipeline.store.cache import cache_info
from pipeline.store.paths import shard_paths
from pipeline.store.persistence import load_network
from tests.conftest import TINY, extract_tiny, make_folder

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ONE_MACHINE = ["--standalone", "--nproc-per-node", "2"]
TINY_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32",
             "--workers", "0", "--batch-size", "4"]
FT_ARGS = ["--epochs", "2", "--patience", "5", "--lr", "0.01", "--unfreeze", "1"]
# OMP_NUM_THREADS=1 is what torchrun sets anyway (and warns about); PYTHONPATH for the scripts.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}


@pytest.fixture(scope="module", autouse=True)
def launcher_temp(tmp_path_factory):
    """torchrun's elastic agent makes a torchelastic_* folder in TMPDIR per launch and leaves
    it: point it at pytest's folders, which go with the run, instead of the machine's /tmp."""
    ENV["TMPDIR"] = str(tmp_path_factory.mktemp("tmpdir"))
    yield
    ENV.pop("TMPDIR")


def torchrun(*args: str, launcher=ONE_MACHINE) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN, *launcher, *args], capture_output=True, text=True,
                          env=ENV, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _arrays(path):
    with h5py.File(path) as f:
        return {n: f[n][:] for n in ("features", "valid", "labels", "paths", "split",
                                     "failed_index", "failed_reason")}


def _assert_same_cache(a_path, b_path):
    a, b = _arrays(a_path), _arrays(b_path)
    for name in ("valid", "labels", "paths", "split", "failed_index", "failed_reason"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("dist") / "images", per_class=10)
    (root / "dog" / "broken.png").write_bytes(b"not a png")  # one unreadable image
    return root


@pytest.fixture(scope="module")
def single(images, tmp_path_factory):
    """The cache one process writes: what every multi-process run must reproduce."""
    return extract_tiny(images, cache_dir=tmp_path_factory.mktemp("single"))


# --- the helpers, in one process ------------------------------------------------------------

@pytest.mark.parametrize("n,world", [(30, 2), (31, 2), (7, 3), (2, 4), (0, 2)])
def test_shards_cover_every_row_once_without_padding(n, world):
    shards = [distributed.shard_indices(n, distributed.Context(r, world)) for r in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(np.all(np.diff(s) > 0) for s in shards)  # sorted: assembly reads slices


def test_context_comes_from_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.context() == distributed.Context(0, 1, 0, 1)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (5, 8, 1, 4)
    assert ctx.distributed and not ctx.is_main


def test_a_world_of_one_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx, device = distributed.setup("cpu")
    assert not ctx.distributed and device.type == "cpu"
    assert not torch.distributed.is_initialized()
    assert distributed.all_gather({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast(3) == 3
    assert distributed.sum_across([1.0, 2.0], device) == [1.0, 2.0]
    distributed.check_agree("key", "keys")  # nothing to disagree with


# --- extraction -------------------------------------------------------------------------------

def _several_machines(endpoint: str) -> list[str]:
    return ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", "test-job"]


def test_the_documented_launches_are_the_tested_ones():
    section = Path("docs/scale-out.md").read_text().replace("\\\n", " ")  # join continued lines
    lines = [line.split() for line in section.splitlines() if line.strip().startswith("torchrun")]
    one = [line for line in lines if "--standalone" in line]
    several = [line for line in lines if "--nnodes" in line]
    assert sorted(line[6] for line in one) == ["extract", "finetune"]
    assert all(line[:6] == ["torchrun", *ONE_MACHINE, "-m", "pipeline"] for line in one)
    flags = [f for f in _several_machines("HOST:29400") if f.startswith("--")]
    assert several and all([f for f in line if f.startswith("--")][:len(flags)] == flags
                           for line in several)


def test_two_machines_write_the_cache_one_process_writes(images, single, tmp_path):
    # Two launchers meeting at one rendezvous endpoint: the documented several-machine command.
    cache = tmp_path / "c"
    endpoint = f"localhost:{_free_port()}"
    nodes = [subprocess.Popen(
        [TORCHRUN, *_several_machines(endpoint), "-m", "pipeline", "extract", str(images),
         "--cache-dir", str(cache), *TINY_ARGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    said = "".join(out for out, _ in outputs)
    assert said.count("extracted 31 images (512-d) on 2 processes") == 1  # rank 0 alone speaks
    final = cache / single.cache_path.name  # same key
    _assert_same_cache(final, single.cache_path)
    assert not shard_paths(final)
    timings = cache_info(final)["timings"]
    assert timings["world_size"] == 2
    assert [s["rows"] for s in timings["shards"]] == [16, 15]


def test_a_killed_rank_resumes_its_shard_and_the_cache_is_unchanged(images, single, tmp_path):
    cache = tmp_path / "c"
    crash = tmp_path / "crash.py"
    crash.write_text(textwrap.dedent(f"""
        import os, signal
        import pipeline.store.writer
        from tests.conftest import extract_tiny
        pipeline.store.writer._CHUNK_BYTES = 4 * 512 * 4  # a write every 4 rows (512 float32 each)
        def die(done, total):
            if os.environ["RANK"] == "1" and done >= 8:
                os.kill(os.getpid(), signal.SIGKILL)
        extract_tiny({str(images)!r}, cache_dir={str(cache)!r}, batch_size=4,
                         on_batch=die)
    """))
    killed = torchrun(str(crash))
    assert killed.returncode != 0
    final = cache / single.cache_path.name
    assert not final.exists()
    partial = final.with_name(final.name + ".shard-1-of-2.partial")
    with h5py.File(partial) as f:
        assert f.attrs["rows_done"] == 8 and not f.attrs["complete"]

    resumed = torchrun("-m", "pipeline", "extract", str(images), "--cache-dir", str(cache),
                       *TINY_ARGS)
    assert resumed.returncode == 0, resumed.stderr
    shards = cache_info(final)["timings"]["shards"]
    assert shards[1]["resumed_from"] == 8  # rank 1 redid only its last 7 rows
    _assert_same_cache(final, single.cache_path)
    assert not shard_paths(final)
    again = torchrun("-m", "pipeline", "extract", str(images), "--cache-dir", str(cache),
                     *TINY_ARGS, "--json")
    assert json.loads(again.stdout)["hit"] is True


def test_ranks_that_see_different_images_stop_with_one_clear_error(images, tmp_path):
    other = make_folder(tmp_path / "other", per_class=9)
    script = tmp_path / "disagree.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from pipeline.core.errors import PipelineError
        from tests.conftest import extract_tiny
        data = {str(images)!r} if os.environ["RANK"] == "0" else {str(other)!r}
        try:
            extract_tiny(data, cache_dir={str(tmp_path / "c")!r})
        except PipelineError as err:
            raise SystemExit(f"error: {{err}}")
    """))
    run = torchrun(str(script))
    assert run.returncode != 0
    assert ("see different images (paths, labels or splits): rank(s) 1 differ from rank 0"
            in run.stderr)
    assert not list((tmp_path / "c").glob("*"))


# --- fine-tuning ------------------------------------------------------------------------------

# Runs finetune under torchrun, then each rank saves the weights it holds; or, with "crash",
# rank 0 dies right after writing the first epoch's checkpoint.
_FINETUNE = """
import importlib, json, os, signal, sys
import torch
ft = importlib.import_module("pipeline.finetuning.loop")
run = importlib.import_module("pipeline.finetuning.run")
mode, kw = sys.argv[1], json.loads(sys.argv[2])
rank = int(os.environ["RANK"])
fit = ft.Trainer.fit
def fit_and_save(self, loaders, on_epoch):
    history = fit(self, loaders, on_epoch)
    torch.save(self.model.state_dict(), os.path.join(kw["out"], f"rank{rank}.pt"))
    return history
ft.Trainer.fit = fit_and_save
def crash(epoch, row):
    if mode == "crash" and rank == 0 and epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
from pipeline.core.options import FinetuneOptions
from pipeline.models.backbones import resolve_backbone
flat = dict(kw)
data, out = flat.pop("data"), flat.pop("out")
spec = resolve_backbone(flat.pop("backbone"), flat.pop("weights"),
                        image_size=flat.pop("image_size"))
result = run.finetune(data, backbone=spec, options=FinetuneOptions.from_flat(flat),
                      workdir=out, on_epoch=crash)
result.write(out)
"""

FT_KW = {**TINY, "batch_size": 4, "epochs": 2, "patience": 5, "lr": 0.01, "unfreeze": 1}


@pytest.fixture(scope="module")
def ddp_run(images, single, tmp_path_factory):
    """An uninterrupted 2-rank fine-tune; its output folder."""
    folder = tmp_path_factory.mktemp("ddp")
    out = folder / "whole" / "unfreeze-1"
    out.mkdir(parents=True)
    script = folder / "finetune.py"
    script.write_text(_FINETUNE)
    kw = {**FT_KW, "data": str(images), "cache_dir": str(single.cache_path.parent),
          "out": str(out)}
    run = torchrun(str(script), "train", json.dumps(kw))
    assert run.returncode == 0, run.stderr
    return out


def _model(out: Path) -> dict:
    return load_network(next((out / "models").glob("*.net"))).state_dict


def test_ddp_ranks_agree_and_train_only_the_unfrozen_block(ddp_run):
    rank0, rank1 = (torch.load(ddp_run / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # one model, two processes
    before = build_classifier(resolve_backbone("resnet18", "none", image_size=32)).state_dict()
    saved = _model(ddp_run)
    for key, value in before.items():
        if key.startswith("fc."):
            continue
        trained = key.startswith("layer4.") and not key.endswith(
            ("running_mean", "running_var", "num_batches_tracked"))
        assert torch.equal(saved[key], value) != trained, key
    row, = json.loads((ddp_run / "results.json").read_text())
    assert row["epochs_run"] == 2 and row["method"] == "fine-tune"


def test_ddp_fine_tune_resumes_from_rank_0_checkpoint(images, single, ddp_run, tmp_path):
    out = tmp_path / "o"
    (out / "unfreeze-1").mkdir(parents=True)
    script = tmp_path / "finetune.py"
    script.write_text(_FINETUNE)
    kw = {**FT_KW, "data": str(images), "cache_dir": str(single.cache_path.parent),
          "out": str(out / "unfreeze-1")}
    crashed = torchrun(str(script), "crash", json.dumps(kw))
    assert crashed.returncode != 0
    checkpoint = torch.load(out / "unfreeze-1" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1

    resumed = torchrun("-m", "pipeline", "finetune", str(images), "--cache-dir",
                       str(single.cache_path.parent), "--out", str(out), *TINY_ARGS, *FT_ARGS,
                       "--json")
    assert resumed.returncode == 0, resumed.stderr
    rows = json.loads(resumed.stdout)
    assert len(rows) == 1 and rows[0]["blocks_unfrozen"] == 1
    history = (out / "unfreeze-1" / "history.csv").read_text().splitlines()
    assert len(history) == 3  # header, the epoch before the crash, the one after
    a, b = _model(out / "unfreeze-1"), _model(ddp_run)
    assert all(torch.equal(a[k], b[k]) for k in b)  # as if it had never stopped
