"""``make bench --only photos``: 12-megapixel phone JPEGs, ``pipeline extract`` against the
PyTorch tutorial's loop on the same files.

The tutorial's loop (ImageFolder, ``Resize(256)``, ``CenterCrop(224)``, a DataLoader with 2
workers, batches of 4, the network under ``torch.no_grad``) decodes every pixel of each photo
and resizes 12 megapixels; ``pipeline extract`` decodes a JPEG at the scale the network needs
(:mod:`pipeline.data.decode`) and, on a CPU, decodes in threads while the network runs. Each
runs in a fresh process, timed from its start to its end (imports, building the network and
the loader's start-up included), so the ratio is what a user waits; ``pipeline extract``'s
helper process decodes the first photos while it starts (:mod:`pipeline.data.early`). The
decode and resize of one image in each mode is timed in this process, one image at a time.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.options import DEFAULT_BACKBONE
from pipeline.data.decode import decode_image
from pipeline.models.backbones import build_feature_model, resolve_backbone
from pipeline.store.cache import cache_info

__all__ = ["bench_photos", "make_photos", "print_photos", "tutorial_loop"]

PHONE_SIZE = (4032, 3024)  # a 12-megapixel phone camera's 4:3 frame
_QUALITY = 90
_TIMED_IMAGES = 20  # images whose decode and resize are timed in each mode
_TUTORIAL_BATCH, _TUTORIAL_WORKERS = 4, 2  # the transfer-learning tutorial's loader


def make_photos(root: Path, n: int, size: tuple[int, int] = PHONE_SIZE, seed: int = 0) -> Path:
    """``n`` photo-like JPEGs of ``size`` in two class folders (each made once, then reused).

    Smooth shading and hard-edged shapes drawn at a quarter of the size and enlarged, then
    sensor-like noise at full size: about 2.4 MB each at quality 90, as a phone's photos are.
    """
    rng = np.random.default_rng(seed)
    w, h = size[0] // 4, size[1] // 4
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    # One noise field, shifted per photo: drawing 36 million normals per photo would take
    # longer than everything else here.
    noise = rng.normal(0, 6, (size[1], size[0] * 2, 3)).astype(np.int16)
    for i in range(n):
        phase = rng.uniform(0, 6, 3)
        small = np.stack([120 + 80 * np.sin(x / rng.uniform(40, 200) + p) *
                          np.cos(y / rng.uniform(40, 200) - p) for p in phase], -1)
        for _ in range(12):
            x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
            small[y0:y0 + rng.integers(20, h // 3), x0:x0 + rng.integers(20, w // 3)] = \
                rng.integers(0, 256, 3)
        shift = int(rng.integers(0, size[0]))
        path = root / f"class{i % 2}" / f"{i:04d}.jpg"
        if path.exists():  # the same seed draws the same photo: made by an earlier run
            continue
        big = np.asarray(Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize(
            size, Image.Resampling.BICUBIC), np.int16)
        big += noise[:, shift:shift + size[0]]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(big.clip(0, 255).astype(np.uint8)).save(path, quality=_QUALITY)
    return root


def tutorial_loop(data: str, backbone: str = DEFAULT_BACKBONE) -> dict:
    """The tutorial's loop over ``data`` with the backbone's recipe; its loop seconds."""
    import torch
    from torchvision import datasets, transforms

    spec = resolve_backbone(backbone)
    recipe = spec.preprocessing
    transform = transforms.Compose([
        transforms.Resize(recipe.resize, transforms.InterpolationMode(recipe.interpolation)),
        transforms.CenterCrop(recipe.crop), transforms.ToTensor(),
        transforms.Normalize(recipe.mean, recipe.std)])
    model = build_feature_model(spec).eval()
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(data, transform),
                                         batch_size=_TUTORIAL_BATCH, shuffle=False,
                                         num_workers=_TUTORIAL_WORKERS)
    started, images = time.perf_counter(), 0
    with torch.no_grad():
        for x, _ in loader:
            model(x)
            images += len(x)
    return {"images": images, "loop_seconds": time.perf_counter() - started}


def _timed_run(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (the process and every process it waited for: the loader's
    workers too) and stdout of ``command``."""
    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    started, cpu_before = time.perf_counter(), cpu()
    run = subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, cpu() - cpu_before, run.stdout


