"""FrameStream: both decode paths give PIL's RGB pixels, in dataset order, for every colour model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featstore.datasets import FrameRecord
from featstore.errors import DatasetError
from featstore.frame_stream import FrameStream

SIZE = (48, 64)  # (H, W)


def _frames(folder: Path) -> list[FrameRecord]:
    """One frame per colour model a dataset may hold, all of one size so they share a batch."""
    rng = np.random.default_rng(0)
    rgb = (rng.random((*SIZE, 3)) * 255).astype(np.uint8)
    images = {
        "00000.jpg": Image.fromarray(rgb),
        "00001.jpg": Image.fromarray(rgb[..., 0]),  # greyscale JPEG
        "00002.jpg": Image.fromarray(rgb).convert("CMYK"),
        "00003.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),  # RGBA
        "00004.png": Image.fromarray(rgb).quantize(16),  # palette
        "00005.png": Image.fromarray(rgb[..., 1]).convert("LA"),
        "00006.jpg": Image.fromarray(rgb[::-1].copy()),
    }
    folder.mkdir(parents=True)
    records = []
    for row, (name, image) in enumerate(images.items()):
        image.save(folder / name)
        records.append(FrameRecord(row=row, clip="colours", frame=row, raw=folder / name, annotation=None))
    return records


def _pixels(stream: FrameStream) -> torch.Tensor:
    return torch.cat([batch.pixels for batch in stream])


@pytest.mark.parametrize("batch_size", [3, 7])
def test_decoding_on_the_device_gives_the_pixels_pil_gives(tmp_path: Path, batch_size: int) -> None:
    records = _frames(tmp_path / "colours")
    cpu = torch.device("cpu")
    expected = _pixels(FrameStream(records, batch_size, cpu, with_masks=False))
    got = _pixels(FrameStream(records, batch_size, cpu, with_masks=False, decode_on_device=True))
    assert expected.shape == got.shape == (len(records), 3, *SIZE)
    assert expected.dtype == got.dtype == torch.uint8
    for row, record in enumerate(records):
        want = torch.from_numpy(np.array(Image.open(record.raw).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(expected[row], want), record.raw.name
        assert torch.equal(got[row], want), record.raw.name


def test_pil_batches_are_channels_last(tmp_path: Path) -> None:
    records = _frames(tmp_path / "colours")
    batch = next(iter(FrameStream(records, 4, torch.device("cpu"), with_masks=False)))
    assert batch.pixels.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("decode_on_device", [False, True])
def test_a_broken_jpeg_is_named(tmp_path: Path, decode_on_device: bool) -> None:
    records = _frames(tmp_path / "colours")
    broken = records[4 if decode_on_device else 0].raw.with_suffix(".jpg")
    data = (tmp_path / "colours" / "00000.jpg").read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # a valid header, half the scan
    records[4] = FrameRecord(row=4, clip="colours", frame=4, raw=broken, annotation=None)
    stream = FrameStream(records, 7, torch.device("cpu"), with_masks=False, decode_on_device=decode_on_device)
    with pytest.raises(DatasetError, match=str(broken)):
        _pixels(stream)


@pytest.mark.gpu
def test_nvjpeg_output_is_not_overwritten_by_work_queued_before_it(tmp_path: Path) -> None:
    """Decoded frames keep their pixels while kernels queued earlier still write memory freed after them."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # nvJPEG takes RGB and greyscale JPEGs; a CMYK one would send the batch to PIL and test nothing here.
    records = [r for r in _frames(tmp_path / "colours") if r.raw.suffix == ".jpg" and r.raw.name != "00002.jpg"]
    cuda = torch.device("cuda")
    stream = FrameStream(records, len(records), cuda, with_masks=False)
    expected = _pixels(stream).cpu()  # decoded with the GPU idle
    torch.cuda.synchronize()
    assert stream.fallbacks == [], "every frame was decoded by nvJPEG"
    for _ in range(20):
        # Blocks the size of a decoded frame, written by slow queued kernels, then freed at once: memory
        # the caching allocator would hand to the next allocation on this stream.
        busy = [torch.zeros(3, *SIZE, dtype=torch.uint8, device=cuda) for _ in records]
        slow = torch.randn(2048, 2048, device=cuda)
        for block in busy:
            for _ in range(4):
                slow = slow @ slow / slow.norm()
            block.add_((slow[0, 0] > 0).to(torch.uint8) + 1)
        del busy
        got = _pixels(stream).cpu()
        assert torch.equal(got, expected)


def test_a_jpeg_cut_short_or_padded_goes_to_pil(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Device decoding takes only files that end in the end-of-image marker; PIL decodes the rest, said once."""
    records = [r for r in _frames(tmp_path / "colours") if r.raw.suffix == ".jpg"]
    padded = records[0].raw
    padded.write_bytes(padded.read_bytes() + b"trailing bytes after the image")
    stream = FrameStream(records, len(records), torch.device("cpu"), with_masks=False, decode_on_device=True)
    got = _pixels(stream)
    assert [path for path, _ in stream.fallbacks] == [str(padded)]
    assert "end-of-image marker" in stream.fallbacks[0][1]
    want = torch.from_numpy(np.array(Image.open(padded).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(got[0], want)
    assert capsys.readouterr().err.count("warning: decoding") == 1


@pytest.mark.gpu
def test_a_broken_jpeg_is_named_when_the_gpu_decodes(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    records = [r for r in _frames(tmp_path / "colours") if r.raw.suffix == ".jpg"]
    data = records[1].raw.read_bytes()
    records[1].raw.write_bytes(data[: len(data) // 2])
    stream = FrameStream(records, len(records), torch.device("cuda"), with_masks=False)
    with pytest.raises(DatasetError, match=str(records[1].raw)):
        _pixels(stream)
