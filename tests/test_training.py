"""Device-resident features, training many heads in one pass, contest-rule validation, clip splits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from synthetic_features import synthetic_features

from decoders import (
    DEFAULT_DECODER,
    DeviceFeatures,
    HeadConfig,
    best_head,
    create_decoder,
    evaluate,
    holdout_split,
    predict,
    segmentation_loss,
    train_heads,
)
from decoders.training import build_head, recalibrate_batchnorm
from featstore.errors import FeatstoreError
from featstore.metrics import ContestScore, Scores


def indexed_features(lengths: dict[str, int]) -> DeviceFeatures:
    """Features whose every value is the frame's global index, so gathers can be read back."""
    features, masks, start = [], [], 0
    for n in lengths.values():
        features.append(
            torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, 3, 4)
        )
        masks.append(torch.zeros(n, 12, 16, dtype=torch.uint8))
        start += n
    return DeviceFeatures.from_tensors({"x": features}, masks, list(lengths), "cpu")


def test_neighbours_clamp_within_clips_and_never_cross() -> None:
    data = indexed_features({"a": 3, "b": 4})
    table = data.neighbours(2).tolist()
    assert table == [
        [0, 0, 0, 1, 2],
        [0, 0, 1, 2, 2],
        [0, 1, 2, 2, 2],
        [3, 3, 3, 4, 5],
        [3, 3, 4, 5, 6],
        [3, 4, 5, 6, 6],
        [4, 5, 6, 6, 6],
    ]
    clip_of = data.clip_ids
    assert torch.equal(clip_of[data.neighbours(5)], clip_of[:, None].expand(-1, 11))
    assert data.positions.tolist() == [0, 1, 2, 0, 1, 2, 3]


def test_gather_selects_frames_and_neighbours_on_the_device() -> None:
    data = indexed_features({"a": 3, "b": 4})
    index = torch.tensor([2, 3])
    assert data.gather(index)["x"][:, 0, 0, 0].tolist() == [2.0, 3.0]
    window = data.gather(index, window=1)["x"]
    assert window.shape == (2, 3, 2, 3, 4)
    assert window[:, :, 0, 0, 0].tolist() == [[1.0, 2.0, 2.0], [3.0, 3.0, 4.0]]


def test_features_are_held_and_gathered_channels_last() -> None:
    data = synthetic_features({"a": 4, "b": 3})
    channels_last = torch.channels_last
    assert all(v.is_contiguous(memory_format=channels_last) for v in data.features.values())
    batch = data.gather(torch.tensor([5, 0, 2]))
    assert all(v.is_contiguous(memory_format=channels_last) for v in batch.values())
    part = data.subset(["b"])
    assert all(v.is_contiguous(memory_format=channels_last) for v in part.features.values())
    torch.testing.assert_close(part.features["fine"], data.features["fine"][4:])


def test_features_keep_their_stored_dtype() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        data = synthetic_features({"a": 2, "b": 3}, dtype=dtype)
        assert all(v.dtype == dtype for v in data.features.values())
        assert data.masks is not None and data.masks.dtype == torch.uint8
        assert data.frame_size == (64, 96)
        assert data.strides == {"fine": 4, "coarse": 16}
        assert len(data) == 5


def test_batches_cover_every_frame_once_and_repeat_with_the_seed() -> None:
    data = synthetic_features({"a": 5, "b": 6})

    def epoch(seed: int) -> list[list[int]]:
        return [b.tolist() for b in data.batches(4, torch.Generator().manual_seed(seed))]

    first = epoch(0)
    assert sorted(i for b in first for i in b) == list(range(11))
    assert [len(b) for b in first] == [4, 4, 3]
    assert first == epoch(0)
    assert first != epoch(1)
    assert [b.tolist() for b in data.batches(6, shuffle=False)] == [list(range(6)), list(range(6, 11))]


def test_differing_frame_sizes_and_missing_masks_are_clear_errors() -> None:
    small = [torch.zeros(2, 3, 4, 6), torch.zeros(2, 3, 5, 6)]
    masks = [torch.zeros(2, 16, 24, dtype=torch.uint8)] * 2
    with pytest.raises(FeatstoreError, match="must share one size"):
        DeviceFeatures.from_tensors({"x": small}, masks, ["a", "b"], "cpu")
    same = [torch.zeros(2, 3, 4, 6)] * 2
    with pytest.raises(FeatstoreError, match="must share one size"):
        DeviceFeatures.from_tensors(
            {"x": same}, [masks[0], torch.zeros(2, 17, 24, dtype=torch.uint8)], ["a", "b"], "cpu"
        )
    with pytest.raises(FeatstoreError, match="masks are missing"):
        DeviceFeatures.from_tensors({"x": same}, masks[:1], ["a", "b"], "cpu")
    with pytest.raises(FeatstoreError, match="frame counts"):
        DeviceFeatures.from_tensors(
            {"x": same}, [masks[0], torch.zeros(3, 16, 24, dtype=torch.uint8)], ["a", "b"], "cpu"
        )
    with pytest.raises(FeatstoreError, match="values above 1"):
        DeviceFeatures.from_tensors({"x": same}, [masks[0], masks[1] + 255], ["a", "b"], "cpu")
    unlabelled = DeviceFeatures.from_tensors({"x": same}, None, ["a", "b"], "cpu", frame_size=(16, 24))
    with pytest.raises(FeatstoreError, match="no masks"):
        train_heads(unlabelled, None, [HeadConfig("linear")], epochs=1, progress=False)


