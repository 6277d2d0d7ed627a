"""Images in prompts: reading image sources and placing them in chat messages.

``load_image`` accepts what people have at hand in a notebook (a path, a URL,
a PIL image, a numpy array, raw bytes) and turns every failure into a one-line
error that says what was expected and what was given. ``format_messages``
puts images into chat messages the way mlx-vlm formats each architecture.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

__all__ = ["load_image", "image_digest", "describe_source", "parse_content", "text_of", "format_messages"]

_URL_TIMEOUT = 10.0


def describe_source(source: Any) -> str:
    """A short printable name for an image source (for error messages)."""
    if isinstance(source, (str, Path)):
        text = os.fspath(source)
        return repr(text if len(text) <= 80 else text[:77] + "...")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{len(source)} bytes"
    shape = getattr(source, "shape", None)
    if shape is not None:
        return f"{type(source).__name__} of shape {tuple(shape)}"
    return type(source).__name__


def load_image(source: Any) -> Any:
    """Read one image into an RGB ``PIL.Image`` (EXIF orientation applied).

    Args:
        source: A file path (``str`` or ``Path``), an ``http(s)://`` URL, a
            ``data:image/...;base64,`` URI, a ``PIL.Image``, a numpy / mlx array
            (``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``; uint8, or floats in
            ``[0, 1]``), or the bytes of an encoded image (PNG, JPEG, ...).

    Returns:
        A fully decoded RGB ``PIL.Image.Image``.

    Raises:
        FileNotFoundError: No file at the path.
        ConnectionError: A URL could not be fetched (e.g. offline).
        ValueError: The data is not a readable image, or an array has the wrong shape.
        TypeError: The source is of an unsupported type.
    """
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, Path)):
        image = _open_bytes(_read_location(source), source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _open_bytes(bytes(source), source)
    elif isinstance(source, io.IOBase):
        image = _open_bytes(source.read(), source)
    elif hasattr(source, "shape") and hasattr(source, "dtype"):
        image = _from_array(source)
    else:
        raise TypeError(f"image: expected a path, URL, PIL image, numpy array or bytes, got {type(source).__name__}")
    if 0 in image.size:
        raise ValueError(
            f"image: expected an image at least 1 pixel wide and high, got {image.size[0]}x{image.size[1]}"
        )
    image = ImageOps.exif_transpose(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def image_digest(image: Any) -> str:
    """A content hash of a decoded image (size, mode and pixels)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _read_location(source: str | Path) -> bytes:
    text = os.fspath(source)
    if isinstance(source, str) and text.startswith(("http://", "https://")):
        return _fetch(text)
    if isinstance(source, str) and text.startswith("data:"):
        return _data_uri(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image: no file at {text!r}")
    if not path.is_file():
        raise ValueError(f"image: expected an image file, got a directory: {text!r}")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ValueError(f"image: could not read {text!r}: {err.strerror or err}") from None


def _fetch(url: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=_URL_TIMEOUT) as response:
            return bytes(response.read())
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ConnectionError(
            f"image: could not download {url!r} ({reason}); offline? pass a local path, bytes or a PIL image"
        ) from None


def _data_uri(uri: str) -> bytes:
    import base64
    import binascii

    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError(f"image: expected a base64 data URI like 'data:image/png;base64,...', got {uri[:40]!r}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image: the data URI holds invalid base64") from None


def _open_bytes(data: bytes, source: Any) -> Any:
    from PIL import Image

    if not data:
        raise ValueError(f"image: {describe_source(source)} is empty")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now, so truncated files fail here rather than later
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise ValueError(
            f"image: could not decode {describe_source(source)} as an image (corrupt or not an image?): {first}"
        ) from None
    return image


def _from_array(array: Any) -> Any:
    import numpy as np
    from PIL import Image

    data = np.asarray(array)
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] not in (3, 4)) or 0 in data.shape:
        raise ValueError(f"image: expected an array of shape (H, W), (H, W, 3) or (H, W, 4), got {data.shape}")
    if data.dtype == np.uint8:
        pixels = data
    elif np.issubdtype(data.dtype, np.floating) or data.dtype == np.bool_:
        values = data.astype(np.float32)
        if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
            raise ValueError(
                f"image: expected float pixels in [0, 1], got values in [{values.min():.3g}, {values.max():.3g}]"
            )
        pixels = (values * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(data.dtype, np.integer):
        if data.min() < 0 or data.max() > 255:
            raise ValueError(f"image: expected integer pixels in [0, 255], got values in [{data.min()}, {data.max()}]")
        pixels = data.astype(np.uint8)
    else:
        raise ValueError(f"image: expected a uint8 or float array, got dtype {data.dtype}")
    mode = "L" if pixels.ndim == 2 else ("RGB" if pixels.shape[-1] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(pixels), mode)


def parse_content(message: Any) -> tuple[Any, list[Any]]:
    """Message content in mlx-vlm's part form, and its image sources (``None`` = from ``images=``)."""
    content = message.get("content", "")
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"messages: expected content as text or a list of parts, got {type(content).__name__}")
    parts, sources = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image", "image_url", "input_image"):
            src = part.get("image", part.get("image_url", part.get("url", part.get("path"))))
            sources.append(src.get("url") if isinstance(src, dict) else src)
            parts.append({"type": "image"})
        elif kind in ("text", "input_text"):
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        else:
            raise ValueError(f"messages: expected content parts of type 'text' or 'image', got {part!r:.60}")
    return (parts if sources else text_of(parts)), sources


