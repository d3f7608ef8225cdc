"""The demo's data: scikit-learn's handwritten digits written as an image folder (``sedense digits``)."""

from __future__ import annotations

from pathlib import Path

from sedense.errors import SedenseError


def write_digits(out: Path, test_out: Path | None, holdout: float, size: int, seed: int) -> tuple[int, int]:
    """Write scikit-learn's handwritten digits (1,797 8×8 images) as PNG folders, one per digit."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SedenseError("the digits dataset comes with scikit-learn: pip install scikit-learn") from None
    import random

    import numpy as np
    from PIL import Image

    digits = load_digits()
    by_class: dict[int, list[int]] = {}
    for i, target in enumerate(digits.target):
        by_class.setdefault(int(target), []).append(i)
    rng = random.Random(seed)
    n_train = n_test = 0
    for target, indices in sorted(by_class.items()):
        rng.shuffle(indices)
        n_hold = int(round(len(indices) * holdout)) if test_out is not None else 0
        for j, i in enumerate(indices):
            folder = (test_out if j < n_hold else out) / str(target)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC)
            img.save(folder / f"digit_{i:04d}.png")
            n_test += j < n_hold
            n_train += j >= n_hold
    return n_train, n_test


def digits_command(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="sedense digits",
        description="Write scikit-learn's handwritten digits as an image folder (one sub-folder per digit).",
    )
    parser.add_argument("out", nargs="?", default="data/digits", help="folder for the labelled images")
    parser.add_argument("--test_out", "--test-out", dest="test_out", default="data/digits-test",
                        help="folder for the held-out test images")
    parser.add_argument("--holdout", type=float, default=0.1, help="fraction of each digit held out for testing")
    parser.add_argument("--size", type=int, default=32, help="side of the written images, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    args = parser.parse_args(argv)
    if not 0 <= args.holdout < 1:
        raise SedenseError(f"--holdout must be in [0, 1), got {args.holdout}")
    out, test_out = Path(args.out), Path(args.test_out) if args.holdout > 0 else None
    for folder in (out, test_out):
        if folder is not None and folder.exists() and any(folder.iterdir()):
            raise SedenseError(f"{folder} already exists and is not empty; remove it or choose another folder")
    n_train, n_test = write_digits(out, test_out, args.holdout, args.size, args.seed)
    print(f"Wrote {n_train} images to {out}" + (f" and {n_test} held-out images to {test_out}" if test_out else ""))
