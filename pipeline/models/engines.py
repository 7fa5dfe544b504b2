"""Inference engines for a frozen network: torch prepared for inference, or an exported copy.

Stage 1's trunk only ever runs inference, so it need not run as the eager training module. An
engine turns the eager network into a callable mapping an image batch (a torch tensor) to the
same features:

- ``torch``: the network prepared for inference (:func:`prepare_for_inference`): each
  BatchNorm that follows a convolution folded into it, TensorFlow "same" padding computed
  once for the fixed input size, channels_last weights. Exact up to float rounding.
- ``onnxruntime`` and ``openvino``: that prepared network exported once to ONNX by torch's
  exporter (``torch.onnx.export(dynamo=True)``, which needs ``onnxscript``) into the cache
  folder, and run by the runtime on the CPU. Optional extras: ``pip install
  'cnn-bottleneck-pipeline[onnx]'`` (onnxruntime) and ``[openvino]``.
- ``auto``: on the CPU the first installed of :data:`AUTO_ORDER`, a fixed order measured on
  this project's CPU machine (BENCHMARKS.md: onnxruntime, then openvino, then torch), not a
  probe at run time: a probe would have to export first, which costs more than it can save
  on most data sets. On a GPU, torch (with AMP, and ``--compile`` when asked): the exported
  engines here run on the CPU.

Every engine's features are checked against the eager network's on a few images before use
(:func:`check`). A mismatch beyond :data:`CHECK_RTOL` of the features' scale is refused in one
line when the engine was asked for by name; under ``auto`` it is reported and torch is used
instead, and the refusal is remembered beside the export so the next run does not retry.

An export is named by a key over what it is (the backbone's key and the input shape) and what
exported it (the torch, onnxscript and onnx versions), not over the runtime that runs it:
onnxruntime and openvino read the same file. The runtime is recorded in the feature cache's
key instead (unless it is torch, so that caches written before engines existed keep theirs).

Importing this module loads no framework: resolving an engine for a cache key only asks
which packages are installed.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pipeline.core.atomic import write_json, write_text
from pipeline.core.errors import EngineError, MissingExtraError, WriteError
from pipeline.core.extras import installed, require
from pipeline.core.options import ENGINES

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.models.families import Family

__all__ = ["AUTO_ORDER", "CHECK_RTOL", "ENGINES", "Engine", "EngineError", "Prepared",
           "check", "export_path", "get_engine", "prepare", "prepare_for_inference",
           "resolve_engine"]

# auto's choice on a CPU, fastest first (forward-only, Lite0 at 224 px, batch 8, 2 cores).
AUTO_ORDER = ("onnxruntime", "openvino", "torch")
# An engine's features may differ from eager torch's by this fraction of their largest value.
# Float32 rounding of a reordered network stays below 1e-5 of it (measured: 2e-6 for ONNX
# Runtime on Lite0); a wrong graph is off by far more.
CHECK_RTOL = 1e-4
_EXPORT_VERSION = 1  # bump when what an export folder holds changes
_EXPORTERS = ("torch", "onnxscript", "onnx")  # their versions key the export
EXPORTED = ".exported"  # an export's folder: <backbone>-<key>.exported
REFUSED = ".refused.json"  # beside it: the engines auto could not use for it, and why



@dataclass
class Prepared:
    """A ready engine: ``run(batch)`` gives the features of an image batch (a torch tensor)."""

    engine: str
    run: Callable
    difference: float  # largest difference to eager torch's features, over their scale
    seconds: float  # preparing it: folding, exporting or loading the export, the check
    exported: bool = False  # this call wrote the export (False: found in the cache, or none)
    note: str = ""  # why ``auto`` fell back to torch, or torch to the unprepared network
    streams: int = 1  # calls of ``run`` it is built to take at once, from as many threads


class Engine:
    """One way to run the frozen network; subclasses are registered in :data:`_ENGINES`."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()  # import names that must be installed
    distribution: ClassVar[str] = "torch"  # whose version the cache records
    extra: ClassVar[str | None] = None  # the extra of this distribution that installs it
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    exported: ClassVar[bool] = True  # runs an ONNX export of the network
    # Whether a thread decoding the next batches beside it speeds extraction up on a CPU
    # (measured 2026-12-04, demo set, 2 cores: onnxruntime, whose threads do not spin, 89 ->
    # 96 img/s; openvino unchanged, 105; torch slower, 75 -> 63, its OpenMP threads waiting on
    # the one the decoder took). On a GPU it always does.
    decodes_ahead_on_cpu: ClassVar[bool] = False
    # Whether, on a CPU, it runs best as one single-threaded run per core, each on a batch of
    # its own that its thread also decodes, rather than one run spread over every core. A run
    # spread over two cores waits at every layer for the core the decoding thread took (the
    # two threads of onnxruntime lost 1.1 s of 7.2 that way on the demo set, measured
    # 2026-12-04); two single-threaded runs forward as fast (onnxruntime 244 against 238
    # img/s, openvino 255 against 253) and absorb the decoding. Torch's own runs do not:
    # two single-threaded forwards at once made 112 img/s against 143 for one on two threads.
    streams_on_cpu: ClassVar[bool] = False

    def installed(self) -> bool:
        return all(installed(m) for m in self.requires)

    def version(self) -> str | None:
        return _version(self.distribution)

    def decodes_ahead(self, device_type: str) -> bool:
        """Whether extraction should decode the next batches in a background thread."""
        return device_type != "cpu" or self.decodes_ahead_on_cpu

    def streams(self, device_type: str, workers: int) -> int:
        """How many batches extraction should run at once, each on one core (1: one run at a
        time, spread over the cores). Only in-process loading: loader processes take cores of
        their own."""
        if device_type != "cpu" or workers or not self.streams_on_cpu:
            return 1
        return _threads()

    def prepare(self, model: nn.Module, example: torch.Tensor, family: Family,
                export: Path | None, streams: int = 1) -> Callable:
        """A callable giving ``model``'s features of a batch like ``example``, on the CPU,
        safe to call from ``streams`` threads at once (the cores shared out among them)."""
        raise NotImplementedError


