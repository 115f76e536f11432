"""Lossless compression before upload: smaller, pixel-identical, and never at the cost of an upload."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
)

import sync.compress as compress
from sync.compress import CompressMethod, PreparedUpload, check_codecs, prepare_upload
from tests.dicom_factory import dr_like_pixels, write_dr

METHODS: tuple[CompressMethod, ...] = ("jpeg-ls", "j2k")
SYNTAX = {"jpeg-ls": JPEGLSLossless, "j2k": JPEG2000Lossless}
# Big enough to look like a detector (edges, texture, noise), small enough to keep tests quick;
# bench/compress.py measures the full 3000x3000.
DR_SIDE = 1024


def sample(name: str, dest: Path) -> Path:
    """A copy of one of pydicom's sample files, so nothing can touch the package's own."""
    return Path(shutil.copy(str(get_testdata_file(name)), dest / name))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_sent_as_is(result: PreparedUpload, source: Path, tmp_dir: Path) -> None:
    size = source.stat().st_size
    assert result.path == source
    assert result.temporary is False
    assert result.original_bytes == result.upload_bytes == size
    assert result.note
    assert not tmp_dir.exists() or not list(tmp_dir.iterdir()), "a fallback must leave no temp file behind"


def assert_lossless_copy(result: PreparedUpload, source: Path, tmp_dir: Path, method: CompressMethod) -> None:
    """The copy is a new file in tmp_dir, in the target syntax, smaller, and decodes to the same pixels."""
    assert result.temporary is True
    assert result.path != source and result.path.parent == tmp_dir
    assert result.transfer_syntax == SYNTAX[method]
    assert result.original_bytes == source.stat().st_size
    assert result.upload_bytes == result.path.stat().st_size < result.original_bytes
    assert [p.name for p in tmp_dir.iterdir()] == [result.path.name], "no partial file left behind"
    original, copy = dcmread(source), dcmread(result.path)
    assert copy.file_meta.TransferSyntaxUID == SYNTAX[method]
    before, after = original.pixel_array, copy.pixel_array
    # same values in the same integer type; a big endian source decodes to a byte-swapped dtype
    assert after.dtype == before.dtype.newbyteorder("=") and after.shape == before.shape
    assert np.array_equal(after, before)


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    return tmp_path / "upload-tmp"


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def dr_pixels() -> np.ndarray:
    return dr_like_pixels(DR_SIDE, DR_SIDE)


@pytest.mark.parametrize("method", METHODS)
def test_dr_image_shrinks_at_least_2x_and_uploads_the_same_pixels(
    method: CompressMethod, dr_pixels: np.ndarray, spool: Path, tmp_dir: Path
) -> None:
    source = write_dr(spool / "dr.dcm", dr_pixels)
    result = prepare_upload(source, tmp_dir, method)
    assert_lossless_copy(result, source, tmp_dir, method)
    assert result.original_bytes / result.upload_bytes >= 2.0, result.note
    assert "verified" in result.note


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_pydicom_ct_and_mr_samples_are_compressed_losslessly(
    name: str, method: CompressMethod, spool: Path, tmp_dir: Path
) -> None:
    source = sample(name, spool)
    assert_lossless_copy(prepare_upload(source, tmp_dir, method), source, tmp_dir, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_dr_in_any_uncompressed_syntax_is_compressed_losslessly(
    syntax: str, method: CompressMethod, spool: Path, tmp_dir: Path
) -> None:
    source = write_dr(spool / "dr.dcm", dr_like_pixels(256, 256, seed=3), transfer_syntax=syntax)
    assert_lossless_copy(prepare_upload(source, tmp_dir, method), source, tmp_dir, method)


@pytest.mark.parametrize("method", METHODS)
def test_multiframe_signed_and_colour_images_are_compressed_losslessly(
    method: CompressMethod, spool: Path, tmp_dir: Path
) -> None:
    frames = np.stack([dr_like_pixels(128, 160, seed=s) for s in range(3)])
    multiframe = write_dr(spool / "mf.dcm", frames)
    signed = write_dr(spool / "signed.dcm", (dr_like_pixels(128, 128).astype(np.int16) - 2048), pixel_representation=1)
    colour = sample("examples_rgb_color.dcm", spool)  # RGB, colour-by-pixel
    by_plane = spool / "rgb_by_plane.dcm"  # the same image stored colour-by-plane
    ds = dcmread(colour)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array.transpose(2, 0, 1)).tobytes()
    ds.PlanarConfiguration = 1
    ds.save_as(by_plane)
    for source in (multiframe, signed, colour, by_plane):
        result = prepare_upload(source, tmp_dir, method)
        assert_lossless_copy(result, source, tmp_dir, method)
        if source in (colour, by_plane):  # colour-by-pixel, as PS3.5 8.2.3/8.2.4 want in the codestream
            assert dcmread(result.path).PlanarConfiguration == 0
        result.path.unlink()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"])
def test_already_compressed_file_is_sent_as_is(name: str, method: CompressMethod, spool: Path, tmp_dir: Path) -> None:
    source = sample(name, spool)
    result = prepare_upload(source, tmp_dir, method)
    assert_sent_as_is(result, source, tmp_dir)
    assert result.transfer_syntax == dcmread(source).file_meta.TransferSyntaxUID
    assert "already encoded" in result.note


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["waveform_ecg.dcm", "test-SR.dcm"])
def test_file_without_pixel_data_is_sent_as_is(name: str, method: CompressMethod, spool: Path, tmp_dir: Path) -> None:
    source = sample(name, spool)
    result = prepare_upload(source, tmp_dir, method)
    assert_sent_as_is(result, source, tmp_dir)
    assert result.note.startswith("no pixel data")


def test_compression_off_sends_the_original(dr_pixels: np.ndarray, spool: Path, tmp_dir: Path) -> None:
    source = write_dr(spool / "dr.dcm", dr_pixels)
    result = prepare_upload(source, tmp_dir, "none")
    assert_sent_as_is(result, source, tmp_dir)
    assert result.transfer_syntax == ExplicitVRLittleEndian


@pytest.mark.parametrize("method", METHODS)
def test_image_the_codec_cannot_take_is_sent_as_is(method: CompressMethod, spool: Path, tmp_dir: Path) -> None:
    one_bit = sample("liver_1frame.dcm", spool)  # 1 bit allocated: neither codec takes it
    tiny = sample("SC_rgb_small_odd.dcm", spool)  # 3x3
    floats = spool / "float.dcm"
    ds = dcmread(write_dr(spool / "base.dcm", dr_like_pixels(64, 64)))
    del ds.PixelData
    ds.BitsAllocated = ds.BitsStored = 32
    ds.FloatPixelData = np.zeros((64, 64), np.float32).tobytes()
    dcmwrite(floats, ds, enforce_file_format=True)
    for source, why in ((one_bit, "cannot hold"), (tiny, "too small"), (floats, "float pixel data")):
        result = prepare_upload(source, tmp_dir, method)
        assert_sent_as_is(result, source, tmp_dir)
        assert why in result.note


def test_jpeg_ls_limit_on_bits_is_respected(spool: Path, tmp_dir: Path) -> None:
    deep = write_dr(spool / "deep.dcm", dr_like_pixels(64, 64).astype(np.uint32) * 16, bits_stored=20)
    result = prepare_upload(deep, tmp_dir, "jpeg-ls")
    assert_sent_as_is(result, deep, tmp_dir)
    assert "cannot hold" in result.note
    assert_lossless_copy(prepare_upload(deep, tmp_dir, "j2k"), deep, tmp_dir, "j2k")  # J2K goes to 38 bits


def test_big_endian_file_with_other_binary_attributes_is_sent_as_is(spool: Path, tmp_dir: Path) -> None:
    source = spool / "be_overlay.dcm"
    ds = dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    ds.add_new(0x60003000, "OW", bytes(range(16)))  # Overlay Data: would reach the copy unswapped
    ds.save_as(source)
    result = prepare_upload(source, tmp_dir, "jpeg-ls")
    assert_sent_as_is(result, source, tmp_dir)
    assert "big endian" in result.note


def test_file_too_large_to_compress_in_memory_is_sent_as_is(
    spool: Path, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = sample("CT_small.dcm", spool)
    monkeypatch.setattr(compress, "MAX_COMPRESS_FILE_BYTES", source.stat().st_size - 1)
    result = prepare_upload(source, tmp_dir, "jpeg-ls")
    assert_sent_as_is(result, source, tmp_dir)
    assert "too large" in result.note


@pytest.mark.parametrize("method", METHODS)
def test_noise_that_does_not_shrink_is_sent_uncompressed(method: CompressMethod, spool: Path, tmp_dir: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 2**16, size=(256, 256), dtype=np.uint16)
    source = write_dr(spool / "noise.dcm", noise, bits_stored=16)
    result = prepare_upload(source, tmp_dir, method)
    assert_sent_as_is(result, source, tmp_dir)
    assert "not smaller" in result.note


@pytest.mark.parametrize("method", METHODS)
def test_original_file_is_byte_identical_after_compression(
    method: CompressMethod, dr_pixels: np.ndarray, spool: Path, tmp_dir: Path
) -> None:
    sources = [write_dr(spool / "dr.dcm", dr_pixels), sample("CT_small.dcm", spool), sample("MR_small_bigendian.dcm", spool)]
    before = {p: (sha256(p), p.stat().st_mtime_ns) for p in sources}
    for source in sources:
        assert prepare_upload(source, tmp_dir, method).temporary
    assert {p: (sha256(p), p.stat().st_mtime_ns) for p in sources} == before


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "dr"])
def test_compressed_copy_keeps_every_attribute_but_the_pixels(
    name: str, method: CompressMethod, spool: Path, tmp_dir: Path
) -> None:
    source = write_dr(spool / "dr.dcm", dr_like_pixels(128, 128)) if name == "dr" else sample(name, spool)
    result = prepare_upload(source, tmp_dir, method)
    original, copy = dcmread(source), dcmread(result.path)
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
        assert copy[keyword].value == original[keyword].value, keyword
    assert copy.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert copy.file_meta.MediaStorageSOPClassUID == original.file_meta.MediaStorageSOPClassUID
    pixel_data = 0x7FE00010
    assert sorted(t for t in copy.keys() if t != pixel_data) == sorted(t for t in original.keys() if t != pixel_data)
    for elem in original:
        if elem.tag != pixel_data:
            assert copy[elem.tag].value == elem.value, elem.keyword or str(elem.tag)


def test_copy_that_does_not_decode_to_the_same_pixels_is_not_uploaded(
    dr_pixels: np.ndarray, spool: Path, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = compress.pixel_array

    def decode_with_one_wrong_pixel(src: Any, **kwargs: Any) -> np.ndarray:
        arr = real(src, **kwargs)
        if isinstance(src, Path) and src.parent == tmp_dir:  # the check decoding the copy
            arr[10, 10] ^= 1
        return arr

    monkeypatch.setattr(compress, "pixel_array", decode_with_one_wrong_pixel)
    source = write_dr(spool / "dr.dcm", dr_pixels)
    with caplog.at_level(logging.ERROR, logger="sync.compress"):
        result = prepare_upload(source, tmp_dir, "jpeg-ls")
    assert_sent_as_is(result, source, tmp_dir)
    assert "pixel check" in result.note
    assert any("NOT lossless" in r.getMessage() and "1 samples differ" in r.getMessage() for r in caplog.records)
    assert all("TEST^PATIENT" not in r.getMessage() for r in caplog.records)


def test_encoder_crash_falls_back_to_the_original(spool: Path, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(self: Dataset, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("codec exploded")

    monkeypatch.setattr(Dataset, "compress", crash)
    source = sample("CT_small.dcm", spool)
    result = prepare_upload(source, tmp_dir, "j2k")
    assert_sent_as_is(result, source, tmp_dir)
    assert "codec exploded" in result.note


def test_unreadable_file_is_sent_as_is(spool: Path, tmp_dir: Path) -> None:
    truncated = sample("MR_truncated.dcm", spool)
    result = prepare_upload(truncated, tmp_dir, "jpeg-ls")
    assert_sent_as_is(result, truncated, tmp_dir)


def test_concurrent_workers_get_separate_copies_of_the_same_instance(spool: Path, tmp_dir: Path) -> None:
    source = sample("CT_small.dcm", spool)

    async def both() -> list[PreparedUpload]:
        return list(await asyncio.gather(*(asyncio.to_thread(prepare_upload, source, tmp_dir, "jpeg-ls") for _ in range(4))))

    results = asyncio.run(both())
    assert all(r.temporary for r in results)
    assert len({r.path for r in results}) == 4
    assert sorted(p.name for p in tmp_dir.iterdir()) == sorted(r.path.name for r in results)


def test_unknown_method_is_a_programming_error(spool: Path, tmp_dir: Path) -> None:
    with pytest.raises(ValueError, match="webp"):
        prepare_upload(sample("CT_small.dcm", spool), tmp_dir, "webp")  # type: ignore[arg-type]


def test_check_codecs_passes_for_installed_codecs() -> None:
    for method in ("none", *METHODS):
        check_codecs(method)


def test_check_codecs_rejects_an_unknown_method() -> None:
    with pytest.raises(RuntimeError, match="unknown compression method 'webp'"):
        check_codecs("webp")  # type: ignore[arg-type]


def test_check_codecs_names_the_package_to_install_when_a_codec_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    class MissingEncoder:
        available_plugins: list[str] = []
        missing_dependencies = ["pyjpegls - requires numpy and pyjpegls>=1.3"]

    monkeypatch.setattr(compress, "get_encoder", lambda uid: MissingEncoder())
    with pytest.raises(RuntimeError, match="pip install pyjpegls"):
        check_codecs("jpeg-ls")
