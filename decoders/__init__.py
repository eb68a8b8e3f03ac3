"""Segmentation heads and their training from device-resident features."""

from decoders._registry import create_decoder, get_decoder_class, list_decoders, register_decoder
from decoders.device_data import DeviceFeatures
from decoders.heads import DEFAULT_DECODER, ConvHead, Decoder, FPNHead, LinearHead, TemporalFPNHead
from decoders.training import (
    HeadConfig,
    TrainedHead,
    best_head,
    evaluate,
    holdout_split,
    predict,
    segmentation_loss,
    train_heads,
)

__all__ = [
    "DEFAULT_DECODER",
    "ConvHead",
    "Decoder",
    "DeviceFeatures",
    "FPNHead",
    "HeadConfig",
    "LinearHead",
    "TemporalFPNHead",
    "TrainedHead",
    "best_head",
    "create_decoder",
    "evaluate",
    "get_decoder_class",
    "holdout_split",
    "list_decoders",
    "predict",
    "register_decoder",
    "segmentation_loss",
    "train_heads",
]
