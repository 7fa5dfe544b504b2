"""What ``make bench`` runs: extraction throughput against forward-only, cache hits, memory.

Each extraction runs in a fresh process so its peak memory is its own; forward-only runs the
same model, prepared the same way, on the same batch size of ready tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.backbones import DEFAULT_BACKBONE, resolve_backbone
from pipeline.data import ImageFiles, load_image_set
from pipeline.devices import default_batch_size, resolve_device
from pipeline.extract import extract_features, prepare_model

FORWARD_SECONDS = 8.0
_CHILD = """
import json, resource, sys, time
from pipeline.extract import extract_features
kw = json.loads(sys.argv[1])
result = extract_features(**kw)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({**result.to_json(), "peak_rss_mb": rss / 1024, "loader_rss_mb": kids / 1024}))
"""


def generate_images(root: Path, n: int, classes: int = 10, size: int = 256, seed: int = 0) -> Path:
    """``n`` photo-sized JPEGs (smooth colour fields plus noise) in ``classes`` folders."""
    if root.exists() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = i % classes
        base = np.stack([np.sin(xx * (c + 1) * 3), np.cos(yy * (c + 2) * 2), xx * yy], -1)
        pixels = (base * 100 + 128 + rng.normal(0, 25, base.shape)).clip(0, 255)
        path = root / f"class{c:02d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    return root


def extract_in_child(data: Path, cache_dir: Path, backbone: str) -> dict:
    kw = {"data": str(data), "cache_dir": str(cache_dir), "backbone": backbone,
          "progress": False}
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(kw)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@torch.inference_mode()
def forward_only(data: Path, backbone: str) -> float:
    """Images per second of the model alone, on preprocessed tensors already in memory."""
    spec = resolve_backbone(backbone)
    device = resolve_device("auto")
    model = prepare_model(spec, device)
    bs = default_batch_size(device)
    images = load_image_set(data)
    crop = spec.preprocessing.crop
    files = ImageFiles(images, spec.preprocessing.transform(), (3, crop, crop))
    batches = [torch.stack([files[i][0] for i in range(j, j + bs)]).to(device)
               for j in range(0, 4 * bs, bs)]
    model(batches[0])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < FORWARD_SECONDS:
        for x in batches:
            model(x).cpu()
            done += len(x)
    return done / (time.perf_counter() - started)


def bench_set(name: str, data: Path, out: Path, backbone: str) -> dict:
    cache_dir = out / f"cache-{name}"
    for old in cache_dir.glob("*"):
        old.unlink()
    # Forward-only before and after the extraction: this shared machine drifts by about 10%
    # from minute to minute, and the mean brackets the extraction in time.
    before = forward_only(data, backbone)
    miss = extract_in_child(data, cache_dir, backbone)
    forward = (before + forward_only(data, backbone)) / 2
    hit = extract_features(data, backbone=backbone, cache_dir=cache_dir, progress=False)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "extract", str(data), "--backbone",
                    backbone, "--cache-dir", str(cache_dir), "--json"], check=True,
                   capture_output=True)
    hit_cli = time.perf_counter() - started
    end_to_end = miss["images"] / miss["seconds"]
    return {
        "set": name, "images": miss["images"], "end_to_end_img_s": end_to_end,
        "forward_only_img_s": forward, "ratio": end_to_end / forward,
        "extract_s": miss["seconds"], "hit_s": hit.seconds, "hit_fraction": hit.seconds /
        miss["seconds"], "hit_cli_s": hit_cli, "peak_rss_mb": miss["peak_rss_mb"],
        "loader_rss_mb": miss["loader_rss_mb"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist-mini"))
    parser.add_argument("--large", type=int, default=3000, help="images in the generated set")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--out", type=Path, default=Path("bench"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    large = generate_images(args.out / f"generated-{args.large}", args.large)
    rows = [bench_set("demo", args.data, args.out, args.backbone),
            bench_set(f"generated-{args.large}", large, args.out, args.backbone)]
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "device": str(resolve_device("auto")), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    print(f"backbone {args.backbone}, {machine['device']}, {machine['cpu_count']} cores, "
          f"{machine['threads']} torch threads, batch {default_batch_size(resolve_device())}")
    header = ("set", "images", "e2e img/s", "fwd img/s", "ratio", "extract s", "hit s",
              "hit/extract", "hit CLI s", "peak RSS MB", "loader RSS MB")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([r["set"], str(r["images"]), f"{r['end_to_end_img_s']:.1f}",
                          f"{r['forward_only_img_s']:.1f}", f"{r['ratio']:.2f}",
                          f"{r['extract_s']:.1f}", f"{r['hit_s']:.3f}",
                          f"{100 * r['hit_fraction']:.2f}%", f"{r['hit_cli_s']:.2f}",
                          f"{r['peak_rss_mb']:.0f}", f"{r['loader_rss_mb']:.0f}"]))
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "extract": rows},
                                                      indent=2) + "\n")
    print(f"written to {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