class TorchEngine(Engine):
    name = "torch"
    devices = ("cpu", "cuda", "mps")
    exported = False

    def prepare(self, model, example, family, export=None, streams=1):
        return prepare_for_inference(model, example, family)


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    requires = ("onnxruntime", "onnx", "onnxscript")
    distribution = "onnxruntime"
    extra = "onnx"
    decodes_ahead_on_cpu = True
    streams_on_cpu = True

    def prepare(self, model, example, family, export=None, streams=1):
        ort = require("onnxruntime", "the onnxruntime engine")
        options = ort.SessionOptions()
        # One session serves every stream (its run is thread-safe), each run on its share.
        options.intra_op_num_threads = max(1, _threads() // streams)
        options.inter_op_num_threads = 1
        # Its threads would spin between runs, taking the core that decodes the next batch.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(export / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        return _OnnxRuntimeRun(session)


class OpenVinoEngine(Engine):
    name = "openvino"
    requires = ("openvino", "onnx", "onnxscript")
    distribution = "openvino"
    extra = "openvino"
    streams_on_cpu = True

    def prepare(self, model, example, family, export=None, streams=1):
        ov = require("openvino", "the openvino engine")
        core = ov.Core()
        # float32 everywhere: on CPUs with bfloat16 units OpenVINO would otherwise use them.
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": _threads()}
        config.update({"PERFORMANCE_HINT": "LATENCY"} if streams == 1 else
                      {"NUM_STREAMS": streams})
        compiled = core.compile_model(core.read_model(str(export / "model.onnx")), "CPU",
                                      config)
        return _OpenVinoRun(compiled)


_ENGINES: dict[str, Engine] = {e.name: e for e in (TorchEngine(), OnnxRuntimeEngine(),
                                                    OpenVinoEngine())}


def get_engine(name: str) -> Engine:
    if name not in _ENGINES:
        raise EngineError(f"engine must be one of {', '.join(ENGINES)}, not {name!r}")
    return _ENGINES[name]


def resolve_engine(name: str, device_type: str, compile: bool = False,
                   export: Path | None = None) -> str:
    """The engine ``name`` stands for on a ``device_type`` device, without importing it.

    ``auto`` on a CPU is the first installed engine of :data:`AUTO_ORDER` that has not been
    refused for the export at ``export`` (see :func:`prepare`); with ``compile``, or on a
    GPU, it is torch. A named engine must be installed and run on the device.

    Raises
    ------
    EngineError
        An unknown engine, one not installed (naming the extra that installs it), one that
        does not run on this device, or ``compile`` with an engine other than torch.
    """
    if name == "auto":
        if compile or device_type != "cpu":
            return "torch"
        refused = _refused(export)
        return next(e for e in AUTO_ORDER if e not in refused and _ENGINES[e].installed())
    engine = get_engine(name)
    if not engine.installed():
        # The one line names the extra; the module named is the first one missing.
        missing = next((m for m in engine.requires if not installed(m)), engine.requires[0])
        raise MissingExtraError(missing, engine.extra, f"the {name} engine")
    if device_type not in engine.devices:
        raise EngineError(f"the {name} engine runs on the CPU, not on {device_type}",
                          engine=name, device=device_type, reason="engine-device")
    if compile and name != "torch":
        raise EngineError(f"compiling applies to torch's network, not to the {name} engine",
                          engine=name, reason="compile-engine")
    return name


def export_path(cache_dir: str | os.PathLike, backbone: str, what: dict,
                input_shape: tuple[int, ...]) -> Path:
    """The folder of the ONNX export of the network ``what`` describes (a backbone's key, and
    anything else that decides the network) for inputs ``input_shape`` (C, H, W).

    Named by a key over ``what``, the shape and the exporter's versions; nothing is imported.
    """
    spec = {"export": _EXPORT_VERSION, "format": "onnx", "network": what,
            "input_shape": list(input_shape), "exporters": {p: _version(p) for p in _EXPORTERS}}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{backbone.replace('/', '_')}-{key}{EXPORTED}"


def prepare(name: str, model: nn.Module, example: torch.Tensor, family: Family,
            device: torch.device, export: Path | None = None, what: dict | None = None,
            strict: bool = True, streams: int = 1) -> Prepared:
    """Engine ``name`` (resolved: not ``auto``) ready to run ``model``'s features on ``device``.

    Parameters
    ----------
    model
        The eager network in eval mode, on any device; left unchanged (a copy is prepared,
        on the CPU, then moved to ``device``).
    example
        A few preprocessed images (a batch, on the CPU): the network is exported with them,
        static padding sized for them, and the engine's features checked on them.
    family
        The backbone's family adapter, which says how its norm and padding layers fold.
    export
        For an exported engine: the folder (:func:`export_path`) that holds the export, or
        receives it.
    what
        Recorded in a new export's ``exported.json`` (what the network is).
    strict
        Refuse a failing export or check; else (``auto``) fall back to torch and remember
        the refusal beside the export.
    streams
        Calls of the engine's ``run`` to serve at once (:meth:`Engine.streams`); an engine
        that does not run in streams, and torch's fallback, serve one (``Prepared.streams``).

    Raises
    ------
    EngineError
        With ``strict``, an export that fails or an engine whose features differ from eager
        torch's by more than :data:`CHECK_RTOL` of their scale.
    """
    import torch

    started = time.perf_counter()
    engine = get_engine(name)
    streams = streams if engine.streams_on_cpu else 1
    example = example.float().cpu()
    if any(p.device.type != "cpu" for p in model.parameters()):
        # Prepared and checked on the CPU, in exact float32 (no TF32 convolutions).
        model = copy.deepcopy(model).cpu()
    with torch.inference_mode():
        want = model(example).float()
    exported, note = False, ""
    try:
        if engine.exported:
            exported = _ensure_export(model, example, family, export, what)
        run = engine.prepare(model, example, family, export, streams)
        difference = check(want, run, example)
        if not difference <= CHECK_RTOL:
            raise EngineError(f"{name}'s features differ from eager torch's by {difference:.1e} "
                              f"of their scale on {len(example)} images (tolerance "
                              f"{CHECK_RTOL:.0e})")
    except Exception as err:  # an exporter's or a runtime's failure, or the check's
        reason = _one_line(err)
        if name == "torch":  # the folding is ours, and the unprepared network is always right
            run, difference = copy.deepcopy(model).to(memory_format=torch.channels_last), 0.0
            note = f"torch: the network runs unprepared ({reason})"
        elif strict:
            what = reason if isinstance(err, EngineError) else (
                f"the {name} engine cannot run this network ({reason})")
            raise EngineError(what, engine=name, reason="engine-failed") from err
        else:
            _refuse(export, name, reason)
            fallback = prepare("torch", model, example, family, device)
            fallback.note = f"auto: {name} not used ({reason}); torch instead"
            return fallback
    if name == "torch":
        run = run.to(device)
    return Prepared(name, run, difference, time.perf_counter() - started, exported, note,
                    streams)


def check(want: torch.Tensor, run: Callable, example: torch.Tensor) -> float:
    """The largest difference between ``run``'s features of ``example`` and ``want`` (eager
    torch's), as a fraction of their largest magnitude; infinite for a shape or NaN mismatch."""
    import torch

    with torch.inference_mode():
        got = run(example).float().cpu()
    if got.shape != want.shape or not torch.isfinite(got).all():
        return float("inf")
    scale = want.abs().max().clamp_min(1e-12)
    return float((got - want).abs().max() / scale)


# --- torch prepared for inference ------------------------------------------------------------

def prepare_for_inference(model: nn.Module, example: torch.Tensor, family: Family) -> nn.Module:
    """A copy of ``model`` for inference on inputs shaped like ``example``.

    - Every ``BatchNorm2d`` whose input is a ``Conv2d``'s output is folded into that
      convolution (``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``,
      in float64) and replaced by what the family says remains (:meth:`Family.folded_norm`:
      nothing, or timm's activation).
    - Layers that recompute per call what the input size decides (timm's ``Conv2dSame``)
      are replaced by their fixed-size form (:meth:`Family.fixed_size`).
    - Weights are channels_last, no parameter requires a gradient, the copy is in eval mode.

    Which layer feeds which is read from one forward pass of one image with hooks; a layer
    called more than once (shared weights) is left alone. A convolution whose output also
    went elsewhere than its norm would change that other use: :func:`prepare` checks the
    result against the eager network and refuses or falls back.
    """
    import torch

    prepared = copy.deepcopy(model).eval()
    feeds, calls, shapes = _trace_layers(prepared, example[:1])
    for conv_name, norm_name in feeds:
        if calls[conv_name] != 1 or calls[norm_name] != 1:
            continue
        conv, norm = prepared.get_submodule(conv_name), prepared.get_submodule(norm_name)
        remains = family.folded_norm(norm)
        if remains is None or not _foldable(conv, norm):
            continue
        _fold(conv, norm)
        _set_submodule(prepared, norm_name, remains)
    for name, module in list(prepared.named_modules()):
        seen = shapes.get(name, ())
        if len(seen) != 1 or calls.get(name) != 1:
            continue
        fixed = family.fixed_size(module, next(iter(seen)))
        if fixed is not None:
            _set_submodule(prepared, name, fixed)
    for parameter in prepared.parameters():
        parameter.requires_grad_(False)
    return prepared.eval().to(memory_format=torch.channels_last)


def _trace_layers(model: nn.Module, example: torch.Tensor):
    """One forward pass: (conv, norm) name pairs where the norm's input is the conv's output,
    the number of calls of each conv and norm, and the input shapes of every module."""
    import torch
    from torch import nn

    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    feeds: list[tuple[str, str]] = []
    calls: dict[str, int] = {}
    shapes: dict[str, set[tuple[int, ...]]] = {}
    hooks = []

    def count(name):
        calls[name] = calls.get(name, 0) + 1

    def after_conv(name):
        def hook(_module, _inputs, output):
            outputs[id(output)] = (name, output)  # the tensor is held: its id stays unique
        return hook

    def before(name, is_norm):
        def hook(_module, inputs):
            count(name)
            if inputs and isinstance(inputs[0], torch.Tensor):
                shapes.setdefault(name, set()).add(tuple(inputs[0].shape[1:]))
                if is_norm:
                    source = outputs.get(id(inputs[0]))
                    if source is not None and source[1] is inputs[0]:
                        feeds.append((source[0], name))
        return hook

    for name, module in model.named_modules():
        if not name:
            continue
        is_conv, is_norm = isinstance(module, nn.Conv2d), isinstance(module, nn.BatchNorm2d)
        hooks.append(module.register_forward_pre_hook(before(name, is_norm)))
        if is_conv:
            hooks.append(module.register_forward_hook(after_conv(name)))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return feeds, calls, shapes


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (norm.running_mean is not None and norm.running_var is not None
            and conv.out_channels == norm.num_features and not norm.training)


def _fold(conv: nn.Module, norm: nn.Module) -> None:
    import torch
    from torch import nn

    with torch.no_grad():
        dtype = conv.weight.dtype
        inv_std = torch.rsqrt(norm.running_var.double() + norm.eps)
        gamma = norm.weight.double() if norm.weight is not None else 1.0
        beta = norm.bias.double() if norm.bias is not None else 0.0
        scale = gamma * inv_std
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv_std)
        conv.weight.copy_((conv.weight.double() * scale.reshape(-1, 1, 1, 1)).to(dtype))
        conv.bias = nn.Parameter(((bias - norm.running_mean.double()) * scale + beta).to(dtype),
                                 requires_grad=False)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


