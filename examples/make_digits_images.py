"""Write scikit-learn's bundled 8x8 digits as an image folder, to try raydyn's ``image_folder`` data.

Layout (what ``task.dataset: image_folder`` and torchvision's ImageFolder read)::

    OUT/train/<digit>/<index>.png     # 1,437 images (80 %)
    OUT/test/<digit>/<index>.png      #   360 images (20 %)

``<index>`` is the sample's position in ``sklearn.datasets.load_digits()`` (zero-padded to four
digits so file order is index order). Images are 8-bit grayscale PNGs: the 0..16 pixel values
scaled to 0..255, upsampled from 8x8 to ``--size`` x ``--size`` (default 16) with bilinear
resampling. The split is stratified and fixed (seed 0), and the files are byte-for-byte the same
on every run. Nothing is downloaded: the digits ship with scikit-learn.

    python examples/make_digits_images.py                      # -> examples/data/digits_png
    python examples/make_digits_images.py --size 32 --out /tmp/digits32
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "digits_png"
TEST_FRACTION = 0.2
SEED = 0


def write_digits(out: Path, size: int = 16) -> dict[str, int]:
    """Write the image folder under ``out``; returns the number of images per split."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    pixels = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8) in 0..255
    index = np.arange(len(pixels))
    train, test = train_test_split(index, test_size=TEST_FRACTION, random_state=SEED, stratify=d.target)
    counts = {}
    for split, idx in (("train", np.sort(train)), ("test", np.sort(test))):
        for i in idx:
            folder = out / split / str(int(d.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(pixels[i])  # mode "L"
            if size != 8:
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            im.save(folder / f"{int(i):04d}.png", format="PNG", optimize=False)
        counts[split] = len(idx)
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--size", type=int, default=16, help="image side in pixels, >= 8 (default 16; 32 works too)")
    args = ap.parse_args(argv)
    if args.size < 8:
        ap.error(f"--size must be >= 8 (the digits are 8x8), got {args.size}")
    counts = write_digits(args.out, args.size)
    print(f"wrote {counts['train']} train and {counts['test']} test images ({args.size}x{args.size} grayscale PNG, "
          f"10 classes, stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split, seed {SEED}) to {args.out}")


if __name__ == "__main__":
    main()
