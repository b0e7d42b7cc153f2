"""``ssl-bench make-jpeg-folder``: write a synthetic JPEG folder (``OUT/train/<class>/<image>.jpg``, the
layout of ImageNet) to benchmark the folder loader: deterministic random images with a photograph's
1/f spectrum, so decoding costs about what it costs on photographs."""
from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("make-jpeg-folder", help="write a synthetic JPEG image folder (loader benchmarks)", description=__doc__)
    p.add_argument("--out", required=True, help="new or empty folder to write")
    p.add_argument("--images", type=int, default=2000, help="number of images (default: 2000)")
    p.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of every image, 8 to 4096 px a side (default: 500x375, ImageNet's most "
                   "common), or several, comma-separated, taken in turn (e.g. 500x375,375x500: landscape and portrait)")
    p.add_argument("--classes", type=int, default=10, help="class sub-folders (default: 10)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality, 1 to 100 (default: 90)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes writing images (default: this machine's cores); the files do not depend on it")
    p.set_defaults(func=run)


def run(args) -> int:
    from ssl_bench.data.jpeg_folder import parse_sizes, write_jpeg_folder

    summary = write_jpeg_folder(args.out, args.images, parse_sizes(args.size), args.classes, seed=args.seed, quality=args.quality,
                                workers=args.workers)
    sizes = ", ".join(f"{width}x{height}" for width, height in summary["sizes"])
    print(f"wrote {summary['images']} JPEGs of {sizes} in {summary['classes']} classes under "
          f"{summary['root']}/train ({summary['bytes'] / 2**20:.1f} MiB, {summary['bytes_per_pixel']:.2f} bytes per pixel)")
    return 0