# --- exported engines ------------------------------------------------------------------------

def _ensure_export(model: nn.Module, example: torch.Tensor, family: Family, folder: Path,
                   what: dict | None) -> bool:
    """Export the prepared ``model`` to ``folder/model.onnx`` unless it is there; True when
    this call exported. Written into a temporary folder beside it, then renamed into place."""
    import torch

    if (folder / "model.onnx").exists():
        return False
    started = time.perf_counter()
    prepared = prepare_for_inference(model, example, family).to(
        memory_format=torch.contiguous_format)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        examples = example if len(example) > 1 else example.expand(2, *example.shape[1:])
        program = torch.onnx.export(prepared, (examples.contiguous(),), dynamo=True,
                                    input_names=["images"], output_names=["features"],
                                    dynamic_shapes=({0: batch},), optimize=True, verbose=False)
        program.save(str(partial / "model.onnx"))
        write_json(partial / "exported.json", {
            "network": what, "input_shape": list(example.shape[1:]),
            "exporters": {p: _version(p) for p in _EXPORTERS},
            "seconds": time.perf_counter() - started,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        try:
            os.replace(partial, folder)
        except OSError:  # another process put its export there first: the same file
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return True


class _OnnxRuntimeRun:
    def __init__(self, session):
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        out = self.session.run(None, {self.input: x.detach().float().cpu().contiguous().numpy()})
        return torch.from_numpy(out[0])


class _OpenVinoRun:
    """Runs a compiled model with an infer request per calling thread (a request serves one
    call at a time; the compiled model's streams run several requests at once)."""

    def __init__(self, compiled):
        import threading

        self.compiled = compiled
        self.local = threading.local()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np
        import torch

        request = getattr(self.local, "request", None)
        if request is None:
            request = self.local.request = self.compiled.create_infer_request()
        out = request.infer({0: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(np.array(out))  # a copy: the request reuses its output buffer


def refusal_path(export: Path) -> Path:
    return export.with_name(export.name + REFUSED)


def _refused(export: Path | None) -> dict:
    if export is None:
        return {}
    try:
        return json.loads((refusal_path(export)).read_text())
    except (OSError, ValueError):
        return {}


def _refuse(export: Path | None, engine: str, reason: str) -> None:
    """Remember that ``auto`` could not use ``engine`` for this export (and why)."""
    if export is None:
        return
    refused = {**_refused(export), engine: reason}
    # A read-only cache folder: auto will try again next time.
    with contextlib.suppress(OSError, WriteError):
        write_text(refusal_path(export), json.dumps(refused) + "\n")


def _threads() -> int:
    import torch

    return torch.get_num_threads()  # torchrun and OMP_NUM_THREADS set it per process


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
