"""Contest metric rules: binarization, per-frame IoU, the both-empty rule, pooled mean and per-clip J."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featstore.metrics import (
    ContestScore,
    binarize,
    binarize_probability,
    frame_iou,
    frame_terms,
    iou_terms,
    mean_iou_from_terms,
    probability_to_u8,
)
from featstore.results import read_result_folder, write_result_folder


def grey(*values: int) -> np.ndarray:
    """A 1-row greyscale prediction."""
    return np.array([values], dtype=np.uint8)


def mask(*values: int) -> np.ndarray:
    """A 1-row binary annotation, as read_mask returns it."""
    return np.array([values], dtype=np.uint8)


def test_binarize_rounds_value_over_255() -> None:
    values = np.array([0, 1, 126, 127, 128, 129, 254, 255], dtype=np.uint8)
    assert binarize(values).tolist() == [False, False, False, False, True, True, True, True]


def test_binarize_agrees_with_python_round_for_every_8bit_value() -> None:
    values = np.arange(256, dtype=np.uint8)
    expected = [round(int(v) / 255) == 1 for v in values]
    assert binarize(values).tolist() == expected
    assert binarize(values.astype(np.int32)).tolist() == expected
    assert binarize(values.astype(np.float32)).tolist() == expected


def test_binarize_float_values_round_half_to_even_like_python() -> None:
    values = np.array([127.4, 127.5, 127.6])
    assert binarize(values).tolist() == [round(v / 255) == 1 for v in values.tolist()] == [False, False, True]


def test_binarize_passes_booleans_through() -> None:
    values = np.array([[True, False]])
    assert binarize(values).tolist() == [[True, False]]


def test_frame_iou_counts_intersection_over_union() -> None:
    # prediction foreground at columns 0-1, annotation at columns 1-3: 1 shared of 4 in the union
    assert frame_terms(grey(255, 200, 0, 0), mask(0, 1, 1, 1)) == (1, 4)
    assert frame_iou(grey(255, 200, 0, 0), mask(0, 1, 1, 1)) == pytest.approx(0.25)


def test_empty_prediction_against_non_empty_mask_scores_zero() -> None:
    assert frame_iou(grey(0, 0, 0), mask(0, 1, 1)) == 0.0


def test_both_empty_frame_is_left_out() -> None:
    assert frame_iou(grey(0, 127, 3), mask(0, 0, 0)) is None


def test_values_127_and_128_fall_either_side_of_the_threshold() -> None:
    target = mask(1, 1)
    assert frame_iou(grey(127, 127), target) == 0.0
    assert frame_iou(grey(128, 128), target) == 1.0
    assert frame_iou(grey(128, 127), target) == 0.5


def test_frame_terms_refuses_raw_0_255_annotation() -> None:
    with pytest.raises(ValueError, match="read_mask"):
        frame_terms(grey(255, 0), np.array([[255, 0]], dtype=np.uint8))


def test_frame_terms_refuses_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        frame_terms(grey(255, 0), mask(1, 0, 0))


def test_contest_score_counts_empty_predictions_and_skips_both_empty() -> None:
    score = ContestScore()
    assert score.add("a", grey(255, 255), mask(1, 1)) == 1.0
    assert score.add("a", grey(0, 0), mask(1, 1)) == 0.0
    assert score.add("a", grey(0, 0), mask(0, 0)) is None
    result = score.result()
    assert result.mean_iou == pytest.approx(0.5)
    assert result.frames_scored == 2
    assert result.frames_both_empty == 1


def test_pooled_mean_and_per_clip_j_differ_on_unbalanced_clips() -> None:
    score = ContestScore()
    for _ in range(3):  # clip "long": three perfect frames
        score.add("long", grey(255, 255, 0, 0), mask(1, 1, 0, 0))
    score.add("short", grey(255, 0, 0, 0), mask(1, 1, 1, 1))  # clip "short": one frame, IoU 1/4
    result = score.result()
    # pooled over frames: (1 + 1 + 1 + 0.25) / 4; per clip: (mean(1, 1, 1) + 0.25) / 2
    assert result.mean_iou == pytest.approx(0.8125)
    assert result.j_mean == pytest.approx(0.625)
    assert result.per_clip == pytest.approx({"long": 1.0, "short": 0.25})
    assert list(result.per_clip) == ["long", "short"]


def test_every_frame_both_empty_scores_one_as_in_davis() -> None:
    score = ContestScore()
    score.add("a", grey(0, 0), mask(0, 0))
    score.add("b", grey(127, 0), mask(0, 0))
    result = score.result()
    assert result.mean_iou == 1.0
    assert result.j_mean == 1.0
    assert result.per_clip == {"a": 1.0, "b": 1.0}
    assert (result.frames_scored, result.frames_both_empty) == (0, 2)


def test_clip_with_only_both_empty_frames_scores_one_in_j_but_not_in_pooled_mean() -> None:
    score = ContestScore()
    score.add("object", grey(255, 0), mask(1, 1))  # IoU 0.5
    score.add("nothing", grey(0, 0), mask(0, 0))
    result = score.result()
    assert result.mean_iou == pytest.approx(0.5)
    assert result.per_clip == pytest.approx({"nothing": 1.0, "object": 0.5})
    assert result.j_mean == pytest.approx(0.75)


def test_contest_score_without_frames_refuses() -> None:
    with pytest.raises(ValueError, match="no frames"):
        ContestScore().result()


def test_add_terms_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="intersection"):
        ContestScore().add_terms("a", 5, 3)


def test_scores_to_dict_is_json() -> None:
    score = ContestScore()
    score.add("a", grey(255, 0), mask(1, 0))
    payload = json.loads(json.dumps(score.result().to_dict()))
    assert payload == {
        "mean_iou": 1.0,
        "j_mean": 1.0,
        "per_clip": {"a": 1.0},
        "frames_scored": 1,
        "frames_both_empty": 0,
    }


def test_probability_to_u8_rounds_and_clips() -> None:
    p = torch.tensor([0.0, 1.0, 0.5, 0.25, -0.3, 1.7, float("nan")])
    # 255 * 0.5 = 127.5 rounds half to even -> 128; 255 * 0.25 = 63.75 -> 64
    assert probability_to_u8(p).tolist() == [0, 255, 128, 64, 0, 255, 0]
    assert probability_to_u8(p).dtype == torch.uint8


def test_probability_to_u8_is_round_255p_exactly_at_every_half_step() -> None:
    halves = torch.tensor([(k + 0.5) / 255 for k in range(255)], dtype=torch.float64).to(torch.float32)
    below, above = torch.nextafter(halves, torch.zeros(())), torch.nextafter(halves, torch.ones(()))
    for p in (halves, below, above):
        expected = [round(255 * value) for value in p.tolist()]  # Python's exact round, half to even
        assert probability_to_u8(p).tolist() == expected
        assert probability_to_u8(p.to(torch.float16)).tolist() == [
            round(255 * value) for value in p.to(torch.float16).tolist()
        ]


_SAME_WIDTH_INT = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def _probabilities_near_half(dtype: torch.dtype) -> torch.Tensor:
    """0.5 and its 64 nearest representable neighbours either side, every 8-bit rounding boundary, and more."""
    int_dtype = _SAME_WIDTH_INT[dtype]
    # positive floats are ordered like their bit patterns, so stepping the bits walks the neighbours
    neighbours = (torch.tensor([0.5], dtype=dtype).view(int_dtype) + torch.arange(-64, 65, dtype=int_dtype)).view(dtype)
    boundaries = ((torch.arange(256, dtype=torch.float64) + 0.5) / 255).to(dtype)
    dense = torch.linspace(0.49, 0.51, 4001, dtype=torch.float64).to(dtype)
    uniform = torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    return torch.cat([neighbours, boundaries, dense, uniform])


def _devices() -> list[object]:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("device", _devices())
def test_torch_binarization_matches_png_round_trip_bit_for_bit(
    tmp_path: Path, dtype: torch.dtype, device: str
) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    p = _probabilities_near_half(dtype)
    width = 64
    p = torch.cat([p, torch.zeros((-len(p)) % width, dtype=dtype)]).reshape(-1, width)
    frames = p.reshape(1, *p.shape).to(device)

    # the PNG path: probability -> 8-bit value -> PNG on disk -> read back -> binarize(round(v / 255))
    written = write_result_folder(tmp_path / "result", [(0, probability_to_u8(p).numpy())], {})
    with Image.open(read_result_folder(written).outputs[0]) as image:
        png_values = np.asarray(image)
    png_foreground = binarize(png_values)

    assert np.array_equal(binarize_probability(frames)[0].cpu().numpy(), png_foreground)
    target = torch.from_numpy(
        np.random.default_rng(1).integers(0, 2, size=png_values.shape, dtype=np.uint8)
    )
    intersection, union = iou_terms(frames, target.reshape(1, *target.shape).to(device))
    assert (int(intersection[0]), int(union[0])) == frame_terms(png_values, target.numpy())


def test_binarize_probability_follows_the_double_rounding_rule() -> None:
    p = torch.tensor([0.5, 0.4999999999999999, 127.4 / 255, 128.6 / 255, 0.0, 1.0], dtype=torch.float64)
    expected = [round(round(255 * v) / 255) == 1 for v in p.tolist()]
    assert binarize_probability(p).tolist() == expected == [True, False, False, True, False, True]


def test_iou_terms_per_frame_and_pooled_mean() -> None:
    pred = torch.tensor(
        [
            [[0.9, 0.9], [0.1, 0.1]],  # IoU 1 against the top row
            [[0.1, 0.1], [0.1, 0.1]],  # empty against non-empty: 0
            [[0.2, 0.3], [0.4, 0.49]],  # both empty: left out
        ]
    )
    target = torch.tensor([[[1, 1], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.uint8)
    intersection, union = iou_terms(pred, target)
    assert intersection.tolist() == [2, 0, 0]
    assert union.tolist() == [2, 1, 0]
    assert mean_iou_from_terms(intersection, union) == pytest.approx(0.5)
    assert mean_iou_from_terms(intersection[2:], union[2:]) == 1.0


def test_iou_terms_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same"):
        iou_terms(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3, dtype=torch.uint8))
