"""Lossless compression of an instance before it goes up the clinic's slow uplink.

A DR image is ~18 MB uncompressed and typically 2-4x smaller as JPEG-LS or JPEG 2000
lossless, so compressing before STOW-RS is the cheapest way to move studies faster.
The spool copy is never touched: the compressed instance is a new Part 10 file in a temp
dir, with the same SOP Instance UID (lossless transcoding keeps the instance identity),
and it is decoded once and compared pixel-for-pixel with the original before it is
offered for upload. Whenever compression is not possible, not lossless, or not smaller,
the original file is uploaded instead: compression may save time, it must never cost an
upload.

The encoders are pydicom's own (``Dataset.compress``) with the pyjpegls plugin for
JPEG-LS and pylibjpeg + pylibjpeg-openjpeg for JPEG 2000; nothing here is a codec.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import get_decoder, get_encoder, pixel_array
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
)

from edge.store.walk import DecodeLimits, Malformed, OverLimit, walk_instance

log = logging.getLogger(__name__)

CompressMethod = Literal["none", "jpeg-ls", "j2k"]

# method -> (target transfer syntax, pydicom encoding plugin, what to pip install)
_CODECS: Final[dict[str, tuple[UID, str, str]]] = {
    "jpeg-ls": (JPEGLSLossless, "pyjpegls", "pyjpegls"),
    "j2k": (JPEG2000Lossless, "pylibjpeg", "pylibjpeg pylibjpeg-openjpeg"),
}

# Only natively encoded pixel data is transcoded; anything encapsulated is sent as is.
UNCOMPRESSED_SYNTAXES: Final = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
)

MAX_COMPRESS_FILE_BYTES: Final = 64 * 1024 * 1024
"""Larger files are sent uncompressed, to keep a 1-2 GB box out of the OOM killer.
Compressing holds the stored pixels plus the codec's buffers (pyjpegls allocates ~5x a
frame while encoding), and the check holds two decoded copies: a 3000x3000 16-bit DR
image (~18 MB) peaks at ~100-120 MB above the process's baseline. 64 MB still covers a
single mammogram; it does not cover a long multi-frame cine, which goes as it is."""

MAX_COMPRESS_ELEMENTS: Final = 50_000
"""Instances with more elements are sent as they are stored, never parsed: pydicom holds
some 400-500 bytes per element, so a file of 2 million tiny elements (20 MB) took ~820 MB
to read. A DR image has a few hundred; an enhanced multi-frame object tens of thousands."""

_FLOAT_PIXEL_KEYWORDS: Final = ("FloatPixelData", "DoubleFloatPixelData")

MIN_PIXELS: Final = 32 * 32
"""Smaller images are sent as they are: the header outweighs any saving, and CharLS
fails on some tiny colour images."""

# Binary VRs whose bytes pydicom writes as they are: from a big endian source they would
# reach the little endian copy unswapped, so such sources are not transcoded.
_WORD_VRS: Final = frozenset({"OW", "OF", "OD", "OL", "OV", "UN"})

# pylibjpeg-openjpeg always uses 6 DWT resolutions, which need a side of 2**5 pixels.
_J2K_MIN_SIDE: Final = 32


class UnfitForUpload(Exception):
    """The stored instance costs more to decode than ``[storage]`` allows: quarantine it, do not retry it.

    ``reason`` is for the technician (``edge studies``) and names the limit.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PreparedUpload:
    """What to upload for one instance, and whether the caller must delete it afterwards."""

    path: Path
    temporary: bool
    transfer_syntax: str
    original_bytes: int
    upload_bytes: int
    note: str


