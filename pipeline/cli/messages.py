"""The one line a user's mistake ends in: the error's own message, and the command line's advice.

The library's errors (:mod:`pipeline.core.errors`) say what is wrong without naming a command,
since a script meets them too; the advice that only makes sense at the command line (which
command lists what is there, which one to run first) is worded here, once, keyed on the
error's ``reason`` and filled in from its facts.
"""

from __future__ import annotations

from pipeline.core.errors import PipelineError

__all__ = ["ADVICE", "advice", "one_line"]

# reason -> what the command line adds; {fact} is filled in from the error's facts.
ADVICE = {
    "activation-cache": "`pipeline cache list` shows each file's kind",
    "engine-export": "`pipeline cache info` describes it",
    "cache-match": "`pipeline cache list` shows them",
    "unlabelled-cache": "`pipeline audit`, `pipeline predict` and `pipeline cache export` take "
                        "it as it is",
    "unknown-backbone": "`pipeline backbones` lists the known ones",
    "unknown-layer": "`pipeline layers {backbone}` lists them",
    "no-bottleneck": "choose a layer with --layer (see `pipeline layers {backbone}`)",
    "too-many-blocks": "`pipeline blocks {backbone}` lists them",
    "too-many-layers": "`pipeline blocks {backbone} --layers` lists them",
    "no-model": "run `pipeline heads` or `pipeline finetune` first",
    "tta-on-cache": "or predict without --tta",
    # Advice that names the flags of the command line; the library's message holds the facts.
    "no-room-features": "or use another --cache-dir (or --dtype float16, half the size)",
    "no-room-activations": "or use another --cache-dir, fewer --views, or --from-images",
    "cache-write-failed": "or use another --cache-dir",
    "damaged-no-repair": "run without --no-repair to move it aside and build it anew",
    "damaged-stuck": "or use another --cache-dir",
    "strict-unreadable": "drop --strict to skip and list such files",
    "empty-split": "`pipeline extract --split` sets them",
    "engine-device": "use --engine torch (or auto) there, or --device cpu",
    "compile-engine": "drop --compile, or use --engine torch",
    "engine-failed": "use --engine torch",
    "weights-offline": "or pass --weights PATH (--weights none for random init); without "
                       "--offline (or PIPELINE_OFFLINE) they would be downloaded",
    "weights-download": "or pass --weights PATH (with --offline to never download), or "
                        "--weights none for random init",
    "another-run": "or use another --out",
    "cut-needs-images": "fine-tune from images (--from-images)",
    "needs-blocks": "extract with --layer blocks",
    "pool-space": "`pipeline extract` takes --backbone, --weights, --layer and --image-size",
    "no-weights-source": "pass --weights PATH (a state dict) or --weights none for random init",
}


def advice(err: PipelineError) -> str | None:
    """What the command line adds to ``err``'s message, or None."""
    template = ADVICE.get(getattr(err, "reason", None) or "")
    if template is None:
        return None
    try:
        return template.format(**{k: v if v is not None else "BACKBONE"
                                  for k, v in err.facts.items()})
    except KeyError:  # a fact the template names is missing: the advice without it
        return template.replace(" {backbone}", "")


def one_line(err: PipelineError) -> str:
    """``err``'s message and its advice, on one line.

    For an error raised in a DataLoader worker, which torch re-raises with the worker's
    traceback as its text, the traceback's last line without the class name.
    """
    text = str(err)
    if text.startswith("Caught ") and "\n" in text.strip():
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    extra = advice(err)
    return f"{text}; {extra}" if extra else text
