"""``tiny``: a registered few-thousand-parameter backbone so tests and demos run in milliseconds on a CPU."""

from __future__ import annotations

from torch import Tensor, nn

from featstore.backbones._definition import BackboneDefinition
from featstore.backbones._registry import register_backbone
from featstore.backbones._spec import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
from featstore.errors import BackboneError


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class TinyBody(nn.Module):
    """stem (stride 2) -> stage1 (stride 4, 16 ch) -> stage2 (stride 8, 32 ch); stage2 only when asked for."""

    def __init__(self, with_stage2: bool) -> None:
        super().__init__()
        self.stem = _conv(3, 8)
        self.stage1 = _conv(8, 16)
        self.stage2 = _conv(16, 32) if with_stage2 else None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {"stage1": self.stage1(self.stem(x))}
        if self.stage2 is not None:
            out["stage2"] = self.stage2(out["stage1"])
        return out


class TinyBackbone(BackboneDefinition):
    def spec(self) -> BackboneSpec:
        return BackboneSpec(
            name="tiny",
            family="test",
            layers=("stage1", "stage2"),
            default_layers=("stage1", "stage2"),
            channels={"stage1": 16, "stage2": 32},
            strides={"stage1": 4, "stage2": 8},
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )

    def build(self, layers: tuple[str, ...], *, pretrained: bool) -> nn.Module:
        if pretrained:
            raise BackboneError(
                "backbone 'tiny' is for tests and has no ImageNet weights; pass --weights random"
            )
        return TinyBody(with_stage2="stage2" in layers)


@register_backbone("tiny")
def tiny() -> BackboneDefinition:
    """Random weights only; two layers at strides 4 and 8."""
    return TinyBackbone()
