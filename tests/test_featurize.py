"""`featstore build`: features land in a committed zarr artifact that matches a direct forward pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import stopped_build

from featstore.backbones import create_backbone
from featstore.cli import main
from featstore.datasets import load_dataset, read_frame
from featstore.errors import DatasetError, FeatstoreError, StoreError
from featstore.features import ClipArrays, open_features, open_group
from featstore.frame_stream import FrameStream, backbone_preprocessing, decodes_on_gpu
from featstore.store import Store
from jobs.featurize import (
    BuildResult,
    build_features,
    featurize_clips,
    finished_clips,
    prepare_build,
    resolve_device,
)


def test_build_writes_features_masks_and_lineage(tmp_path: Path, small_davis: Path) -> None:
    store = Store(tmp_path / "store")
    result = build_features(store, "tiny", small_davis, weights="random", batch_size=4, device="cpu", progress=False)
    assert result.ref == "small-davis.tiny.random:v1"
    assert (result.frames, result.clips, result.cached) == (12, 3, False)
    assert result.bytes > 0 and result.fps > 0
    features = open_features(store, result.ref)
    assert features.clips == ("alpha", "beta", "gamma")
    dataset = load_dataset(small_davis)
    extractor = create_backbone("tiny", weights="random", dtype=torch.float16)
    for clip, records in dataset.clips().items():
        assert features.rows(clip) == [r.row for r in records]
        frames = torch.stack([torch.from_numpy(read_frame(r.raw)).permute(2, 0, 1) for r in records])
        expected = extractor.extract(frames)
        for layer in features.layers:
            stored = features.read(clip, layer)
            assert stored.dtype == torch.float16
            torch.testing.assert_close(stored, expected[layer], rtol=0, atol=0)
        masks = features.read_masks(clip)
        assert masks.shape == (len(records), 64, 96) and set(masks.unique().tolist()) <= {0, 1}
        assert masks.sum() > 0
    record = features.record
    assert record.parents == (store.resolve("small-davis", type="dataset").ref,)
    assert record.metadata["nparams_backbone"] == extractor.nparams
    assert store.verify(record) == []
    again = build_features(store, "tiny", small_davis, weights="random", batch_size=3, device="cpu", progress=False)
    assert again.cached and again.ref == result.ref, "same inputs: same reference, nothing computed"


def test_build_reports_where_its_time_went(tmp_path: Path, small_davis: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    result = build_features(store, "tiny", small_davis, weights="random", batch_size=4, device="cpu", progress=True)
    stages = result.record.metadata["stage_seconds"]
    assert set(stages) == {"frames", "forward", "device", "writers"}
    assert all(seconds >= 0 for seconds in stages.values()) and stages["forward"] > 0
    assert sum(stages.values()) <= result.frames / result.fps * 1.01 + 1e-3, "parts of the loop, not more"
    assert "time spent: frames" in capsys.readouterr().err


def test_chunks_hold_about_a_megabyte_and_are_frame_aligned(tmp_path: Path, small_davis: Path) -> None:
    store = Store(tmp_path / "store")
    result = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    group = zarr.open_group(str(result.path), mode="r")
    for layer in open_features(store, result.ref).layers:
        array = group[f"features/{layer}/alpha"]
        assert array.chunks[1:] == array.shape[1:], "chunked along frames only"
        frame_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
        wanted = -(-(1 << 20) // frame_bytes)  # frames for a megabyte, rounded up to a power of two below
        assert array.chunks[0] == min(array.shape[0], 64, 1 << (wanted - 1).bit_length())


def test_a_clip_is_written_in_spans_of_at_most_64_frames_whatever_its_arrays(tmp_path: Path) -> None:
    """Chunk lengths that share no factor (19 and 37 frames) once made the aligned span 703 frames, and a
    longer clip's whole length: the build buffered entire clips. Powers of two align at the longest chunk."""
    group = open_group(tmp_path / "features.zarr", mode="w")
    arrays = ClipArrays(group, "long", 3000, {"wide": (16, 30, 60), "narrow": (8, 30, 60)}, "float16", (122, 238), {})
    lengths = [array.chunks[0] for array in arrays.features.values()] + [arrays.masks.chunks[0]]
    assert all((n & (n - 1)) == 0 for n in lengths), f"powers of two: {lengths}"
    assert all(n * size >= 1 << 20 or n == 64 for n, size in zip(lengths, (57_600, 28_800, 29_036), strict=True))
    assert arrays.chunk_len() == max(lengths) <= 64