def check_codecs(method: CompressMethod) -> None:
    """Fail at start-up, not at the first upload, when the configured codec cannot run.

    Raises
    ------
    RuntimeError
        If `method` is unknown, or its encoder or decoder (needed for the pixel check)
        is missing or does not round-trip a tiny image.
    """
    if method == "none":
        return
    if method not in _CODECS:
        raise RuntimeError(
            f"unknown compression method {method!r}: expected one of {', '.join(get_args(CompressMethod))}"
        )
    uid, plugin, packages = _CODECS[method]
    encoder = get_encoder(uid)
    if plugin not in encoder.available_plugins:
        missing = "; ".join(encoder.missing_dependencies) or "plugin not registered"
        raise RuntimeError(
            f"compress = {method!r} needs the {plugin} encoder for {uid.name}, which is unavailable "
            f"({missing}): pip install {packages}, or set compress = \"none\""
        )
    decoder = get_decoder(uid)
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise RuntimeError(
            f"compress = {method!r} needs a {uid.name} decoder to verify each image, and none is "
            f"available ({missing}): pip install {packages}"
        )
    # A broken native library imports fine and fails on first use: prove it works now.
    sample = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 61) % 4096
    # A plain mapping: pydicom 3.0 annotates as_array's **kwargs as DecodeOptions itself, not Unpack[...].
    pixels: dict[str, Any] = dict(
        rows=64, columns=64, samples_per_pixel=1, bits_allocated=16, bits_stored=12, pixel_representation=0,
        photometric_interpretation="MONOCHROME2", number_of_frames=1,
    )
    try:
        frame = encoder.encode(sample, encoding_plugin=plugin, **pixels)
        decoded, _ = decoder.as_array(encapsulate([frame]), **pixels)
    except Exception as exc:
        raise RuntimeError(f"compress = {method!r}: the {uid.name} codec failed a self-test: {exc}") from exc
    if not np.array_equal(decoded, sample):
        raise RuntimeError(f"compress = {method!r}: the {uid.name} codec self-test was not lossless")


