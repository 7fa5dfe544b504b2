"""Drafted JPEG decoding against the full decode: pixels, features and a head's accuracy.

1. Real photos (JPEG files under the folders given, shorter side 1,024 px or more, which the
   default recipe drafts): the network's 8-bit input (after resize and crop) in each mode,
   mean and largest absolute difference on 0-255, and each mode's decode time.
2. A held-out set: the demo's Fashion-MNIST images enlarged to a phone's 4032 x 3024 (the
   28 px picture to 3024 px, bicubic, centred on black) and saved as JPEG at quality 90;
   extracted in both modes, a logreg head fitted on each mode's training features and
   compared on the same test images: each accuracy, the paired difference with its 95%
   bootstrap interval and McNemar's p (pipeline.metrics.significance).

    python scripts/measure_decode.py --photos /usr/share/backgrounds --out /tmp/decode
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.options import ExtractOptions
from pipeline.data.decode import decode_image
from pipeline.extract.features import extract_features
from pipeline.heads.spec import make_head
from pipeline.metrics.significance import paired_difference
from pipeline.models.backbones import resolve_backbone
from pipeline.store.cache import read_split

DEMO = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-mini"
PHONE = (4032, 3024)


def crops(path: Path, recipe) -> dict[str, tuple[np.ndarray, float]]:
    """The network's 8-bit input in each mode, and the milliseconds it took."""
    transform = recipe.transform(normalize=False)
    out = {}
    for mode in ("exact", "draft"):
        started = time.perf_counter()
        x = transform(decode_image(path, resize=recipe.resize,
                                   interpolation=recipe.interpolation, mode=mode))
        out[mode] = (x.numpy().astype(np.float32), 1000 * (time.perf_counter() - started))
    return out


def photo_differences(folders: list[Path], recipe) -> list[dict]:
    rows = []
    for path in sorted(p for f in folders for p in f.rglob("*") if p.suffix.lower() in
                       (".jpg", ".jpeg")):
        with Image.open(path) as img:
            size = img.size
        if min(size) < 4 * recipe.resize:  # too small to draft: decoded alike
            continue
        got = crops(path, recipe)
        diff = np.abs(got["draft"][0] - got["exact"][0])
        rows.append({"photo": str(path), "size": list(size),
                     "mb": path.stat().st_size / 1e6, "mean": float(diff.mean()),
                     "max": float(diff.max()), "exact_ms": got["exact"][1],
                     "draft_ms": got["draft"][1]})
    return rows


def enlarged_set(out: Path, per_class: dict[str, int]) -> Path:
    """The first images of each class of the demo's splits, enlarged to a phone's frame."""
    root = out / "fashion-mnist-4032"
    for split, n in per_class.items():
        for folder in sorted((DEMO / split).iterdir()):
            for src in sorted(folder.glob("*.png"))[:n]:
                dst = root / split / folder.name / (src.stem + ".jpg")
                if dst.exists():
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                small = Image.open(src).convert("RGB")
                canvas = Image.new("RGB", PHONE)
                canvas.paste(small.resize((PHONE[1], PHONE[1]), Image.Resampling.BICUBIC),
                             ((PHONE[0] - PHONE[1]) // 2, 0))
                canvas.save(dst, quality=90)
    return root


def head_comparison(root: Path, out: Path, recipe) -> dict:
    caches, seconds = {}, {}
    for mode in ("draft", "exact"):
        started = time.perf_counter()
        options = ExtractOptions(cache_dir=out / "cache", decode=mode)
        caches[mode] = extract_features(root, options=options, progress=False).cache_path
        seconds[mode] = time.perf_counter() - started
    preds, accuracy = {}, {}
    for mode, cache in caches.items():
        train, val, test = (read_split(cache, s) for s in ("train", "val", "test"))
        head = make_head("logreg").fit(train.X, train.y, val.X, val.y)
        preds[mode], y = head.predict(test.X), test.y
        accuracy[mode] = float(np.mean(preds[mode] == y))
        paths = test.paths
    pair = paired_difference(y, preds["draft"], preds["exact"])
    diffs = [np.abs(c["draft"][0] - c["exact"][0])
             for c in (crops(root / p, recipe) for p in paths)]
    return {"test_images": len(y), "accuracy": accuracy, "difference": pair.difference,
            "ci": [pair.ci_low, pair.ci_high], "p_value": pair.p_value,
            "draft_only": pair.a_only, "exact_only": pair.b_only,
            "pixel_mean": float(np.mean([d.mean() for d in diffs])),
            "pixel_max": float(max(d.max() for d in diffs)), "extract_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=Path("results/decode"))
    parser.add_argument("--train", type=int, default=30, help="training images per class")
    parser.add_argument("--val", type=int, default=10, help="validation images per class")
    parser.add_argument("--test", type=int, default=30, help="test images per class")
    args = parser.parse_args(argv)
    recipe = resolve_backbone("efficientnet_lite0").preprocessing
    photos = photo_differences(args.photos, recipe)
    for r in photos:
        print(f"{Path(r['photo']).name:32s} {r['size'][0]}x{r['size'][1]} {r['mb']:.1f} MB  "
              f"mean {r['mean']:.2f} max {r['max']:.0f}  exact {r['exact_ms']:.0f} ms, "
              f"draft {r['draft_ms']:.0f} ms")
    root = enlarged_set(args.out, {"train": args.train, "val": args.val, "test": args.test})
    heads = head_comparison(root, args.out, recipe)
    print(json.dumps(heads, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps({"photos": photos, "heads": heads},
                                                     indent=2) + "\n")


if __name__ == "__main__":
    main()
