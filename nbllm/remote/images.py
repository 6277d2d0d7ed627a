"""Images for a server: ``image_url`` content parts (local files, bytes and PIL images as data URIs)."""

from __future__ import annotations

import base64
import io
import mimetypes
import os
from pathlib import Path
from typing import Any

__all__ = ["image_part"]


def image_part(image: Any) -> dict[str, Any]:
    """An ``image_url`` content part: URLs as they are, local files, bytes and PIL images as data URIs."""
    if isinstance(image, str) and image.startswith(("http://", "https://", "data:")):
        return {"type": "image_url", "image_url": {"url": image}}
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"images: no such file {str(path)!r}")
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        return _data_part(path.read_bytes(), mime)
    if isinstance(image, (bytes, bytearray)):
        return _data_part(bytes(image), "image/png")
    if hasattr(image, "save"):  # a PIL image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return _data_part(buffer.getvalue(), "image/png")
    if hasattr(image, "shape"):  # an array
        import numpy as np
        from PIL import Image

        return image_part(Image.fromarray(np.asarray(image)))
    raise TypeError(f"images: expected a path, URL, bytes, PIL image or array, got {type(image).__name__}")


def _data_part(data: bytes, mime: str) -> dict[str, Any]:
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}