def prepare_upload(
    source: Path, tmp_dir: Path, method: CompressMethod, limits: DecodeLimits | None = None
) -> PreparedUpload:
    """Return the file to upload for `source`: a verified lossless copy in `tmp_dir`, or `source`.

    Runs in a worker thread. Before anything decodes the file, a bounded walk
    (:func:`edge.store.walk.walk_instance`) measures it against `limits`; files too big
    once inflated, or with too many elements, to parse in memory are sent as stored.
    It does not raise because compression failed; it raises ``UnfitForUpload`` when the
    file is over `limits` (it was kept before them, or under laxer ones), ``OSError`` only
    if `source` cannot be stat'ed (the upload could not read it either) and
    ``ValueError`` for an unknown `method` (a bug: config validation rejects it).
    """
    limits = limits or DecodeLimits()
    original_bytes = source.stat().st_size
    stored = _stored_syntax(source)
    if method == "none" and stored != DeflatedExplicitVRLittleEndian:
        return _original(source, original_bytes, stored, "compression off")  # nothing here decodes it
    if method != "none" and method not in _CODECS:
        raise ValueError(f"unknown compression method {method!r}")
    if not stored:
        return _original(source, original_bytes, stored, "no transfer syntax in file meta: sent as is")
    if stored not in UNCOMPRESSED_SYNTAXES:
        return _original(source, original_bytes, stored, f"already encoded as {UID(stored).name}: sent as is")
    try:
        walked = walk_instance(source, limits)
    except OverLimit as exc:
        raise UnfitForUpload(f"not sent: {exc.reason}") from None
    except Malformed as exc:
        return _original(source, original_bytes, stored, f"{exc.reason}: sent as is, unparsed")
    if method == "none":
        return _original(source, original_bytes, stored, "compression off")
    uid, plugin, _ = _CODECS[method]
    if walked.elements > MAX_COMPRESS_ELEMENTS:
        return _original(
            source, original_bytes, stored, f"{walked.elements} elements are too many to compress in memory: sent as is",
        )
    decoded_bytes = max(original_bytes, walked.decoded_bytes)  # what pydicom would hold: inflated, if deflated
    if decoded_bytes > MAX_COMPRESS_FILE_BYTES:
        return _original(
            source, original_bytes, stored,
            f"{decoded_bytes // 2**20} MB decoded is too large to compress in memory: sent uncompressed",
        )

    started = time.perf_counter()
    try:
        ds = dcmread(source)
    except Exception as exc:  # pydicom's messages may quote element values: log the type only
        return _original(source, original_bytes, stored, f"unreadable by pydicom ({type(exc).__name__}): sent as is")
    sop_uid = str(ds.get("SOPInstanceUID", "?"))
    refusal = _why_not(ds, uid)
    if refusal:
        return _original(source, original_bytes, stored, refusal)

    tmp_dir.mkdir(parents=True, exist_ok=True)
    # mkstemp reserves the final name; the copy is written beside it and renamed over it
    fd, final_name = tempfile.mkstemp(dir=tmp_dir, prefix=f"{source.stem}.", suffix=f".{method}.dcm")
    os.close(fd)
    final = Path(final_name)
    partial = final.with_name(f".{final.name}.part")
    keep = False
    try:
        try:
            _encode(ds, uid, plugin)
        except Exception as exc:  # encoder messages describe the image pixel module only
            lines = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {lines[-1].strip()[:160]}" if lines else type(exc).__name__
            log.warning("compress: %s encoder refused instance %s (%s): sending it uncompressed", method, sop_uid, detail)
            return _original(source, original_bytes, stored, f"{method} encoder refused the image ({detail}): sent uncompressed")
        try:
            # dcmwrite, not save_as: save_as refuses a big endian source outright; _why_not
            # has made sure nothing but the (replaced) pixel data would need byte swapping
            dcmwrite(partial, ds, enforce_file_format=True)
        except Exception as exc:
            log.warning("compress: could not write the %s copy of instance %s (%s): sending it uncompressed",
                        method, sop_uid, type(exc).__name__)
            return _original(source, original_bytes, stored, f"could not write the compressed copy ({type(exc).__name__})")
        del ds  # the encoded frames: from here on the files on disk are what count
        os.replace(partial, final)
        upload_bytes = final.stat().st_size
        if upload_bytes >= original_bytes:
            return _original(
                source, original_bytes, stored,
                f"{method} copy not smaller ({upload_bytes} >= {original_bytes} bytes): sent uncompressed",
            )

        mismatch = _pixel_mismatch(source, final)
        if mismatch:
            log.error("compress: %s copy of instance %s is NOT lossless (%s): sending the original",
                      method, sop_uid, mismatch)
            return _original(source, original_bytes, stored, f"{method} copy failed the pixel check ({mismatch}): sent uncompressed")

        seconds = time.perf_counter() - started
        keep = True
        note = f"{method} lossless {original_bytes / upload_bytes:.2f}x in {seconds:.2f} s, pixels verified"
        log.debug("compress: instance %s %s", sop_uid, note)
        return PreparedUpload(final, True, str(uid), original_bytes, upload_bytes, note)
    finally:
        if not keep:
            partial.unlink(missing_ok=True)
            final.unlink(missing_ok=True)


def _encode(ds: Dataset, uid: UID, plugin: str) -> None:
    """Replace the native pixel data of `ds` by its `uid` encoding, keeping its SOP Instance UID."""
    little_endian = ds.original_encoding[1] is not False
    samples = int(ds.get("SamplesPerPixel", 1))
    by_pixel = samples == 1 or int(ds.get("PlanarConfiguration", 0)) == 0
    if little_endian and by_pixel:
        # Straight from the stored bytes: no array copy of the image while the codec works.
        ds.compress(uid, encoding_plugin=plugin, generate_instance_uid=False)
        return
    # Big endian, or colour-by-plane: through an array in native byte order, which
    # pixel_array() gives colour-by-pixel, as PS3.5 8.2.3/8.2.4 want it in the codestream.
    arr = pixel_array(ds, raw=True)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    del ds.PixelData
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.compress(uid, arr, encoding_plugin=plugin, generate_instance_uid=False)