def test_subset_keeps_clip_structure() -> None:
    data = indexed_features({"a": 3, "b": 4, "c": 2})
    part = data.subset(["c", "a"])
    assert part.clips == ("c", "a")
    assert part.features["x"][:, 0, 0, 0].tolist() == [7.0, 8.0, 0.0, 1.0, 2.0]
    assert part.neighbours(1).tolist()[:2] == [[0, 0, 1], [0, 1, 1]]
    assert part.rows == [7, 8, 0, 1, 2]


def test_stacked_heads_train_like_heads_stepped_one_by_one() -> None:
    train = synthetic_features({"a": 6, "b": 5, "c": 4}, seed=1)
    val = synthetic_features({"v": 5}, seed=2)
    configs = [
        HeadConfig("fpn", lr=1e-3, options={"width": 16}),
        HeadConfig("linear", lr=1e-2, schedule="constant"),
        HeadConfig("fpn", lr=3e-3, weight_decay=1e-2, options={"width": 16}),
        HeadConfig("fpn", lr=2e-3, schedule="constant", options={"width": 16}),
    ]
    stacked = train_heads(train, val, configs, epochs=2, batch_size=4, seed=7, progress=False, stack=True)
    one_by_one = train_heads(train, val, configs, epochs=2, batch_size=4, seed=7, progress=False, stack=False)
    for a, b in zip(stacked, one_by_one, strict=True):
        assert a.config == b.config
        state_a, state_b = a.decoder.state_dict(), b.decoder.state_dict()
        for key in state_a:
            torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-4, atol=1e-5)
        assert a.final_loss == pytest.approx(b.final_loss, rel=1e-4)
        assert len(a.epoch_losses) == 2 and a.epoch_losses == pytest.approx(b.epoch_losses, rel=1e-4)
        assert a.val is not None and b.val is not None
        assert a.val.mean_iou == pytest.approx(b.val.mean_iou, abs=1e-3)
        assert a.train_seconds > 0
    first = dict(one_by_one[0].decoder.named_parameters())
    moved = any(not torch.equal(p, first[k]) for k, p in one_by_one[2].decoder.named_parameters())
    assert moved, "heads of one group keep their own weights"


def test_epoch_losses_are_the_mean_loss_over_each_epochs_frames() -> None:
    train = synthetic_features({"a": 6, "b": 5}, seed=3)  # 11 frames: batches of 4, 4 and 3 an epoch
    config = HeadConfig("linear", lr=1e-12, weight_decay=0.0, schedule="constant")  # weights stay put
    (trained,) = train_heads(train, None, [config], epochs=3, batch_size=4, seed=0, progress=False)
    head = trained.decoder
    per_frame = []
    with torch.no_grad():
        for row in range(len(train)):
            index = torch.tensor([row])
            per_frame.append(float(segmentation_loss(head(train.gather(index)), train.mask(index))))
    expected = sum(per_frame) / len(per_frame)
    assert trained.epoch_losses == pytest.approx([expected] * 3, rel=1e-5)
    assert trained.metrics()["epoch_losses"] == list(trained.epoch_losses)


