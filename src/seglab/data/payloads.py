"""Why an image decoder would reject a shard payload, in PIL's words.

TensorFlow's decoders fail with "Invalid PNG data" or "Invalid JPEG data", naming neither file nor
row; the tf.data reader asks PIL first, so that its error can name both (`seglab.data.pipeline`).
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image, UnidentifiedImageError

__all__ = ["jpeg_problem", "png_problem"]


def _reason(data: bytes, image_format: str, check: Callable[[bytes], None]) -> str | None:
    try:
        check(data)
    except UnidentifiedImageError:  # its message names a BytesIO object, not a reason
        return f"not a {image_format}"
    except Exception as e:  # PIL raises several types for corrupt data (OSError, SyntaxError, ...)
        return f"{type(e).__name__}: {e}"
    return None


def _check_png(data: bytes) -> None:
    # verify() checks every chunk's CRC, the image data's included (load() skips those), and
    # leaves the image unusable; load() then finds image data that does not inflate.
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        image.verify()
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        image.load()


def _check_jpeg(data: bytes) -> None:
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
        # Only decoding finds a stream cut short. At 1/8 scale libjpeg still reads every byte
        # but skips most of the pixel work, which TensorFlow's decoder does next anyway.
        image.draft(image.mode, (1, 1))
        image.load()


def png_problem(data: bytes) -> str | None:
    """Why PIL rejects `data` as a PNG (signature, chunk CRCs, image data), or None."""
    return _reason(data, "PNG", _check_png)


def jpeg_problem(data: bytes) -> str | None:
    """Why PIL rejects `data` as a JPEG (markers, a stream cut short), or None."""
    return _reason(data, "JPEG", _check_jpeg)
