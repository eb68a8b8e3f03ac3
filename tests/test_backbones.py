"""Backbones: registry, specs checked against real forward passes, truncation, weights, and extraction."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms.functional import center_crop, resize

from featstore.accounting import CONTEST_FRAME, count_executed_parameters, count_flops, count_parameters
from featstore.backbones import (
    BackboneSpec,
    FeatureExtractor,
    _efficientnet_lite,
    _registry,
    create_backbone,
    efficientnet_lite_classifier,
    get_backbone_spec,
    list_backbones,
    register_backbone,
    resolve_backbone,
)
from featstore.backbones._test_models import TinyBackbone
from featstore.errors import BackboneError

ALEXNET_FEATURES_PARAMS = 2_469_696
SMALL = (128, 224)  # divisible by 32, so every stage is exactly input / stride


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch hub and Hugging Face caches, downloads not allowed: only what a test puts there exists."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("FEATSTORE_ALLOW_DOWNLOAD", raising=False)
    return tmp_path


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_REGISTERED", dict(_registry._REGISTERED))
    monkeypatch.setattr(_registry, "_CACHE", {})


def uint8_frames(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=generator)


# --- registry -------------------------------------------------------------------------------------------


def test_registry_refuses_duplicate_names() -> None:
    before = resolve_backbone("tiny")
    with pytest.raises(BackboneError, match="already registered"):
        register_backbone("tiny")(TinyBackbone)
    assert resolve_backbone("tiny") is before


def test_registered_backbone_is_listed_and_buildable(isolated_registry: None) -> None:
    register_backbone("tiny-copy")(TinyBackbone)
    assert "tiny-copy" in list_backbones("tiny*")
    assert create_backbone("tiny-copy", weights="random").nparams > 0
    with pytest.raises(BackboneError, match="already registered"):
        register_backbone("tiny-copy")(TinyBackbone)


def test_list_backbones_lists_and_filters() -> None:
    names = list_backbones()
    assert names == sorted(names)
    assert {
        "alexnet",
        "resnet18",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "tiny",
    } <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names  # classification models only
    assert not [n for n in names if n.startswith("timm:")]  # the timm catalogue only on request
    assert list_backbones("efficientnet_lite*") == [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    ]
    timm_resnets = list_backbones("timm:resnet1*")
    assert "timm:resnet18" in timm_resnets
    assert all(n.startswith("timm:resnet1") for n in timm_resnets)


@pytest.mark.parametrize("name", ["resnet19", "timm:not_a_timm_model", "alexnett"])
def test_unknown_backbone_says_how_to_find_names(name: str) -> None:
    with pytest.raises(BackboneError, match=r"unknown backbone.*alexnet.*torchvision.*timm:<name>"):
        create_backbone(name, weights="random")


def test_unknown_backbone_suggests_a_close_name() -> None:
    with pytest.raises(BackboneError, match=r"Did you mean.*resnet18"):
        get_backbone_spec("resnet19")


def test_a_mistyped_timm_name_is_matched_against_timm_names() -> None:
    with pytest.raises(BackboneError, match=r"Did you mean timm:resnet18\b") as caught:
        get_backbone_spec("timm:resnet18x")
    suggested = str(caught.value).split("Did you mean ")[1].split("?")[0].split(", ")
    assert all(name.startswith("timm:") for name in suggested)


@pytest.mark.parametrize("name", ["tiny", "alexnet", "resnet18", "timm:resnet18", "efficientnet_lite0"])
def test_spec_round_trips_through_json(name: str) -> None:
    spec = get_backbone_spec(name)
    assert BackboneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.name == name


def test_malformed_spec_dict_is_refused() -> None:
    data = get_backbone_spec("tiny").to_dict()
    data["default_layers"] = ["stage9"]
    with pytest.raises(BackboneError, match="stage9"):
        BackboneSpec.from_dict(data)


# --- specs against reality ------------------------------------------------------------------------------


def test_alexnet_is_its_features_stack_only() -> None:
    extractor = create_backbone("alexnet", weights="random", dtype=torch.float32)
    full = torchvision.models.alexnet()
    assert extractor.nparams == ALEXNET_FEATURES_PARAMS == count_parameters(full.features)
    assert count_parameters(full) > 20 * extractor.nparams  # the classifier is not counted
    x = torch.randn(1, 3, *SMALL)
    assert count_executed_parameters(extractor, x) == ALEXNET_FEATURES_PARAMS
    assert extractor.spec.channels["pool5"] == 256 and extractor.spec.strides["pool5"] == 32


def _features_of(extractor: FeatureExtractor) -> dict[str, torch.Tensor]:
    return {k.removeprefix("body.features."): v for k, v in extractor.state_dict().items()}


def test_alexnet_pool5_equals_torchvision_features_at_the_contest_size() -> None:
    extractor = create_backbone("alexnet", weights="random", seed=1, dtype=torch.float32)
    reference = torchvision.models.alexnet().features.eval()
    reference.load_state_dict(_features_of(extractor))
    frames = uint8_frames(1, CONTEST_FRAME[1:])
    out = extractor.extract(frames)["pool5"]
    assert out.shape == (1, 256, 14, 25)
    with torch.no_grad():
        expected = reference((frames.float() - extractor.mean) / extractor.std)
    torch.testing.assert_close(out, expected)


def test_alexnet_layers_truncate_and_count_what_runs() -> None:
    extractor = create_backbone("alexnet", weights="random", layers=["conv3", "pool1"], dtype=torch.float32)
    assert extractor.layers == ("pool1", "conv3")
    assert extractor.nparams == count_parameters(torchvision.models.alexnet().features[:8])
    x = torch.randn(1, 3, *SMALL)
    assert count_executed_parameters(extractor, x) == extractor.nparams
    shapes = {k: tuple(v.shape) for k, v in extractor(x).items()}
    assert shapes == {"pool1": (1, 64, 15, 27), "conv3": (1, 384, 7, 13)}


def test_torchvision_stages_are_discovered_from_the_model() -> None:
    spec = get_backbone_spec("resnet18")
    assert spec.family == "torchvision"
    assert spec.layers == ("relu", "layer1", "layer2", "layer3", "layer4")
    assert [spec.strides[x] for x in spec.layers] == [2, 4, 8, 16, 32]
    assert [spec.channels[x] for x in spec.layers] == [64, 64, 128, 256, 512]
    assert spec.default_layers == ("layer4",)


CASES = [
    ("tiny", "random", None),
    ("tiny", "random", ["stage1"]),
    ("resnet18", "random", ["layer2"]),
    ("resnet18", "random", ["layer1", "layer3"]),
    ("timm:resnet18", "random", None),
    ("timm:resnet18", "random", ["layer1", "2"]),
    ("efficientnet_lite0", "imagenet", None),
    ("efficientnet_lite0", "random", ["blocks.1"]),
]


@pytest.mark.parametrize(("name", "weights", "layers"), CASES)
def test_nparams_shapes_and_strides_match_a_real_forward(
    name: str, weights: str, layers: list[str] | None
) -> None:
    extractor = create_backbone(name, weights=weights, layers=layers)
    spec = extractor.spec
    frames = uint8_frames(2, SMALL)
    x = (frames.float() - extractor.mean) / extractor.std
    assert extractor.nparams == count_executed_parameters(extractor, x)
    if layers is None:
        assert extractor.layers == spec.default_layers
    out = extractor.extract(frames)
    assert list(out) == list(extractor.layers)
    for layer, features in out.items():
        stride = spec.strides[layer]
        assert features.shape == (2, spec.channels[layer], SMALL[0] // stride, SMALL[1] // stride)
        assert features.dtype == torch.float16
        assert features.is_contiguous()
        assert torch.isfinite(features).all()


def test_truncation_drops_every_module_past_the_deepest_layer() -> None:
    extractor = create_backbone("resnet18", weights="random", layers=["layer2"])
    names = {name for name, _ in extractor.body.named_modules()}
    assert "layer2" in names
    assert not {"layer3", "layer4", "fc"} & names
    assert extractor.nparams < count_parameters(torchvision.models.resnet18()) / 10


def test_timm_features_are_pruned_to_the_deepest_stage() -> None:
    shallow = create_backbone("timm:efficientnet_lite0", weights="random", layers=["1"])
    deep = create_backbone("timm:efficientnet_lite0", weights="random", layers=["4"])
    assert shallow.layers == ("blocks.1",)
    assert shallow.nparams * 10 < deep.nparams
    x = torch.randn(1, 3, *SMALL)
    assert shallow.nparams == count_executed_parameters(shallow, x)


def test_efficientnet_lite_defaults_are_strides_8_16_32() -> None:
    spec = get_backbone_spec("efficientnet_lite2")
    assert spec.family == "efficientnet_lite"
    assert [spec.strides[x] for x in spec.default_layers] == [8, 16, 32]


# --- layer selection ------------------------------------------------------------------------------------


def test_unknown_layer_names_the_layer_and_the_valid_ones() -> None:
    with pytest.raises(BackboneError, match=r"no layer 'layer9'.*relu, layer1, layer2, layer3, layer4"):
        create_backbone("resnet18", weights="random", layers=["layer9"])
    with pytest.raises(BackboneError, match=r"no layer '7'.*stage index 0-4"):
        create_backbone("timm:resnet18", weights="random", layers=["7"])
    with pytest.raises(BackboneError, match="no layers selected"):
        create_backbone("tiny", weights="random", layers=[])


def test_layers_are_ordered_shallow_to_deep_without_repeats() -> None:
    extractor = create_backbone("tiny", weights="random", layers=["stage2", "stage1", "stage2"])
    assert extractor.layers == ("stage1", "stage2")


# --- weights --------------------------------------------------------------------------------------------


def test_random_weights_are_seeded_and_recorded_as_not_pretrained() -> None:
    a = create_backbone("tiny", weights="random", seed=3)
    b = create_backbone("tiny", weights="random", seed=3)
    c = create_backbone("tiny", weights="random", seed=4)
    assert a.weights_digest == b.weights_digest != c.weights_digest
    assert not a.pretrained and a.seed == 3 and a.weights == "random"
    frames = uint8_frames(1, (32, 32))
    assert torch.equal(a.extract(frames)["stage2"], b.extract(frames)["stage2"])


def test_seeding_leaves_the_callers_random_stream_alone() -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    create_backbone("tiny", weights="random", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_random_timm_weights_are_reproducible_and_differ_across_seeds() -> None:
    a = create_backbone("timm:resnet18", weights="random", layers=["layer1"], seed=0)
    again = create_backbone("timm:resnet18", weights="random", layers=["layer1"], seed=0)
    b = create_backbone("timm:resnet18", weights="random", layers=["layer1"], seed=1)
    assert a.weights_digest == again.weights_digest != b.weights_digest


def test_imagenet_alexnet_without_cached_file_names_the_file(offline: Path) -> None:
    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    expected = offline / "torch" / "hub" / "checkpoints" / Path(url).name
    with pytest.raises(BackboneError) as info:
        create_backbone("alexnet", weights="imagenet")
    message = str(info.value)
    assert str(expected) in message and "FEATSTORE_ALLOW_DOWNLOAD" in message
    assert not expected.exists()  # nothing was downloaded


def test_imagenet_alexnet_loads_from_the_torch_hub_cache(offline: Path) -> None:
    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    cached = offline / "torch" / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(5)
    torch.save(torchvision.models.alexnet().state_dict(), cached)
    from_cache = create_backbone("alexnet", weights="imagenet")
    from_file = create_backbone("alexnet", weights=str(cached))
    assert from_cache.pretrained
    assert from_cache.weights_digest == from_file.weights_digest


def test_imagenet_timm_without_cached_file_names_the_file(offline: Path) -> None:
    with pytest.raises(BackboneError, match=r"missing file .*torch.hub.checkpoints.*\.pth"):
        create_backbone("timm:resnet18", weights="imagenet")


def test_imagenet_timm_loads_a_cached_checkpoint(offline: Path) -> None:
    cfg = timm.models.get_pretrained_cfg("resnet18")
    assert cfg is not None and isinstance(cfg.url, str)
    cached = offline / "torch" / "hub" / "checkpoints" / Path(cfg.url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(6)
    full = timm.create_model("resnet18")
    torch.save(full.state_dict(), cached)
    extractor = create_backbone("timm:resnet18", weights="imagenet", layers=["layer1"])
    assert extractor.pretrained
    loaded = extractor.state_dict()
    conv = next(k for k in loaded if k.endswith("conv1.weight"))
    assert torch.equal(loaded[conv], full.state_dict()["conv1.weight"])


def test_imagenet_timm_loads_from_the_hugging_face_cache(offline: Path) -> None:
    cfg = timm.models.get_pretrained_cfg("resnet18")
    assert cfg is not None and cfg.hf_hub_id
    repo_folder = offline / "hf" / ("models--" + cfg.hf_hub_id.replace("/", "--"))
    commit = "0" * 40
    (repo_folder / "refs").mkdir(parents=True)
    (repo_folder / "refs" / "main").write_text(commit)
    snapshot = repo_folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.manual_seed(8)
    full = timm.create_model("resnet18")
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, snapshot / "model.safetensors")
    extractor = create_backbone("timm:resnet18", weights="imagenet", layers=["layer1"])
    loaded = extractor.state_dict()
    conv = next(k for k in loaded if k.endswith("conv1.weight"))
    assert torch.equal(loaded[conv], full.state_dict()["conv1.weight"])


def test_tiny_has_no_imagenet_weights() -> None:
    with pytest.raises(BackboneError, match=r"tiny.*random"):
        create_backbone("tiny", weights="imagenet")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_weights_file_round_trip_keeps_the_digest(tmp_path: Path, suffix: str) -> None:
    original = create_backbone("tiny", weights="random", seed=9)
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    loaded = create_backbone("tiny", weights=str(path))
    assert loaded.weights_digest == original.weights_digest
    assert loaded.pretrained and loaded.weights == str(path)
    frames = uint8_frames(1, (32, 48))
    assert torch.equal(loaded.extract(frames)["stage2"], original.extract(frames)["stage2"])


def test_weights_file_of_the_full_model_loads_into_the_truncated_extractor(tmp_path: Path) -> None:
    torch.manual_seed(7)
    full = torchvision.models.resnet18()
    path = tmp_path / "resnet18-full.pth"
    torch.save(full.state_dict(), path)  # includes layer3, layer4 and fc, which the extractor does not have
    from_file = create_backbone("resnet18", weights=str(path), layers=["layer2"])
    seeded = create_backbone("resnet18", weights="random", seed=7, layers=["layer2"])
    assert from_file.weights_digest == seeded.weights_digest
    assert torch.equal(from_file.state_dict()["body.layer2.0.conv1.weight"], full.layer2[0].conv1.weight)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(BackboneError, match=re.escape(str(path))):
        create_backbone("tiny", weights=str(path))


def test_weights_file_of_another_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(create_backbone("tiny", weights="random").state_dict(), path)
    with pytest.raises(BackboneError, match=rf"{re.escape(str(path))}.*does not fit.*missing"):
        create_backbone("resnet18", weights=str(path), layers=["layer1"])


def test_weights_file_with_a_wrong_shape_names_file_and_tensor(tmp_path: Path) -> None:
    state = create_backbone("tiny", weights="random").state_dict()
    state["body.stage1.0.weight"] = torch.zeros(16, 8, 5, 5)
    path = tmp_path / "bad-shape.pt"
    torch.save(state, path)
    with pytest.raises(BackboneError, match=rf"{re.escape(str(path))}.*stage1\.0\.weight.*\(16, 8, 5, 5\)"):
        create_backbone("tiny", weights=str(path))


@pytest.mark.parametrize(
    ("filename", "content"), [("list.pt", b""), ("notes.txt", b"hello"), ("junk.pth", b"xx")]
)
def test_unreadable_weights_files_are_named(tmp_path: Path, filename: str, content: bytes) -> None:
    path = tmp_path / filename
    if filename == "list.pt":
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(BackboneError, match=re.escape(str(path))):
        create_backbone("tiny", weights=str(path))


# --- EfficientNet-Lite weights --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", _efficientnet_lite.VARIANTS)
def test_efficientnet_lite_package_weights_map_onto_timm(variant: str) -> None:
    mapped = _efficientnet_lite.imagenet_state_dict(variant)
    expected = timm.create_model(variant).state_dict()
    assert list(mapped) == list(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)
    extractor = create_backbone(variant, weights="imagenet")
    assert extractor.pretrained
    assert extractor.state_dict()["body.net.model.conv_stem.weight"].equal(mapped["conv_stem.weight"])


def test_efficientnet_lite_mapping_refuses_weights_of_another_variant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lite1 = _efficientnet_lite.weights_file("efficientnet_lite1")
    monkeypatch.setattr(_efficientnet_lite, "weights_file", lambda variant: lite1)
    with pytest.raises(BackboneError, match=re.escape(str(lite1))):
        _efficientnet_lite.imagenet_state_dict("efficientnet_lite0")


@pytest.mark.realdata
def test_efficientnet_lite0_classifies_a_davis_frame(davis_dev: Path) -> None:
    model = efficientnet_lite_classifier("efficientnet_lite0")
    spec = get_backbone_spec("efficientnet_lite0")
    image = np.asarray(Image.open(davis_dev / "JPEGImages" / "480p" / "cows" / "00000.jpg").convert("RGB"))
    x = center_crop(resize(torch.from_numpy(image.copy()).permute(2, 0, 1), [256], antialias=True), [224])
    x = (x.float() / 255 - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)
    with torch.no_grad():
        top5 = model(x[None]).softmax(-1)[0].topk(5).indices.tolist()
    assert top5[0] == 345 or {345, 346, 347} & set(top5)  # ox, water buffalo, bison


# --- extraction -----------------------------------------------------------------------------------------


def test_extract_normalizes_inside_and_casts_to_the_storage_dtype() -> None:
    fp32 = create_backbone("tiny", weights="random", dtype=torch.float32)
    bf16 = create_backbone("tiny", weights="random", dtype=torch.bfloat16)
    frames = uint8_frames(2, (40, 64))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = fp32((frames.float() / 255 - mean) / std)
    out = fp32.extract(frames)
    torch.testing.assert_close(out["stage1"], expected["stage1"], rtol=1e-5, atol=1e-5)
    low = bf16.extract(frames)["stage2"]
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), out["stage2"], rtol=2e-2, atol=2e-2)


def test_extract_refuses_float_frames() -> None:
    extractor = create_backbone("tiny", weights="random")
    with pytest.raises(ValueError, match="uint8"):
        extractor.extract(torch.zeros(1, 3, 16, 16))


def test_extractor_is_frozen_and_describes_itself() -> None:
    extractor = create_backbone("tiny", weights="random", seed=2).train()
    assert not extractor.training and not extractor.body.training
    assert not any(p.requires_grad for p in extractor.parameters())
    described = json.loads(json.dumps(extractor.describe()))
    assert described["weights_digest"] == extractor.weights_digest
    assert described["pretrained"] is False and described["seed"] == 2
    assert extractor.preprocessing()["resize"] == "none"
    assert extractor.preprocessing()["mean"] == list(extractor.spec.mean)


def test_backbone_flops_match_the_convolution_formula_on_a_contest_frame() -> None:
    extractor = create_backbone("alexnet", weights="random", dtype=torch.float32)
    x = torch.zeros(1, *CONTEST_FRAME)
    expected, h = 0, x
    for module in torchvision.models.alexnet().features:
        out = module(h)
        if isinstance(module, torch.nn.Conv2d):
            cout, cin, kh, kw = module.weight.shape
            expected += 2 * cin * cout * kh * kw * out.shape[2] * out.shape[3]
        h = out
    assert count_flops(extractor, x) == expected


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "weights", "layers"),
    [("resnet18", "random", ["layer1", "layer3"]), ("efficientnet_lite0", "imagenet", None)],
)
def test_cuda_extract_uses_low_precision_and_matches_cpu(
    name: str, weights: str, layers: list[str] | None, dtype: torch.dtype
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu = create_backbone(name, weights=weights, layers=layers, dtype=torch.float32)
    gpu = create_backbone(name, weights=weights, layers=layers, dtype=dtype).to("cuda")
    frames = uint8_frames(2, SMALL)
    expected = cpu.extract(frames)
    out = gpu.extract(frames.cuda())
    assert gpu.weights_digest == cpu.weights_digest
    for layer in expected:
        assert out[layer].dtype == dtype and out[layer].is_cuda and out[layer].is_contiguous()
        error = (out[layer].float().cpu() - expected[layer]).norm() / expected[layer].norm()
        assert error < (2e-2 if dtype == torch.float16 else 6e-2)  # 11 vs 8 mantissa bits, through ~20 layers