def test_heads_trained_together_match_heads_trained_alone() -> None:
    train = synthetic_features({"a": 6, "b": 5, "c": 4}, seed=1)
    val = synthetic_features({"v": 5}, seed=2)
    configs = [
        HeadConfig("linear", lr=1e-2, schedule="constant"),
        HeadConfig("fpn", lr=1e-3, options={"width": 16}),
        HeadConfig("temporal", lr=2e-3, options={"width": 8}),
    ]
    together = train_heads(train, val, configs, epochs=2, batch_size=4, seed=7, progress=False)
    (alone,) = train_heads(train, val, [configs[1]], epochs=2, batch_size=4, seed=7, progress=False)
    grid_state, alone_state = together[1].decoder.state_dict(), alone.decoder.state_dict()
    assert grid_state.keys() == alone_state.keys()
    for key in grid_state:
        torch.testing.assert_close(grid_state[key], alone_state[key], rtol=1e-5, atol=1e-6)
    assert together[1].val is not None and alone.val is not None
    assert together[1].val.mean_iou == pytest.approx(alone.val.mean_iou, abs=1e-6)
    # Another seed draws another initialisation and other batches, so the same head ends elsewhere.
    (first,) = train_heads(train, None, [configs[0]], epochs=2, batch_size=4, seed=7, progress=False)
    (other,) = train_heads(train, None, [configs[0]], epochs=2, batch_size=4, seed=8, progress=False)
    weights = [head.decoder.state_dict()["classifier.weight"] for head in (first, together[0], other)]
    torch.testing.assert_close(weights[0], weights[1])
    assert not torch.allclose(weights[2], weights[0])


def test_default_head_learns_a_learnable_task_on_unseen_clips() -> None:
    train = synthetic_features({f"train{i}": 10 for i in range(6)}, seed=3)
    val = synthetic_features({"val0": 10, "val1": 10}, seed=4)
    (head,) = train_heads(
        train, val, [HeadConfig(DEFAULT_DECODER, lr=1e-2)], epochs=4, batch_size=4, progress=False
    )
    assert head.val is not None
    assert head.val.mean_iou > 0.8
    assert set(head.val.per_clip) == {"val0", "val1"}
    assert head.train_frames == 4 * 60
    assert head.train_seconds > 0 and head.train_frames_per_s > 0
    assert head.metrics()["val_mean_iou"] == head.val.mean_iou


def test_batchnorm_statistics_are_recomputed_for_the_final_weights() -> None:
    data = synthetic_features({"a": 5, "b": 4})
    head = create_decoder("fpn", data.channels, data.strides, width=8, norm="batch")
    recalibrate_batchnorm(head, data, batch_size=3)
    conv, norm = head.get_submodule("lateral.0.0"), head.get_submodule("lateral.0.1")
    assert isinstance(norm, torch.nn.BatchNorm2d)
    with torch.no_grad():
        out = conv(data.features[head.layers[0]].float())
    torch.testing.assert_close(norm.running_mean, out.mean(dim=(0, 2, 3)))
    assert norm.momentum == 0.1 and head.training


def test_validation_follows_the_contest_rule() -> None:
    train = synthetic_features({"a": 6, "b": 6}, seed=5)
    val = synthetic_features({"v": 4, "w": 3}, seed=6)
    (head,) = train_heads(train, None, [HeadConfig("fpn", options={"width": 16})], epochs=1, progress=False)
    assert head.val is None
    scores = evaluate(head.decoder, val)
    # Recount through the PNG values a result folder would hold, with the numpy scorer.
    reference = ContestScore()
    assert val.masks is not None
    for index, prob in predict(head.decoder, val, batch_size=3):
        png = np.rint(prob.numpy() * 255.0).clip(0, 255).astype(np.uint8)
        for i, frame in enumerate(index.tolist()):
            reference.add(val.clips[int(val.clip_ids[frame])], png[i], val.masks[frame].numpy())
    expected = reference.result()
    assert scores.mean_iou == pytest.approx(expected.mean_iou)
    assert scores.per_clip == pytest.approx(expected.per_clip)
    assert scores.frames_scored + scores.frames_both_empty == 7


def test_best_head_is_the_highest_validation_iou() -> None:
    train = synthetic_features({"a": 8, "b": 8, "c": 8}, seed=8)
    val = synthetic_features({"v": 8}, seed=9)
    heads = train_heads(
        train,
        val,
        [HeadConfig("linear", lr=1e-4), HeadConfig("fpn", lr=3e-3, options={"width": 16})],
        epochs=3,
        progress=False,
    )
    assert best_head(heads) is max(heads, key=lambda h: h.val.mean_iou if h.val else 0.0)
    without_val = train_heads(train, None, [HeadConfig("linear")], epochs=1, progress=False)
    with pytest.raises(FeatstoreError, match="no head has validation scores"):
        best_head(without_val)


def test_heads_tied_on_validation_are_ranked_by_their_training_loss() -> None:
    train = synthetic_features({"a": 8, "b": 8}, seed=8)
    (trained,) = train_heads(train, None, [HeadConfig("linear")], epochs=1, progress=False)
    nothing = Scores(mean_iou=0.0, j_mean=0.0)
    heads = [dataclasses.replace(trained, val=nothing, epoch_losses=(2.0, loss), config=HeadConfig("linear", lr=lr))
             for lr, loss in ((1e-3, 1.39), (3e-3, 1.06), (1e-2, float("nan")))]
    assert best_head(heads).config.lr == 3e-3
    heads.append(dataclasses.replace(heads[0], val=Scores(mean_iou=0.0, j_mean=0.01)))
    assert best_head(heads) is heads[-1], "J breaks a tie in mean IoU first"


