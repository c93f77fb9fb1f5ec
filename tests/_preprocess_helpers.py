"""Helpers shared by the preprocessing tests: an independent IDX oracle, image-folder builders
with planted bad files, the expected split, and checks of the 256-level pixel grid."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

#: Fashion-MNIST class names (label i = FASHION_CLASSES[i]); folders use them, so the sorted
#: folder order differs from the IDX label numbers, which the label tests rely on.
FASHION_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


def read_idx(path: Path) -> np.ndarray:
    """The test oracle: an IDX(.gz) file as a numpy array, by the format spec (big-endian dims)."""
    raw = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    ndim = raw[3]
    dims = np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4").astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def is_val(identity: str, seed: int, val_fraction: float) -> bool:
    """The documented split rule, re-derived here: blake2b(f"{seed}:{identity}") / 2**64 < fraction."""
    digest = hashlib.blake2b(f"{seed}:{identity}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def assert_on_grid(images: np.ndarray) -> None:
    """Every value is exactly float32(k/127.5 - 1) for an integer k in [0, 255] (x*127.5+127.5 is integral)."""
    assert images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    k = images * np.float32(127.5) + np.float32(127.5)  # float32, as the data are: exact for the grid
    np.testing.assert_array_equal(k, np.round(k))
    np.testing.assert_array_equal(images, (k.astype(np.float32) / np.float32(127.5)) - np.float32(1))


def write_fashion_folder(folder: Path, images: np.ndarray, labels: np.ndarray, jpeg_every: int = 3) -> dict[str, tuple]:
    """Write real Fashion-MNIST images as PNG (and every ``jpeg_every``-th as JPEG) in class folders.

    Returns:
        {relative path: (uint8 pixels [28, 28], class name, lossless)} for every file written.
    """
    written = {}
    for i, (pixels, label) in enumerate(zip(images, labels)):
        name = FASHION_CLASSES[int(label)]
        jpeg = jpeg_every and i % jpeg_every == jpeg_every - 1
        relpath = f"{name}/item{i:04d}.{'jpg' if jpeg else 'png'}"
        path = folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, format="JPEG" if jpeg else "PNG", quality=95)
        written[relpath] = (pixels, name, not jpeg)
    return written


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def plant_bad_files(folder: Path, sample: np.ndarray) -> dict[str, str]:
    """Plant one file of each bad kind (built from the real image ``sample``, uint8 [28, 28]).

    Returns:
        {relative path: a word the rejection reason must contain}.
    """
    png = _png_bytes(sample)
    jpeg_buffer = io.BytesIO()
    Image.fromarray(sample).save(jpeg_buffer, format="JPEG", quality=95)
    corrupt = bytearray(png)
    idat = corrupt.index(b"IDAT") + 8
    corrupt[idat : idat + 40] = bytes(255 - b for b in corrupt[idat : idat + 40])
    bomb = io.BytesIO()
    Image.new("L", (8000, 6500)).save(bomb, format="PNG")  # 52e6 pixels > the default 50e6 limit
    # A PNG whose header claims 20000 x 10000 pixels: above Pillow's own limit (2 * 89e6), so
    # Pillow raises DecompressionBombError when opening it. Built by patching IHDR + its CRC.
    giant = bytearray(png)
    giant[16:24] = struct.pack(">II", 20000, 10000)
    giant[29:33] = struct.pack(">I", zlib.crc32(bytes(giant[12:29])))
    bad = {
        "Trouser/corrupt.png": (bytes(corrupt), "corrupt"),
        "Bag/truncated.png": (png[: len(png) // 2], "truncated"),
        "Bag/truncated.jpg": (jpeg_buffer.getvalue()[: len(jpeg_buffer.getvalue()) // 2], "truncated"),
        "Coat/empty.png": (b"", "empty"),
        "Dress/not_an_image.png": (b"these are shopping notes, not pixels\n" * 20, "not a recognised image"),
        "Shirt/huge.png": (bomb.getvalue(), "too many pixels"),
        "Sandal/giant.png": (bytes(giant), "decompression bomb"),
        "notes.txt": (b"a stray text file\n", "unsupported file extension"),
    }
    for relpath, (content, _) in bad.items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_bytes(content)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: ignored, not rejected
    return {relpath: word for relpath, (_, word) in bad.items()}


def leftovers(output: Path) -> list[Path]:
    """Temporary or replaced siblings of ``output`` that a run left behind (should be none)."""
    return sorted(output.parent.glob(f"{output.name}.tmp-*")) + sorted(output.parent.glob(f"{output.name}.old-*"))


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """The documented pixel convention re-derived here: uint8 k -> float32 k / 127.5 - 1."""
    pixels = np.asarray(pixels)
    assert pixels.dtype == np.uint8, pixels.dtype
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the real entry point ``python pipelines/preprocess.py ARGV`` in this process (it reuses the
    test's Ray instance); return (exit code, stdout, stderr)."""
    from pipelines import preprocess

    capsys.readouterr()  # drop anything printed before
    code = preprocess.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file below ``root`` (to check an output was left untouched)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def png_bytes(pixels: np.ndarray) -> bytes:
    """``pixels`` (uint8 [H, W] or [H, W, 3]) encoded as PNG."""
    return _png_bytes(pixels)


def corrupt_png(png: bytes) -> bytes:
    """A PNG whose compressed pixel data (IDAT) is scrambled: the header is fine, decoding fails."""
    corrupt = bytearray(png)
    idat = corrupt.index(b"IDAT") + 8
    corrupt[idat : idat + 40] = bytes(255 - b for b in corrupt[idat : idat + 40])
    return bytes(corrupt)