def _original(source: Path, size: int, transfer_syntax: str, note: str) -> PreparedUpload:
    """The spool file itself, unchanged: the caller must not delete it."""
    log.debug("compress: %s sent as it is stored: %s", source.name, note)
    return PreparedUpload(source, False, transfer_syntax, size, size, note)


def _stored_syntax(source: Path) -> str:
    """The file's transfer syntax from its meta header alone (no pixel data is read)."""
    try:
        return str(read_file_meta_info(source).get("TransferSyntaxUID", ""))
    except Exception:
        return ""


def _why_not(ds: Dataset, uid: UID) -> str:
    """Why `ds` cannot be losslessly encoded as `uid`, or "" if it can."""
    if "PixelData" not in ds:
        if any(kw in ds for kw in _FLOAT_PIXEL_KEYWORDS):
            return "float pixel data has no lossless image codec: sent as is"
        return "no pixel data: sent as is"
    try:
        spp = int(ds.SamplesPerPixel)
        pi = str(ds.PhotometricInterpretation)
        px_repr = int(ds.PixelRepresentation)
        bits_allocated = int(ds.BitsAllocated)
        bits_stored = int(ds.BitsStored)
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return "image pixel module incomplete: sent as is"
    if rows * columns < MIN_PIXELS:
        return f"{rows}x{columns} is too small to be worth compressing: sent as is"
    if uid == JPEG2000Lossless and min(rows, columns) < _J2K_MIN_SIDE:
        return f"{rows}x{columns} is too small for the JPEG 2000 encoder: sent uncompressed"
    if ds.original_encoding[1] is False and _has_word_values(ds, top_level=True):
        return "big endian with binary attributes besides the pixels: sent as is"
    for p_pi, p_spp, p_repr, p_alloc, p_stored in ENCODING_PROFILES.get(uid, []):
        if (pi, spp) == (p_pi, p_spp) and px_repr in p_repr and bits_allocated in p_alloc and bits_stored in p_stored:
            return ""
    return (
        f"{uid.name} cannot hold {pi} x{spp}, {bits_stored}/{bits_allocated} bits, "
        f"pixel representation {px_repr}: sent uncompressed"
    )


def _has_word_values(ds: Dataset, top_level: bool) -> bool:
    """Whether `ds` holds OW/OF/... values (other than its own pixel data) at any depth."""
    for elem in ds:
        if top_level and elem.tag == 0x7FE00010:
            continue
        if elem.VR == "SQ":
            if any(_has_word_values(item, top_level=False) for item in elem.value):
                return True
        elif elem.VR in _WORD_VRS:
            return True
    return False


def _pixel_mismatch(source: Path, copy: Path) -> str:
    """Decode both files once and say how their pixels differ, or "" if they are identical.

    raw=True compares stored values, with no YBR->RGB conversion on either side; both
    are decoded from disk, so this checks exactly what is in the spool against exactly
    what will be uploaded.
    """
    try:
        actual = pixel_array(copy, raw=True)
    except Exception as exc:
        return f"copy does not decode: {type(exc).__name__}"
    try:
        if _stored_syntax(source) == DeflatedExplicitVRLittleEndian:
            expected = pixel_array(dcmread(source), raw=True)  # pixel_array(path) cannot inflate
        else:
            expected = pixel_array(source, raw=True)  # reads only the pixel data it needs
    except Exception as exc:
        return f"original does not decode: {type(exc).__name__}"
    if actual.dtype != expected.dtype.newbyteorder("="):  # a big endian original is the same type
        return f"dtype {actual.dtype} != {expected.dtype}"
    if actual.shape != expected.shape:
        return f"shape {actual.shape} != {expected.shape}"
    if not np.array_equal(actual, expected):
        return f"{int(np.count_nonzero(actual != expected))} samples differ"
    return ""