def text_of(parts: list[dict[str, Any]]) -> str:
    return " ".join(p["text"] for p in parts if p.get("type") == "text" and p.get("text"))


def format_messages(model_type: str, messages: list[dict[str, Any]], extra: list[Any]) -> tuple[list[Any], list[Any]]:
    """Chat messages in mlx-vlm's per-model format, and the image sources in placeholder order.

    Image parts in the messages stay where they are (a part without an image
    takes the next of ``extra``); otherwise ``extra`` images go into the first
    user message, so a conversation's earlier turns render the same every turn.

    Args:
        model_type: The mlx-vlm architecture (decides where image markers go).
        messages: ``{"role", "content"}`` dicts; content is text or a list of parts.
        extra: Image sources given with ``images=``.

    Returns:
        The formatted messages (for the chat template) and the image sources.

    Raises:
        ValueError: Image parts without an image and not as many ``extra`` images to fill them.
    """
    from mlx_vlm.prompt_utils import MODEL_CONFIG, get_message_json

    parsed = [parse_content(m) for m in messages]
    n_parts = sum(len(srcs) for _, srcs in parsed)
    if n_parts:
        blanks = [i for _, srcs in parsed for i, s in enumerate(srcs) if s is None]
        if extra and not blanks:
            raise ValueError("images: pass images either inside the chat messages or with images=, not both")
        if len(blanks) != len(extra):
            raise ValueError(
                f"images: the messages have {len(blanks)} image part(s) without an image, expected as many images=, got {len(extra)}"
            )
        fill = iter(extra)
        parsed = [(c, [next(fill) if s is None else s for s in srcs]) for c, srcs in parsed]
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
    if extra and not n_parts:
        if first_user is None:
            raise ValueError("images: expected a user message to attach the images to, got none")
        content, _ = parsed[first_user]
        parsed[first_user] = (content, list(extra))
    if any(srcs for _, srcs in parsed) and model_type not in MODEL_CONFIG:
        raise ValueError(f"images: mlx-vlm has no prompt format for {model_type!r}")
    formatted: list[Any] = []
    sources: list[Any] = []
    for message, (content, srcs) in zip(messages, parsed):
        role = message.get("role", "user")
        if srcs and role != "user":
            raise ValueError(f"images: only user messages can hold images, got one in a {role!r} message")
        sources += srcs
        if model_type not in MODEL_CONFIG:
            formatted.append({**message, "content": content if isinstance(content, str) else text_of(content)})
            continue
        formatted.append(
            get_message_json(
                model_type, content, role, skip_image_token=not srcs, num_images=0 if n_parts else len(srcs)
            )
        )
    return formatted, sources
