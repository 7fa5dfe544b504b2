"""Inference engines: forward-only and end-to-end images per second against the eager network."""

from __future__ import annotations

import os
import shutil
import time

import torch

from pipeline.bench.children import generate_images, in_child
from pipeline.bench.numbers import num
from pipeline.core.devices import (
    resolve_device,
)
from pipeline.models import engines

__all__ = ["bench_engines", "bench_engines_here", "engine_ratios", "print_engines"]


# Issue 12: end-to-end with --engine auto against the eager network's forward-only (at least),
# and end-to-end with each engine against that engine's forward-only (at least).
ENGINE_TARGETS = {"auto_over_eager": 1.5, "end_to_end_over_forward": 0.9}


# "eager": the network as extraction ran it before engines (channels_last, nothing folded).
BENCH_ENGINES = ("eager", "torch", "onnxruntime", "openvino")


def bench_engines_here(device: torch.device) -> list[str]:
    """The engines of :data:`BENCH_ENGINES` that run here: eager, torch, and the exported
    engines that are installed and run on ``device``."""
    out = []
    for name in BENCH_ENGINES:
        engine = None if name == "eager" else engines.get_engine(name)
        if engine is None or (engine.installed() and device.type in engine.devices):
            out.append(name)
    return out


def engine_ratios(forward: dict[str, float], end_to_end: dict[str, float]) -> dict:
    """Issue 12's ratios with their targets (at least): end-to-end with ``auto`` over the
    eager network's forward-only, and each engine's end-to-end over its own forward-only;
    beside them each engine's forward-only over the eager one's (no target)."""
    auto = end_to_end["auto"] / forward["eager"]
    target = ENGINE_TARGETS["end_to_end_over_forward"]
    return {
        "forward_over_eager": {e: forward[e] / forward["eager"] for e in forward},
        "auto_over_eager": {"ratio": auto, "target": ENGINE_TARGETS["auto_over_eager"],
                            "met": auto >= ENGINE_TARGETS["auto_over_eager"]},
        "end_to_end_over_forward": {
            e: {"ratio": end_to_end[e] / forward[e], "target": target,
                "met": end_to_end[e] / forward[e] >= target}
            for e in end_to_end if e in forward},
    }


def bench_engines(args) -> dict:
    """Every engine that runs here, on the demo set and the generated set (issue 12).

    One cache folder holds the exports, made first in their own children (their seconds are
    reported on their own), so that neither forward-only nor extraction pays for them.
    Per set, each measurement a fresh child: forward-only of every engine (and of the eager
    network), end-to-end extraction with every engine, with ``auto``, and with ``auto`` in
    one stream (one run at a time over every core, the next batches decoded by a background
    thread where the engine does that: extraction before streams), then forward-only again;
    forward-only is the mean of the two, which bracket the extractions in time.
    """
    device = resolve_device("auto")
    names = bench_engines_here(device)
    auto = engines.resolve_engine("auto", device.type)
    net = {"backbone": args.backbone, "weights": args.weights}
    cache_dir = args.out / "cache-engines"
    shutil.rmtree(cache_dir, ignore_errors=True)
    started, loads = time.perf_counter(), [os.getloadavg()]
    exports = {e: in_child("engine", data=str(args.data), engine=e, cache_dir=str(cache_dir),
                           **net)
               for e in names if e not in ("eager", "torch")}
    large = generate_images(args.out / f"generated-{args.large}", args.large)
    sets = []
    for name, data in (("demo", args.data), (f"generated-{args.large}", large)):
        common = {**net, "data": str(data), "cache_dir": str(cache_dir)}
        before = {e: in_child("forward", engine=e, **common)["img_s"] for e in names}
        runs = {}
        for label, extra in ([(e, {"engine": e}) for e in names if e != "eager"]
                             + [("auto", {"engine": "auto"}),
                                ("auto, one stream", {"engine": "auto",
                                                      "one_stream": True})]):
            for old in cache_dir.glob("*.h5*"):
                old.unlink()
            runs[label] = in_child("extract", progress=False, **common, **extra)
        after = {e: in_child("forward", engine=e, **common)["img_s"] for e in names}
        loads.append(os.getloadavg())
        forward = {e: (before[e] + after[e]) / 2 for e in names}
        end_to_end = {label: r["images"] / r["seconds"] for label, r in runs.items()}
        # The loop alone: decoding, forward and writing at the rate a large set runs at; the
        # whole run adds a fixed start (imports, building the network) of several seconds.
        loop = {label: r["images"] / r["loop_seconds"] for label, r in runs.items()
                if r.get("loop_seconds")}
        compared = {k: v for k, v in end_to_end.items() if k in forward or k == "auto"}
        sets.append({"set": name, "images": runs["auto"]["images"], "auto": auto,
                     "forward_before": before, "forward_after": after, "forward": forward,
                     "end_to_end": end_to_end, "loop": loop,
                     "engine_of": {label: r["engine"] for label, r in runs.items()},
                     "ratios": engine_ratios(forward, compared),
                     "loop_ratios": engine_ratios(forward, {k: v for k, v in loop.items()
                                                            if k in compared})})
    result = {"engines": names, "auto": auto, "exports": exports, "sets": sets,
              "loadavg": loads, "section_s": time.perf_counter() - started}
    print_engines(result, args.backbone)
    return result


def print_engines(result: dict, backbone: str) -> None:
    print(f"engines, {backbone}: auto is {result['auto']} here; exports: " + ", ".join(
        f"{e} {x['seconds']:.1f} s (check {x['difference']:.1e})"
        for e, x in result["exports"].items()))
    for s in result["sets"]:
        r, lr = s["ratios"], s["loop_ratios"]
        print(f"{s['set']} ({s['images']} images): engine | forward-only img/s (before, after) "
              "| x eager | end-to-end img/s, whole run; loop alone | end-to-end / forward-only "
              f"(target >= {ENGINE_TARGETS['end_to_end_over_forward']}), whole run; loop alone")
        for e in s["forward"]:
            ratio = r["end_to_end_over_forward"].get(e, {}).get("ratio")
            loop_ratio = lr["end_to_end_over_forward"].get(e, {}).get("ratio")
            print(f"{e} | {s['forward'][e]:.1f} ({s['forward_before'][e]:.1f}, "
                  f"{s['forward_after'][e]:.1f}) | {r['forward_over_eager'][e]:.2f} | "
                  f"{num(s['end_to_end'].get(e), '.1f')}; {num(s['loop'].get(e), '.1f')} | "
                  f"{num(ratio, '.2f')}; {num(loop_ratio, '.2f')}")
        for label in ("auto", "auto, one stream"):
            print(f"{label} ({s['engine_of'][label]}) | end-to-end {s['end_to_end'][label]:.1f} "
                  f"img/s whole run, {num(s['loop'].get(label), '.1f')} loop alone")
        print(f"end-to-end with auto / eager forward-only: {r['auto_over_eager']['ratio']:.2f} "
              f"whole run, {lr['auto_over_eager']['ratio']:.2f} loop alone (target >= "
              f"{r['auto_over_eager']['target']})")
    print("load average (1, 5, 15 min) at the start and after each set: " + "; ".join(
        ", ".join(f"{v:.2f}" for v in load) for load in result["loadavg"]))
    print(f"engines section: {result['section_s'] / 60:.1f} min")
