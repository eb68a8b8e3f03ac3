"""Decoder heads: registry, full-resolution output shapes, parameter and FLOP accounting, layer use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from decoders import (
    DEFAULT_DECODER,
    Decoder,
    create_decoder,
    get_decoder_class,
    list_decoders,
    register_decoder,
)
from featstore.errors import FeatstoreError

# Two layers at the odd grids an 854x480 frame gives at strides 8 and 32.
CHANNELS = {"stage3": 24, "stage5": 40}
STRIDES = {"stage3": 8, "stage5": 32}
SIZES = {"stage3": (60, 107), "stage5": (15, 27)}
FRAME = (480, 854)


def test_registry_lists_the_builtin_heads_and_default() -> None:
    names = list_decoders()
    assert {"linear", "conv", "fpn", "temporal"} <= set(names)
    assert names == sorted(names)
    assert DEFAULT_DECODER in names
    assert list_decoders("f*") == ["fpn"]


def test_registry_refuses_duplicate_names() -> None:
    class Another(Decoder):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_decoder("fpn")(Another)
    assert get_decoder_class("fpn").__name__ == "FPNHead"


def test_unknown_decoder_and_option_are_user_errors() -> None:
    with pytest.raises(FeatstoreError, match="unknown: use one of"):
        create_decoder("no-such-head", CHANNELS, STRIDES)
    with pytest.raises(FeatstoreError, match="no option depth"):
        create_decoder("fpn", CHANNELS, STRIDES, depth=3)
    with pytest.raises(FeatstoreError, match="not among the feature layers"):
        create_decoder("fpn", CHANNELS, STRIDES, layers=["stage9"])
    with pytest.raises(FeatstoreError, match="name different layers"):
        create_decoder("linear", CHANNELS, {"stage3": 8})


@pytest.mark.parametrize("name", list_decoders())
def test_output_is_full_resolution_for_odd_feature_grids(name: str) -> None:
    head = create_decoder(name, CHANNELS, STRIDES)
    features = {
        layer: torch.randn(head.example_features(SIZES, batch=2)[layer].shape, dtype=torch.float16)
        for layer in head.layers
    }
    with torch.no_grad():
        logits = head(features, FRAME)
    assert logits.shape == (2, 1, *FRAME)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_decoders())
def test_nparams_counts_every_parameter(name: str) -> None:
    from featstore.accounting import count_parameters

    head = create_decoder(name, CHANNELS, STRIDES)
    assert head.nparams == sum(p.numel() for p in head.parameters()) > 0
    assert head.nparams == count_parameters(head)
    assert head.spec()["nparams"] == head.nparams


def test_linear_head_flops_match_a_recount() -> None:
    head = create_decoder("linear", CHANNELS, STRIDES)
    h, w = SIZES["stage5"]
    assert head.nflops(SIZES) == 2 * CHANNELS["stage5"] * h * w


@pytest.mark.parametrize("name", list_decoders())
def test_flops_are_counted(name: str) -> None:
    head = create_decoder(name, CHANNELS, STRIDES)
    linear = create_decoder("linear", CHANNELS, STRIDES)
    assert head.nflops(SIZES) >= linear.nflops(SIZES) > 0


@pytest.mark.parametrize("training", [True, False])
def test_counting_flops_leaves_batchnorm_statistics_and_mode_alone(training: bool) -> None:
    head = create_decoder("fpn", CHANNELS, STRIDES, norm="batch")
    for name, buffer in head.named_buffers():
        if "running" in name:
            buffer.normal_()  # statistics a training pass left, which zero inputs would pull away
    head.train(training)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    assert head.nflops(SIZES) > 0
    torch.testing.assert_close(head.state_dict(), before)
    assert head.training is training


def _input_gradients(head: Decoder) -> dict[str, float]:
    features = {k: v.requires_grad_() for k, v in head.example_features(SIZES).items()}
    for v in features.values():
        v.data.normal_()
    head(features, FRAME).sum().backward()
    return {layer: float(v.grad.abs().sum()) if v.grad is not None else 0.0 for layer, v in features.items()}


def test_fpn_fuses_every_layer_and_single_layer_heads_read_the_deepest() -> None:
    fpn = create_decoder("fpn", CHANNELS, STRIDES)
    assert fpn.layers == ("stage3", "stage5")
    assert all(g > 0 for g in _input_gradients(fpn).values())
    for name in ("linear", "conv"):
        head = create_decoder(name, CHANNELS, STRIDES)
        assert head.layers == ("stage5",)
        assert _input_gradients(head)["stage5"] > 0


def test_layers_are_ordered_by_stride_not_by_name() -> None:
    head = create_decoder("fpn", {"b": 8, "a": 8, "c": 8}, {"b": 4, "a": 16, "c": 8})
    assert head.layers == ("b", "c", "a")
    assert create_decoder("linear", {"b": 8, "a": 8}, {"b": 4, "a": 16}).layers == ("a",)


def test_spec_rebuilds_the_same_head() -> None:
    head = create_decoder("fpn", CHANNELS, STRIDES, width=32, norm="group", context=False)
    spec = head.spec()
    rebuilt = create_decoder(spec["name"], spec["channels"], spec["strides"], **spec["config"])
    rebuilt.load_state_dict(head.state_dict())
    head.eval()
    rebuilt.eval()
    features = head.example_features(SIZES)
    for v in features.values():
        v.normal_()
    assert torch.equal(head(features, FRAME), rebuilt(features, FRAME))


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_every_norm_builds_and_runs(norm: str) -> None:
    head = create_decoder("fpn", CHANNELS, STRIDES, width=24, norm=norm)
    assert head(head.example_features(SIZES, batch=2), FRAME).shape == (2, 1, *FRAME)
    with pytest.raises(FeatstoreError, match="norm 'layer' is unknown"):
        create_decoder("fpn", CHANNELS, STRIDES, norm="layer")


def test_temporal_head_reads_a_window_of_frames() -> None:
    head = create_decoder("temporal", CHANNELS, STRIDES, window=2)
    assert head.temporal_window == 2
    assert head.example_features(SIZES)["stage3"].shape == (1, 5, 24, 60, 107)
    with pytest.raises(FeatstoreError, match="5-d tensor"):
        head({layer: torch.zeros(1, c, *SIZES[layer]) for layer, c in CHANNELS.items()}, FRAME)
    with pytest.raises(FeatstoreError, match="expects 5 frames"):
        head({layer: torch.zeros(1, 3, c, *SIZES[layer]) for layer, c in CHANNELS.items()}, FRAME)
    with pytest.raises(FeatstoreError, match="window"):
        create_decoder("temporal", CHANNELS, STRIDES, window=0)


def test_temporal_head_uses_its_neighbours() -> None:
    head = create_decoder("temporal", CHANNELS, STRIDES)
    features = head.example_features(SIZES)
    for v in features.values():
        v.normal_()
    changed = {k: v.clone() for k, v in features.items()}
    changed["stage5"][:, 0] += 1.0  # only the previous frame differs
    with torch.no_grad():
        assert not torch.allclose(head(features, FRAME), head(changed, FRAME))


def test_missing_layer_is_a_user_error() -> None:
    head = create_decoder("fpn", CHANNELS, STRIDES)
    with pytest.raises(FeatstoreError, match="missing"):
        head({"stage5": torch.zeros(1, 40, 15, 27)}, FRAME)


def test_heads_are_modules_with_names() -> None:
    for name in list_decoders():
        head = create_decoder(name, CHANNELS, STRIDES)
        assert isinstance(head, nn.Module)
        assert head.name == name