def test_progress_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    train = synthetic_features({"a": 4, "b": 4})
    train_heads(train, None, [HeadConfig("linear")], epochs=1, batch_size=4, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "training 1 head(s)" in captured.err


def test_head_config_is_validated_and_round_trips() -> None:
    config = HeadConfig("fpn", lr=2e-3, weight_decay=0.0, options={"width": 32})
    assert HeadConfig.from_dict(config.to_dict()) == config
    assert config.init_seed(0) == HeadConfig.from_dict(config.to_dict()).init_seed(0) != config.init_seed(1)
    with pytest.raises(FeatstoreError, match="unknown"):
        HeadConfig("nope")
    with pytest.raises(FeatstoreError, match="--lr"):
        HeadConfig("fpn", lr=0.0)
    with pytest.raises(FeatstoreError, match="schedule"):
        HeadConfig("fpn", schedule="step")


def test_loss_rewards_correct_logits() -> None:
    masks = torch.zeros(2, 8, 8, dtype=torch.uint8)
    masks[:, 2:6, 2:6] = 1
    right = (masks.float() * 20 - 10)[:, None]
    assert float(segmentation_loss(right, masks)) < 0.01
    assert float(segmentation_loss(-right, masks)) > 1.5


def test_holdout_split_separates_clips_deterministically() -> None:
    clips = [f"clip{i}" for i in range(10)]
    train, val = holdout_split(clips, 0.3, seed=0)
    assert len(val) == 3 and len(train) == 7
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(clips)
    assert holdout_split(list(reversed(clips)), 0.3, seed=0) == (train, val)
    assert any(holdout_split(clips, 0.3, seed=s)[1] != val for s in range(1, 5))
    assert holdout_split(["a", "b"], 0.01, seed=0)[1] != []  # at least one clip validates
    assert holdout_split(list(reversed(clips)), 0.0, seed=3) == (clips, []), "0 trains on every clip"


@pytest.mark.parametrize(
    ("clips", "fraction"), [(["a"], 0.5), (["a", "b"], 0.9), (["a", "b"], -0.1), (["a", "b"], 1.0)]
)
def test_holdout_split_refuses_impossible_fractions(clips: list[str], fraction: float) -> None:
    with pytest.raises(FeatstoreError, match="holdout-fraction"):
        holdout_split(clips, fraction, seed=0)


def test_holdout_split_refuses_duplicate_clips() -> None:
    with pytest.raises(FeatstoreError, match="unique"):
        holdout_split(["a", "a", "b"], 0.5, seed=0)


@pytest.mark.gpu
def test_training_on_cuda_keeps_features_on_the_device() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    train = synthetic_features({f"t{i}": 10 for i in range(6)}, seed=3, device="cuda")
    val = synthetic_features({"v": 10}, seed=4, device="cuda")
    assert all(v.is_cuda for v in train.features.values())
    configs = [HeadConfig(DEFAULT_DECODER, lr=3e-3), HeadConfig("linear", lr=1e-2), HeadConfig(lr=1e-3)]
    head, linear, other = train_heads(train, val, configs, epochs=8, progress=False)  # fpn heads stacked
    assert head.val is not None and head.val.mean_iou > 0.8
    assert other.val is not None and other.val.mean_iou > 0.5
    assert head.train_seconds == other.train_seconds > 0, "a stacked group's time is shared by its heads"
    assert linear.train_seconds > 0, "CUDA events time each stepper's own steps"
    (alone,) = train_heads(train, val, configs[:1], epochs=8, progress=False, stack=False)
    assert alone.val is not None and abs(alone.val.mean_iou - head.val.mean_iou) < 0.05


def test_a_head_is_drawn_from_its_seed_alone() -> None:
    state = torch.get_rng_state()
    first = build_head(HeadConfig("conv"), {"x": 4}, {"x": 8}, seed=123)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)
    again = build_head(HeadConfig("conv"), {"x": 4}, {"x": 8}, seed=123)
    other = build_head(HeadConfig("conv"), {"x": 4}, {"x": 8}, seed=124)
    for name, weight in first.state_dict().items():
        assert torch.equal(weight, again.state_dict()[name]), name
    assert not all(torch.equal(w, other.state_dict()[n]) for n, w in first.state_dict().items())


@pytest.mark.gpu
def test_building_a_head_leaves_the_cuda_random_state_alone() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    build_head(HeadConfig("linear"), {"x": 4}, {"x": 8}, seed=123)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
