"""Images in OpenAI messages: data: URLs checked (type, pixels) and handed to Ollama as base64."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from config import Settings
from core.errors import ServiceError
from guard.requestLimits import PixelBudget, checkImagePixels, rejectRemoteImageUrl
from openaiCompat.basics import invalid

OLLAMA_IMAGE_FORMATS = frozenset({"JPEG", "PNG"})


"""Formats every Ollama version decodes for every model; others Pillow reads (WebP, GIF, ...) are re-encoded as PNG
(granite3.2-vision on v0.12 and every model from v0.30 to v0.32.13 cannot decode WebP, upstream/ollamaVersion.py)."""


IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "file"})
"""Content parts that may carry an image to decode."""
PDF_HINT = ("PDF files are not accepted on /v1/chat/completions; send them to POST /api/analyze "
            "(it renders the pages for a vision model), or send the pages as image_url parts")


@dataclass(frozen=True, slots=True)
class ImageRules:
    """What images a request may carry for its model."""

    externalName: str
    visionAllowed: bool
    settings: Settings
    perMessage: int
    budget: PixelBudget | None = field(default=None, compare=False)
    """The pixels the whole request may still spend ([limits] max_request_pixels)."""


def _openImage(raw: bytes, param: str) -> Image.Image:
    """The image with its header read (format and size known, pixels not decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise ServiceError(413, f"The image in `{param}` has too many pixels ([limits] max_image_pixels)",
                           code="image_too_large", param=param) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise invalid(f"`{param}` is not a readable image (send PNG, JPEG or WebP)", param) from None


def _asPng(image: Image.Image, param: str) -> str:
    """Formats Ollama cannot decode (GIF, BMP, TIFF, ...) re-encoded as PNG (first frame)."""
    buffer = io.BytesIO()
    try:
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, "PNG")
    except (OSError, ValueError):
        raise invalid(f"`{param}` could not be decoded as an image", param) from None
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class PendingImage:
    """An image Ollama cannot read (GIF, BMP, TIFF, ...), re-encoded as PNG only once every image of the request has
    passed the pixel checks (``encodePendingImages``), so a request over its budget costs no decoding at all."""

    __slots__ = ("image", "param")

    def __init__(self, image: Image.Image, param: str) -> None:
        self.image = image
        self.param = param

    def encode(self) -> str:
        return _asPng(self.image, self.param)


def _checkedImage(url: Any, param: str, settings: Settings, budget: PixelBudget | None) -> str | PendingImage:
    if not isinstance(url, str) or not url:
        raise invalid(f"`{param}` needs an image URL", param)
    rejectRemoteImageUrl(url, param)
    header, comma, data = url.partition(",")
    if not comma or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise invalid(f"`{param}` must be a data URL like data:image/png;base64,<data>", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"`{param}` is not valid base64", param) from None
    image = _openImage(raw, param)
    checkImagePixels(*image.size, settings, param)
    if budget is not None:
        budget.spend(image.size[0] * image.size[1], param)
    return data if image.format in OLLAMA_IMAGE_FORMATS else PendingImage(image, param)


def decodeImageDataUrl(url: Any, param: str, settings: Settings, budget: PixelBudget | None = None) -> str:
    """Raw base64 for Ollama from a ``data:image/...;base64,`` URL, checked as a real image within
    ``[limits] max_image_pixels`` and the request's pixel ``budget`` (read from the header before any pixel is
    decoded). Remote URLs are refused. Formats Ollama cannot read are re-encoded: call this off the event loop."""
    checked = _checkedImage(url, param, settings, budget)
    return checked.encode() if isinstance(checked, PendingImage) else checked


def encodePendingImages(messages: list[dict[str, Any]]) -> None:
    """Re-encode the pending images of translated messages in place (after all of them passed the checks)."""
    for message in messages:
        if "images" in message:
            message["images"] = [image.encode() if isinstance(image, PendingImage) else image
                                 for image in message["images"]]


def _imagePart(part: dict[str, Any], param: str, rules: ImageRules | None) -> str | PendingImage:
    if rules is None:
        raise invalid(f"`{param}`: images are only accepted in user messages", param)
    if not rules.visionAllowed:
        raise invalid(f"The model `{rules.externalName}` cannot read images (it has no vision capability); "
                      "choose a poweron-vision-* model from GET /v1/models", param, code="model_not_vision_capable")
    imageUrl = part.get("image_url")
    url = imageUrl.get("url") if isinstance(imageUrl, dict) else imageUrl
    return _checkedImage(url, f"{param}.image_url.url", rules.settings, rules.budget)


def _filePart(part: dict[str, Any], param: str, rules: ImageRules | None) -> str | PendingImage:
    """LiteLLM's ``{"type":"file","file":{"file_data":"data:...;base64,..."}}``: images are read, PDFs refused."""
    file = part.get("file") if isinstance(part.get("file"), dict) else {}
    data = file.get("file_data")
    if isinstance(data, str) and data.lower().startswith("data:image/"):
        return _imagePart({"image_url": data}, param, rules)
    if isinstance(data, str) and data.lower().startswith("data:application/pdf"):
        raise invalid(f"`{param}`: {PDF_HINT}", param, code="unsupported_file_type")
    raise invalid(f"`{param}`: only images (data:image/...) are accepted as files; file ids are not supported",
                  param, code="unsupported_file_type")


def carriesImages(body: dict[str, Any]) -> bool:
    """True when a chat body (messages or Responses ``input``) has a part that may carry an image: such bodies are
    translated on a worker thread, since decoding and re-encoding an image can take seconds."""
    for key in ("messages", "input"):
        items = body.get(key)
        for item in items if isinstance(items, list) else ():
            content = item.get("content") if isinstance(item, dict) else None
            if isinstance(content, list) and any(isinstance(part, dict) and isinstance(part.get("type"), str)
                                                 and part["type"] in IMAGE_PART_TYPES for part in content):
                return True
    return False


def contentParts(content: Any, param: str, rules: ImageRules | None) -> tuple[str, list[str | PendingImage]]:
    """Text (parts joined by newlines) and images of a message's ``content``: raw base64, or pending re-encoding."""
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if not isinstance(content, list):
        raise invalid(f"`{param}.content` must be a string or a list of content parts", f"{param}.content")
    texts: list[str] = []
    images: list[str | PendingImage] = []
    for index, part in enumerate(content):
        _readPart(part, f"{param}.content[{index}]", rules, texts, images)
    return "\n".join(texts), images


def _readPart(part: Any, param: str, rules: ImageRules | None, texts: list[str],
              images: list[str | PendingImage]) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("text", "input_text", "output_text"):
        if not isinstance(part.get("text"), str):
            raise invalid(f"`{param}.text` must be a string", f"{param}.text")
        texts.append(part["text"])
    elif kind in ("image_url", "input_image"):
        images.append(_imagePart(part, param, rules))
    elif kind == "file":
        images.append(_filePart(part, param, rules))
    elif kind == "input_audio":
        raise invalid(f"`{param}`: audio parts are not supported here; transcribe with POST /v1/audio/transcriptions",
                      param)
    elif kind != "refusal":
        raise invalid(f"`{param}.type` must be text or image_url", f"{param}.type")
