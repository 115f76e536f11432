"""Compression benchmark: what does lossless compression before upload cost, and what does it save?

Why this exists: the outbox worker can send each DR image as it was received, or as a
JPEG-LS or JPEG 2000 lossless copy (``sync.compress.prepare_upload``: encode, write,
decode once and compare every pixel). Over the clinic's slow uplink the smaller file wins
only if compressing is quicker than sending the bytes it saves, and the node has 1-2 GB of
RAM. This prints, for none / jpeg-ls / j2k: total bytes, ratio, seconds per image (the
whole prepare_upload, verification included), peak RSS, and the time to compress and send
one image at a given uplink speed. It sets no goals and judges nothing.

The images are synthetic (``tests.sync.test_compress.dr_like_pixels``: chest-like anatomy
plus quantum noise, 12 bits stored in 16), 3000x3000 by default, one seed each. Real DR
images compress differently, mostly according to their noise: treat the ratio as an
indication and measure real images (``--files``) before deciding.

Each method runs in a fresh child process so that its peak RSS is its own (the figure
includes the interpreter, numpy and pydicom; the "baseline" column is that part alone).
The images are generated in another child: Linux carries a process's peak RSS across
fork and exec, so a parent that had held the generator's arrays would inflate every
child's getrusage figure.

Run:  .venv/bin/python bench/compress.py [--count 5] [--side 3000] [--uplink-mbps 4]
      .venv/bin/python bench/compress.py --files /path/to/dir/of/real/*.dcm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("none", "jpeg-ls", "j2k")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one_method(method: str, files: list[Path]) -> dict[str, object]:
    """Child process: prepare every file as the outbox worker would, deleting each copy after 'upload'."""
    from sync.compress import check_codecs, prepare_upload

    check_codecs(method)  # type: ignore[arg-type]
    baseline = peak_rss_mb()
    original = uploaded = compressed = 0
    seconds: list[float] = []
    notes: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        for path in files:
            started = time.perf_counter()
            result = prepare_upload(path, Path(tmp), method)  # type: ignore[arg-type]
            seconds.append(time.perf_counter() - started)
            original += result.original_bytes
            uploaded += result.upload_bytes
            compressed += result.temporary
            if not result.temporary:
                notes.add(result.note)
            if result.temporary:
                result.path.unlink()
    return {
        "method": method, "images": len(files), "compressed": compressed,
        "original_bytes": original, "upload_bytes": uploaded, "seconds": seconds,
        "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb(), "notes": sorted(notes),
    }


def write_synthetic(dest: Path, count: int, side: int) -> list[Path]:
    """Write `count` DR-size images, each from its own seed, as explicit VR little endian."""
    from tests.dicom_factory import dr_like_pixels, write_dr

    paths = []
    for i in range(count):
        pixels = dr_like_pixels(side, side, seed=i)
        paths.append(write_dr(dest / f"dr{i:03d}.dcm", pixels))
        del pixels
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5, help="synthetic images to generate (default 5)")
    parser.add_argument("--side", type=int, default=3000, help="rows = columns of each image (default 3000)")
    parser.add_argument("--uplink-mbps", type=float, default=4.0, help="uplink speed for the send-time column")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--files", nargs="+", type=Path, help="measure these DICOM files instead of synthetic ones")
    parser.add_argument("--tmp", type=Path, default=None, help="where the synthetic images go")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--generate-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.generate_into:  # writes the images, prints their paths
        print("\n".join(str(p) for p in write_synthetic(args.generate_into, args.count, args.side)))
        return 0

    if args.child:  # one method, in its own process: reads a file list, prints JSON
        files = [Path(line) for line in sys.stdin.read().splitlines() if line]
        print(json.dumps(run_one_method(args.child, files)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-compress-src-", dir=args.tmp) as src:
        if args.files:
            files = list(args.files)
            what = f"{len(files)} given files"
        else:
            started = time.perf_counter()
            gen = subprocess.run(
                [sys.executable, __file__, "--generate-into", src, "--count", str(args.count), "--side", str(args.side)],
                capture_output=True, text=True, check=True,
            )
            files = [Path(line) for line in gen.stdout.splitlines() if line]
            what = (f"{args.count} synthetic {args.side}x{args.side} 12-in-16-bit DR images "
                    f"(generated in {time.perf_counter() - started:.1f} s, not counted)")
        print(f"# {what}; {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
        print(f"# send time assumes {args.uplink_mbps:g} Mbit/s of payload; RSS per method, own process")
        rows = []
        for method in args.methods:
            child = subprocess.run(
                [sys.executable, __file__, "--child", method],
                input="\n".join(str(f) for f in files), capture_output=True, text=True, check=False,
            )
            if child.returncode != 0:
                print(f"{method}: failed\n{child.stderr.strip()}", file=sys.stderr)
                return 1
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))

    header = ("method", "images", "compressed", "total MB", "ratio", "s/image", "max s",
              "peak RSS MB", "baseline MB", "compress+send s/image")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        seconds: list[float] = r["seconds"]  # type: ignore[assignment]
        n = max(int(r["images"]), 1)  # type: ignore[call-overload]
        per_image = sum(seconds) / n
        upload = int(r["upload_bytes"])  # type: ignore[call-overload]
        send = upload / n * 8 / (args.uplink_mbps * 1e6)
        print(" | ".join([
            str(r["method"]), str(r["images"]), str(r["compressed"]),
            f"{upload / 1e6:.1f}", f"{int(r['original_bytes']) / max(upload, 1):.2f}",  # type: ignore[call-overload]
            f"{per_image:.3f}", f"{max(seconds, default=0.0):.3f}",
            f"{float(r['peak_rss_mb']):.0f}", f"{float(r['baseline_rss_mb']):.0f}",  # type: ignore[arg-type]
            f"{per_image + send:.1f}",
        ]))
    for r in rows:
        for note in r["notes"]:  # type: ignore[attr-defined]
            print(f"# {r['method']}: sent as is: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