def _decode_ms(paths: list[Path], backbone: str) -> dict[str, float]:
    """Milliseconds per image to decode and preprocess up to the 8-bit crop, one thread."""
    recipe = resolve_backbone(backbone).preprocessing
    transform = recipe.transform(normalize=False)
    out = {}
    for mode in ("exact", "draft"):
        started = time.perf_counter()
        for path in paths:
            transform(decode_image(path, resize=recipe.resize,
                                   interpolation=recipe.interpolation, mode=mode))
        out[mode] = 1000 * (time.perf_counter() - started) / len(paths)
    return out


def bench_photos(out: Path, n: int = 120, backbone: str = DEFAULT_BACKBONE) -> dict:
    """The tutorial's loop, ``pipeline extract`` (draft, then exact) on ``n`` phone JPEGs."""
    data = make_photos(out / f"photos-{n}", n)
    paths = sorted(data.rglob("*.jpg"))
    tutorial_s, tutorial_cpu, stdout = _timed_run(
        [sys.executable, "-m", "pipeline.bench.photos", "tutorial", str(data), backbone])
    tutorial = json.loads(stdout.strip().splitlines()[-1])
    runs = {}
    for mode in ("draft", "exact"):
        cache_dir = out / f"cache-photos-{mode}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        seconds, cpu, stdout = _timed_run([sys.executable, "-m", "pipeline", "extract", str(data),
                                      "--backbone", backbone, "--cache-dir", str(cache_dir),
                                      "--decode", mode, "--json", "--quiet"])
        summary = json.loads(stdout.strip().splitlines()[-1])
        timings = cache_info(summary["cache_path"])["timings"]
        runs[mode] = {"seconds": seconds, "img_s": n / seconds, "cpu_s": cpu,
                      "loop_img_s": n / timings["loop_seconds"],
                      "decoded_early": timings.get("decoded_early", 0)}
    result = {
        "images": n, "size": list(PHONE_SIZE), "mb_per_image":
            sum(p.stat().st_size for p in paths) / n / 1e6, "cores": os.cpu_count(),
        "tutorial": {"seconds": tutorial_s, "img_s": n / tutorial_s, "cpu_s": tutorial_cpu,
                     "loop_img_s": n / tutorial["loop_seconds"]},
        "extract": runs, "ratio": runs["draft"]["img_s"] / (n / tutorial_s),
        "ratio_exact": runs["exact"]["img_s"] / (n / tutorial_s),
        "decode_ms": _decode_ms(paths[:_TIMED_IMAGES], backbone),
    }
    print_photos(result)
    return result


def print_photos(r: dict) -> None:
    print(f"{r['images']} JPEGs of {r['size'][0]} x {r['size'][1]} "
          f"({r['mb_per_image']:.1f} MB each), {r['cores']} cores; images/s from process "
          "start to end (loop only), ratio; CPU seconds in all (every process)")
    rows = [("tutorial loop", r["tutorial"], 1.0),
            ("pipeline extract", r["extract"]["draft"], r["ratio"]),
            ("pipeline extract --decode exact", r["extract"]["exact"], r["ratio_exact"])]
    for name, run, ratio in rows:
        early = (f"  {run['decoded_early']} decoded while it started"
                 if run.get("decoded_early") else "")
        print(f"  {name:32s} {run['img_s']:6.1f} img/s ({run['loop_img_s']:6.1f})  "
              f"{ratio:.2f}x  {run['cpu_s']:6.1f} CPU s{early}")
    ms = r["decode_ms"]
    print(f"  decode + resize + crop, one image, one thread: exact {ms['exact']:.1f} ms, "
          f"draft {ms['draft']:.1f} ms ({ms['exact'] / ms['draft']:.1f}x)")


if __name__ == "__main__":  # the tutorial's loop in a fresh process: tutorial DATA BACKBONE
    print(json.dumps(tutorial_loop(sys.argv[2], sys.argv[3])))