def test_changed_inputs_make_a_new_version(tmp_path: Path, small_davis: Path) -> None:
    store = Store(tmp_path / "store")
    first = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    other_dtype = build_features(store, "tiny", small_davis, weights="random", dtype="float32", device="cpu",
                                 progress=False)
    other_seed = build_features(store, "tiny", small_davis, weights="random", seed=1, device="cpu", progress=False)
    assert [first.ref, other_dtype.ref, other_seed.ref] == [
        "small-davis.tiny.random:v1", "small-davis.tiny.random:v2", "small-davis.tiny.random:v3"]
    assert open_features(store, other_dtype.ref).read("beta", "stage2").dtype == torch.float32


def test_bfloat16_round_trips(tmp_path: Path, small_davis: Path) -> None:
    store = Store(tmp_path / "store")
    result = build_features(store, "tiny", small_davis, weights="random", dtype="bfloat16", device="cpu",
                            progress=False)
    stored = open_features(store, result.ref).read("alpha", "stage2")
    assert stored.dtype == torch.bfloat16 and stored.abs().sum() > 0


def test_bad_dataset_writes_nothing(tmp_path: Path, small_davis: Path) -> None:
    (small_davis / "Annotations" / "480p" / "beta" / "00001.png").write_bytes(b"not a png")
    store = Store(tmp_path / "store")
    with pytest.raises(DatasetError, match=r"00001\.png"):
        build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    assert not (tmp_path / "store").exists()


def test_interrupted_build_resumes_from_finished_clips(tmp_path: Path, small_davis: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    staging = stopped_build(store, small_davis)
    assert finished_clips(staging / "scratch") == {"alpha"}
    assert store.list("features") == [], "an unfinished build is invisible"
    result = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    assert "1 clip(s) already finished" in capsys.readouterr().err
    assert result.frames == 12 and store.verify(result.record) == []


@pytest.mark.parametrize("lost", ["features/stage2/alpha", "masks/alpha"])
def test_a_finished_clip_that_lost_a_chunk_is_computed_again(tmp_path: Path, small_davis: Path, lost: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    staging = stopped_build(store, small_davis, clips=("alpha", "beta"))
    sorted((staging / "data" / "features.zarr" / lost).glob("c.*"))[-1].unlink()
    result = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    err = capsys.readouterr().err
    assert "the staged arrays of clip(s) alpha lost chunk files" in err and "1 clip(s) already finished" in err
    assert store.verify(result.record) == []
    clean = build_features(Store(tmp_path / "clean"), "tiny", small_davis, weights="random", device="cpu",
                           progress=False)
    got, want = open_features(store, result.ref), open_features(Store(tmp_path / "clean"), clean.ref)
    assert torch.equal(got.read("alpha", "stage2"), want.read("alpha", "stage2"))
    assert torch.equal(got.read_masks("alpha"), want.read_masks("alpha"))


def test_a_frame_broken_during_a_build_is_named_below_the_progress_bar(
    tmp_path: Path, small_davis: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan, extractor = prepare_build(Store(tmp_path / "store"), "tiny", small_davis, weights="random")
    broken = small_davis / "JPEGImages" / "480p" / "gamma" / "00003.jpg"
    broken.write_bytes(b"overwritten after the dataset was checked")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(DatasetError, match=str(broken)):
        featurize_clips(extractor, plan.dataset, ["alpha", "beta", "gamma"], tmp_path / "group", scratch, dtype="float16",
                        batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "featurize" in err and err.endswith("\n"), "the bar is closed onto its own line before the error"
    assert finished_clips(scratch) == {"alpha", "beta"}, "the clips before it stay finished for the rerun"


def build_with_a_lost_chunk(store: Store, data: Path) -> BuildResult:
    """A committed build of ``data`` whose first chunk of clip gamma's stage2 array was then deleted."""
    result = build_features(store, "tiny", data, weights="random", device="cpu", progress=False)
    sorted((result.path / "features" / "stage2" / "gamma").glob("c.*"))[0].unlink()
    return result


def test_damaged_chunk_is_caught_by_readers_and_verify(tmp_path: Path, small_davis: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    result = build_with_a_lost_chunk(store, small_davis)
    with pytest.raises(StoreError, match="missing file"):
        open_features(store, result.ref).read("gamma", "stage2")
    capsys.readouterr()
    assert main(["verify", result.ref, "--store", str(store.root)]) == 1
    assert "fix: Recompute it: run the `featstore build` (or `featstore compare`) command that made it again with --force" in capsys.readouterr().out
    assert main(["verify", result.ref, "--store", str(store.root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not report["ok"] and "--force" in report["fix"]
    assert open_features(store, result.ref).read("alpha", "stage2").shape[0] == 5, "intact clips stay readable"


def test_force_replaces_a_damaged_artifact_with_a_new_version(tmp_path: Path, small_davis: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    first = build_with_a_lost_chunk(store, small_davis)
    with pytest.raises(StoreError, match="again with --force"):
        open_features(store, first.ref).read("gamma", "stage2")
    again = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    assert again.cached and again.ref == first.ref, "without --force the same inputs are a cache hit"

    args = ["build", "--backbone", "tiny", "--weights", "random", "--data", str(small_davis), "--device", "cpu",
            "--store", str(store.root), "--quiet", "--json"]
    capsys.readouterr()
    assert main([*args, "--force"]) == 0
    forced = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not forced["cached"] and forced["ref"] != first.ref and forced["ref"].endswith(":v2")
    record = store.resolve(forced["ref"])
    assert record.key == first.record.key and store.verify(record) == []
    assert store.resolve(first.record.name).ref == forced["ref"], "the new version is latest"
    fresh = open_features(store, forced["ref"])
    intact = open_features(store, first.ref)
    assert torch.equal(fresh.read("alpha", "stage2"), intact.read("alpha", "stage2")), "same inputs, same features"
    assert fresh.read("gamma", "stage2").shape[0] == 4

    assert main(args) == 0
    cached = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cached["cached"] and cached["ref"] == forced["ref"], "the cache now answers with the new version"


def test_a_damaged_dataset_record_is_recorded_again_by_the_next_build(
    tmp_path: Path, small_davis: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(tmp_path / "store")
    first = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    (dataset_ref,) = first.record.parents
    (store.path(store.resolve(dataset_ref)) / "frames.json").unlink()
    problems = store.verify(store.resolve(dataset_ref))
    assert problems == ["missing file frames.json"]
    cached = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    assert cached.cached and f"the dataset record {dataset_ref} is damaged" in capsys.readouterr().err
    (dataset,) = [r for r in store.list("dataset") if r.ref != dataset_ref]
    assert store.verify(dataset) == [] and dataset.key == store.resolve(dataset_ref).key
    forced = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False, force=True)
    assert forced.record.parents == (dataset.ref,), "the intact record is reused, not recorded a third time"


def test_force_does_not_resume_an_interrupted_build(tmp_path: Path, small_davis: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    stopped_build(store, small_davis)
    result = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False, force=True)
    assert "already finished" not in capsys.readouterr().err
    assert result.frames == 12 and store.verify(result.record) == []
    assert not list((store.root / "staging").glob("features-*/"))


def test_cli_build_ls_show_verify_json(tmp_path: Path, small_davis: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    args = ["build", "--backbone", "tiny", "--weights", "random", "--data", str(small_davis), "--store", store,
            "--device", "cpu", "--json", "--quiet"]
    assert main(args) == 0
    built = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ref", "path", "cached", "frames", "clips", "bytes", "fps", "nparams_backbone"} <= set(built)
    assert built["cached"] is False and built["frames"] == 12 and Path(built["path"]).is_dir() and built["fps"] > 0
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["cached"] is True and again["fps"] is None
    assert main(["ls", "--store", store, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["artifacts"]
    assert {(a["type"], a["name"], a["version"]) for a in listed} == {
        ("dataset", "small-davis", 1), ("features", "small-davis.tiny.random", 1)}
    for entry in listed:
        folder = Path(store) / "artifacts" / entry["type"] / entry["name"] / f"v{entry['version']}"
        assert entry["bytes"] == sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert main(["show", built["ref"], "--store", store, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["lineage"] == ["small-davis:v1"] and shown["metadata"]["nparams_backbone"] == built["nparams_backbone"]
    assert main(["verify", built["ref"], "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"] is True


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--backbone", "tiny", "--weights", "random", "--data", str(tmp_path / "nope"),
                 "--store", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "nope") in err
    assert main(["show", "missing:v1", "--store", str(tmp_path / "s")]) == 1
    assert "featstore ls" in capsys.readouterr().err
    assert main(["build", "--backbone", "tiny", "--weights", "random", "--store", str(tmp_path / "s"),
                 "--batch-size", "0"]) == 1
    assert "--batch-size" in capsys.readouterr().err


def test_demo_dataset_is_the_default(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    result = build_features(store, "tiny", None, weights="random", device="cpu", progress=False)
    assert result.ref.startswith("demo.tiny.random:v1") and result.frames > 0
    assert (store.root / "demo").is_dir()


@pytest.mark.realdata
def test_real_clips_with_offline_lite0(tmp_path: Path, davis_dev: Path) -> None:
    subset = tmp_path / "two-clips"
    for kind, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
        for clip in ("car-shadow", "motocross-jump"):
            (subset / kind / "480p" / clip).mkdir(parents=True)
            for i in range(5):
                name = f"{i:05d}.{ext}"
                (subset / kind / "480p" / clip / name).symlink_to(davis_dev / kind / "480p" / clip / name)
    store = Store(tmp_path / "store")
    result = build_features(store, "efficientnet_lite0", subset, batch_size=5, device="cpu", progress=False)
    features = open_features(store, result.ref)
    assert result.frames == 10 and features.backbone["pretrained"] is True
    assert features.frame_size == (480, 854)
    deepest = features.layers[-1]
    values = features.read("car-shadow", deepest)
    assert values.shape[0] == 5 and values.shape[2:] == (15, 27)
    assert torch.isfinite(values.float()).all() and values.float().std() > 0
    assert features.read_masks("motocross-jump").float().mean() > 0.01


def test_a_copy_of_a_dataset_under_another_name_reuses_its_features(
    tmp_path: Path, small_davis: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(tmp_path / "store")
    first = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    copy = shutil.copytree(small_davis, tmp_path / "davis-copy")
    again = build_features(store, "tiny", copy, weights="random", device="cpu", progress=False)
    assert again.cached and again.ref == first.ref
    assert f"dataset 'davis-copy' holds the frames of 'small-davis', whose features {first.ref}" in capsys.readouterr().err
    (copy / "Annotations" / "480p" / "beta" / "00001.png").write_bytes(
        (small_davis / "Annotations" / "480p" / "beta" / "00000.png").read_bytes())
    changed = build_features(store, "tiny", copy, weights="random", device="cpu", progress=False)
    assert not changed.cached and changed.ref == "davis-copy.tiny.random:v1"


def test_a_new_extraction_version_rebuilds(tmp_path: Path, small_davis: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    first = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    monkeypatch.setattr("jobs.featurize.EXTRACTION_VERSION", first.record.metadata["extraction"] + 1)
    second = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    assert not second.cached and second.record.key != first.record.key


def test_jpeg_decoding_on_the_gpu_is_part_of_the_key(tmp_path: Path, small_davis: Path) -> None:
    """nvJPEG's pixels differ from PIL's, so features it decoded are another artifact, recorded as such."""
    store = Store(tmp_path / "store")
    on_cpu, _ = prepare_build(store, "tiny", small_davis, weights="random")
    on_gpu, extractor = prepare_build(store, "tiny", small_davis, weights="random", gpu_decode=True)
    assert on_cpu.key != on_gpu.key and on_cpu.name == on_gpu.name
    assert not decodes_on_gpu(on_cpu.preprocessing) and decodes_on_gpu(on_gpu.preprocessing)
    assert on_cpu.preprocessing == extractor.preprocessing()  # PIL-decoded builds keep their keys
    assert backbone_preprocessing(on_gpu.preprocessing) == extractor.preprocessing()
    group, scratch = tmp_path / "group", tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(FeatstoreError, match="nvJPEG, which needs a GPU"):
        featurize_clips(extractor, on_gpu.dataset, ["alpha"], group, scratch, dtype="float16", batch_size=4,
                        progress=False, gpu_decode=True)
    assert not group.exists()


@pytest.mark.gpu
def test_cuda_build_stores_the_features_of_its_decoded_frames(tmp_path: Path, small_davis: Path) -> None:
    """nvJPEG decoding, half-precision autocast and the asynchronous copy to the host give the features that
    the CPU computes from the same decoded pixels; the artifact says nvJPEG decoded them."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu_store, gpu_store = Store(tmp_path / "cpu"), Store(tmp_path / "gpu")
    on_cpu = build_features(cpu_store, "tiny", small_davis, weights="random", batch_size=4, device="cpu",
                            progress=False)
    on_gpu = build_features(gpu_store, "tiny", small_davis, weights="random", batch_size=4, device="cuda",
                            progress=False)
    assert on_gpu.frames == on_cpu.frames == 12 and on_gpu.record.key != on_cpu.record.key
    assert decodes_on_gpu(on_gpu.record.metadata["preprocessing"])
    got = open_features(gpu_store, on_gpu.ref)
    assert gpu_store.verify(got.record) == []
    reference = create_backbone("tiny", weights="random", dtype=torch.float16).eval()
    dataset = load_dataset(small_davis)
    for clip, records in dataset.clips().items():
        torch.testing.assert_close(got.read_masks(clip), open_features(cpu_store, on_cpu.ref).read_masks(clip),
                                   rtol=0, atol=0)
        stream = FrameStream(records, 4, torch.device("cuda"), with_masks=False)
        pixels = torch.cat([batch.pixels.cpu() for batch in stream])
        assert stream.fallbacks == []
        want = reference.extract(pixels)
        for layer in got.layers:
            have = got.read(clip, layer).float()
            assert have.shape == want[layer].shape
            assert float((have - want[layer].float()).norm() / want[layer].float().norm()) < 5e-2, (clip, layer)


@pytest.mark.parametrize(("device", "scheduler"), [("cpu", None), ("auto", "local:1")])
def test_nvjpeg_without_a_named_gpu_is_refused_before_any_work(tmp_path: Path, small_davis: Path, device: str,
                                                               scheduler: str | None) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(FeatstoreError, match=f"--jpeg-decoder nvjpeg decodes on a GPU but --device {device} "):
        build_features(store, "tiny", small_davis, weights="random", device=device, scheduler=scheduler,
                       jpeg_decoder="nvjpeg", progress=False)
    with pytest.raises(FeatstoreError, match="--jpeg-decoder 'libjpeg' is not one of auto, pil, nvjpeg"):
        build_features(store, "tiny", small_davis, weights="random", device="cpu", jpeg_decoder="libjpeg",
                       progress=False)
    assert store.list() == []


def test_pil_decoding_is_what_a_cpu_build_does_anyway(tmp_path: Path, small_davis: Path) -> None:
    store = Store(tmp_path / "store")
    default = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    chosen = build_features(store, "tiny", small_davis, weights="random", device="cpu", jpeg_decoder="pil",
                            progress=False)
    assert chosen.cached and chosen.ref == default.ref


@pytest.mark.gpu
def test_a_gpu_build_told_to_decode_with_pil_reuses_the_cpu_features(tmp_path: Path, small_davis: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    store = Store(tmp_path / "store")
    on_cpu = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    on_gpu = build_features(store, "tiny", small_davis, weights="random", device="cuda", jpeg_decoder="pil",
                            progress=False)
    assert on_gpu.cached and on_gpu.ref == on_cpu.ref
    fresh = build_features(Store(tmp_path / "fresh"), "tiny", small_davis, weights="random", device="cuda",
                           jpeg_decoder="pil", progress=False)
    assert fresh.record.key == on_cpu.record.key and not decodes_on_gpu(fresh.record.metadata["preprocessing"])


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:x"])
def test_a_device_featstore_cannot_use_is_refused_before_any_work(tmp_path: Path, small_davis: Path,
                                                                   device: str) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(FeatstoreError, match=f"--device '{device}'"):
        build_features(store, "tiny", small_davis, weights="random", device=device, progress=False)
    with pytest.raises(FeatstoreError, match=f"--device '{device}'"):
        build_features(store, "tiny", small_davis, weights="random", device=device, scheduler="local:1",
                       progress=False)
    assert store.list() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_cuda_without_a_gpu_is_an_error_that_says_what_to_use() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(FeatstoreError, match="torch sees no GPU: use --device cpu or auto"):
        resolve_device("cuda:0")


def test_a_partly_annotated_dataset_is_built_without_masks_and_says_so(
    tmp_path: Path, small_davis: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (small_davis / "Annotations" / "480p" / "beta" / "00001.png").unlink()
    result = build_features(Store(tmp_path / "store"), "tiny", small_davis, weights="random", device="cpu")
    err = capsys.readouterr().err
    assert "11 of 12 frames have masks; features are stored without masks" in err
    assert "No mask: beta/00001 (row 6)" in err
    assert not open_features(Store(tmp_path / "store"), result.ref).has_masks
