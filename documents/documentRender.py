"""Uploaded documents to model-ready images: file type by magic bytes, page ranges, PDF pages rendered with PyMuPDF
at a resolution derived from the model's pixel budget, and images checked, oriented and scaled with Pillow.

Everything here works on bytes in memory (nothing is written to disk). ``renderDocument`` is the entry point the
render workers run (PyMuPDF is not thread-safe, see renderWorkers.py) through ``renderInWorker``: the one place that
turns every failure (opening, counting, checking, rendering, encoding) into a 4xx, returned as plain data
(``RenderFailure``), so nothing MuPDF raises has to cross the process boundary.
"""

from __future__ import annotations

import base64
import io
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from core.errors import ServiceError
from documents.pdfInlineImages import inlineImagesOfPages

PDF_MAGIC = b"%PDF-"
PDF_MAGIC_WINDOW = 1024
"""The PDF header may follow a little junk; readers (and MuPDF) look within the first kilobyte."""
MAX_RENDER_DPI = 300
"""Small pages (receipts, business cards) are not blown up beyond this, whatever the budget."""
MAX_IMAGE_SIDE = 65_500
"""JPEG's largest side: a very long, thin page is rendered narrower rather than not at all."""
JPEG_QUALITY = 90
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "tiff": "TIFF", "bmp": "BMP"}
"""File types accepted as images, with Pillow's format name (the only decoder tried for that file)."""
SUPPORTED_TYPES_TEXT = "PDF, PNG, JPEG, WebP, GIF, TIFF or BMP"
PAGE_ERROR_CODES = ("invalid_pages", "too_many_pages")
_RANGE_PART = re.compile(r"^(\d+)(?:\s*-\s*(\d*))?$")


class DocumentError(ServiceError):
    """A problem with an uploaded document that the caller must fix; pickles across the process boundary."""

    def __init__(self, status: int, message: str, code: str) -> None:
        param = "pages" if code in PAGE_ERROR_CODES else "file"
        super().__init__(status, message, code=code, param=param)

    def __reduce__(self) -> tuple[Any, ...]:
        return (DocumentError, (self.status, self.message, self.code))


@dataclass(frozen=True, slots=True)
class RenderFailure:
    """A render's 4xx as plain data: what the worker returns instead of raising (see ``renderInWorker``)."""

    status: int
    message: str
    code: str

    def asError(self) -> DocumentError:
        return DocumentError(self.status, self.message, self.code)


@dataclass(slots=True)
class PageImage:
    """One image ready for the model: JPEG as base64 (Ollama's ``images`` format) and its pixel size."""

    page: int
    width: int
    height: int
    base64Jpeg: str


@dataclass(slots=True)
class RenderedDocument:
    """What a render produced: the file type, the document's page count, and one image per analysed page."""

    fileType: str
    pageCount: int
    images: list[PageImage] = field(default_factory=list)
    truncated: bool = False
    renderSeconds: float = 0.0

    @property
    def pages(self) -> list[int]:
        return [image.page for image in self.images]


@dataclass(frozen=True, slots=True)
class RenderJob:
    """Everything a worker needs to render one upload (all plain data, so it pickles cheaply)."""

    data: bytes
    pageRanges: tuple[tuple[int, int | None], ...]
    maxPages: int
    pixelBudget: int
    maxImagePixels: int
    password: str | None = None


def _describeUnsupported(data: bytes) -> str:
    """Name well-known types we do not take, so the message says what the file really is."""
    head = data[:64]
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "a ZIP archive (or an Office/OpenDocument file)"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftyphevc", b"ftypavif"):
        return "a HEIC/AVIF photo (export it as JPEG)"
    if head.lstrip().lower().startswith((b"<svg", b"<?xml")):
        return "an SVG/XML file"
    if head.startswith((b"\xd0\xcf\x11\xe0", b"{\\rtf")):
        return "a legacy Office/RTF document"
    return "not a recognised document"


def detectFileType(data: bytes) -> str:
    """``pdf`` or an image type from the content's magic bytes (never from the name or declared type)."""
    if not data:
        raise DocumentError(400, "The uploaded file is empty (0 bytes)", "empty_file")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM" and len(data) > 26:
        return "bmp"
    if PDF_MAGIC in data[:PDF_MAGIC_WINDOW]:
        return "pdf"
    raise DocumentError(415, f"Unsupported file type: the content is {_describeUnsupported(data)}; "
                        f"send a {SUPPORTED_TYPES_TEXT} file", "unsupported_file_type")


def parsePageRanges(spec: str | None) -> tuple[tuple[int, int | None], ...]:
    """Parse ``1-3,5,8-`` into 1-based inclusive ranges (``None`` = to the end); empty = the default selection."""
    if spec is None or not spec.strip():
        return ()
    ranges = []
    for part in (p.strip() for p in spec.split(",")):
        match = _RANGE_PART.match(part)
        if not match:
            raise DocumentError(400, f"pages: '{part[:20]}' is not a page or range; use e.g. 1-3,5 or 8-",
                                "invalid_pages")
        start = int(match.group(1))
        end = start if match.group(2) is None else (int(match.group(2)) if match.group(2) else None)
        if start < 1 or (end is not None and end < start):
            raise DocumentError(400, f"pages: '{part}' is not a valid range (pages count from 1, start <= end)",
                                "invalid_pages")
        ranges.append((start, end))
    return tuple(ranges)


def _tooManyPages(maxPages: int) -> DocumentError:
    return DocumentError(400, f"pages: the selection has more than {maxPages} pages; at most {maxPages} pages are "
                         "analysed per request ([documents] max_pdf_pages)", "too_many_pages")


def _missingPage(page: int, pageCount: int) -> DocumentError:
    return DocumentError(400, f"pages: page {page} does not exist; the document has {pageCount} "
                         f"page{'s' if pageCount != 1 else ''}", "invalid_pages")


def selectPages(ranges: tuple[tuple[int, int | None], ...], pageCount: int, maxPages: int) -> tuple[list[int], bool]:
    """0-based page numbers to render, and whether the default selection left pages out."""
    if not ranges:
        return list(range(min(pageCount, maxPages))), pageCount > maxPages
    pages: set[int] = set()
    for start, end in ranges:
        last = pageCount if end is None else end
        if max(start, last) > pageCount:
            raise _missingPage(max(start, last), pageCount)
        if last - start + 1 > maxPages:
            raise _tooManyPages(maxPages)
        pages.update(range(start - 1, last))
        if len(pages) > maxPages:
            raise _tooManyPages(maxPages)
    return sorted(pages), False


def zoomForBudget(width: float, height: float, pixelBudget: int) -> float:
    """Largest zoom (1.0 = 72 dpi) whose rendered size stays within the pixel budget, MAX_RENDER_DPI and
    MAX_IMAGE_SIDE."""
    zoom = min(math.sqrt(pixelBudget / max(width * height, 1.0)), MAX_RENDER_DPI / 72,
               MAX_IMAGE_SIDE / max(width, height, 1.0))
    while math.ceil(width * zoom) * math.ceil(height * zoom) > pixelBudget:
        zoom *= 0.995
    return zoom


def sizeForBudget(width: int, height: int, pixelBudget: int) -> tuple[int, int]:
    """The image size scaled down (never up) to fit the pixel budget, keeping the aspect ratio."""
    if width * height <= pixelBudget:
        return width, height
    scale = math.sqrt(pixelBudget / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def encodeJpeg(image) -> str:  # noqa: ANN001 - a PIL image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _openPdf(data: bytes, password: str | None):  # noqa: ANN202 - a pymupdf.Document
    import pymupdf

    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except Exception:  # noqa: BLE001 - MuPDF raises many kinds (FzErrorFormat, RuntimeError, ValueError, ...)
        raise DocumentError(422, "The PDF is damaged and cannot be opened", "damaged_pdf") from None
    if not doc.is_pdf:
        raise DocumentError(415, f"The file starts like a PDF but is not one; send a {SUPPORTED_TYPES_TEXT} file",
                            "unsupported_file_type")
    if doc.needs_pass and not (password and doc.authenticate(password)):
        message = ("The PDF is password-protected; send its password in the `password` field" if not password
                   else "The PDF is password-protected and the given password is wrong")
        raise DocumentError(422, message, "pdf_password_required" if not password else "pdf_password_wrong")
    if _pageCount(doc) == 0:
        raise DocumentError(422, "The PDF is damaged: no readable pages (truncated or corrupt file)", "damaged_pdf")
    return doc


def _pageCount(doc) -> int:  # noqa: ANN001 - a pymupdf.Document
    """The page count, or 422 for a page tree MuPDF cannot count (a /Count of a billion or -5, a cycle)."""
    try:
        return doc.page_count
    except Exception:  # noqa: BLE001
        raise DocumentError(422, "The PDF is damaged: its page tree cannot be read (wrong page count, a page tree "
                            "that contains itself, or a truncated file)", "damaged_pdf") from None


def _checkPageSize(width: float, height: float, pageNumber: int) -> None:
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        raise DocumentError(422, f"The PDF is damaged: page {pageNumber} has no usable size (media box "
                            f"{width:g} x {height:g} points)", "damaged_pdf")


def _renderPage(doc, pageIndex: int, pixelBudget: int) -> PageImage:  # noqa: ANN001
    import pymupdf
    from PIL import Image

    page = doc[pageIndex]
    _checkPageSize(page.rect.width, page.rect.height, pageIndex + 1)
    zoom = zoomForBudget(page.rect.width, page.rect.height, pixelBudget)
    pixmap = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False, colorspace=pymupdf.csRGB)
    image = Image.frombuffer("RGB", (pixmap.width, pixmap.height), pixmap.samples_mv, "raw", "RGB",
                             pixmap.stride, 1)
    return PageImage(pageIndex + 1, pixmap.width, pixmap.height, encodeJpeg(image))


def _checkEmbeddedImages(doc, pageIndex: int, maxImagePixels: int) -> None:  # noqa: ANN001
    """Refuse a page whose embedded images are pixel bombs (sizes from the PDF's image dictionaries, nothing
    decoded): rendering would decode them in full."""
    try:
        images = doc[pageIndex].get_images(full=True)
    except Exception:  # noqa: BLE001 - rendering reports the damage
        return
    for image in images:
        width, height = int(image[2] or 0), int(image[3] or 0)
        if width * height > maxImagePixels:
            raise DocumentError(413, f"Page {pageIndex + 1} of the PDF embeds an image of {width}x{height} pixels "
                                f"({width * height / 1e6:.0f} MP); at most {maxImagePixels / 1e6:.0f} MP per image "
                                "are accepted ([limits] max_image_pixels)", "image_too_large")


def _checkInlineImages(doc, pages: list[int], maxImagePixels: int) -> None:  # noqa: ANN001
    """Refuse a PDF whose pages to render draw an inline image (BI ... ID ... EI) beyond the limit: MuPDF would decode
    it in full, and MuPDF's image listing (``get_images``) does not see inline images. Pages not rendered are not
    scanned."""
    for pageIndex, width, height in inlineImagesOfPages(doc, pages):
        if width * height > maxImagePixels:
            raise DocumentError(413, f"The PDF holds an inline image of {width}x{height} pixels "
                                f"({width * height / 1e6:.0f} MP) in the content of page {pageIndex + 1}; at most "
                                f"{maxImagePixels / 1e6:.0f} MP per image are accepted ([limits] max_image_pixels)",
                                "image_too_large")


def renderPdf(job: RenderJob) -> RenderedDocument:
    """Render the selected pages of a PDF; the document's page count comes back too."""
    doc = _openPdf(job.data, job.password)
    try:
        pageCount = _pageCount(doc)
        pages, truncated = selectPages(job.pageRanges, pageCount, job.maxPages)
        _checkInlineImages(doc, pages, job.maxImagePixels)
        result = RenderedDocument("pdf", pageCount, truncated=truncated)
        for pageIndex in pages:
            _checkEmbeddedImages(doc, pageIndex, job.maxImagePixels)
            try:
                result.images.append(_renderPage(doc, pageIndex, job.pixelBudget))
            except DocumentError:
                raise
            except Exception:  # noqa: BLE001 - MuPDF's and Pillow's errors: the page, not the service, is broken
                raise DocumentError(422, f"The PDF is damaged: page {pageIndex + 1} cannot be rendered",
                                    "damaged_pdf") from None
        return result
    finally:
        doc.close()


def _flattenToRgb(image):  # noqa: ANN001, ANN202 - PIL images
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _checkImageSize(width: int, height: int, maxImagePixels: int) -> None:
    if width * height > maxImagePixels:
        raise DocumentError(413, f"The image is {width}x{height} pixels ({width * height / 1e6:.0f} MP); at most "
                            f"{maxImagePixels / 1e6:.0f} MP are accepted ([limits] max_image_pixels)",
                            "image_too_large")


def renderImage(job: RenderJob, fileType: str) -> RenderedDocument:
    """Check an image's size before decoding its pixels, then orient, flatten and scale it to the budget."""
    from PIL import Image, ImageOps

    selectPages(job.pageRanges, 1, job.maxPages)
    try:
        with Image.open(io.BytesIO(job.data), formats=[IMAGE_FORMATS[fileType]]) as image:
            _checkImageSize(image.width, image.height, job.maxImagePixels)
            target = sizeForBudget(image.width, image.height, job.pixelBudget)
            if fileType == "jpeg":
                image.draft("RGB", target)
            image.load()
            oriented = _flattenToRgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError:
        raise DocumentError(413, f"The image has more pixels than accepted ({job.maxImagePixels / 1e6:.0f} MP, "
                            "[limits] max_image_pixels)", "image_too_large") from None
    except (OSError, SyntaxError, ValueError):
        raise DocumentError(422, f"The {fileType.upper()} image is damaged or truncated and cannot be decoded",
                            "damaged_image") from None
    width, height = sizeForBudget(oriented.width, oriented.height, job.pixelBudget)
    if (width, height) != oriented.size:
        oriented = oriented.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return RenderedDocument(fileType, 1, [PageImage(1, width, height, encodeJpeg(oriented))])


def renderDocument(job: RenderJob) -> RenderedDocument:
    """Detect the type, then render the PDF pages or prepare the image; any failure is a DocumentError (4xx)."""
    startedAt = time.perf_counter()
    fileType = detectFileType(job.data)
    try:
        result = renderPdf(job) if fileType == "pdf" else renderImage(job, fileType)
    except DocumentError:
        raise
    except MemoryError:
        raise DocumentError(413, "The document needs more memory to render than a render worker has; it is too "
                            "large or too complex (try fewer pages)", "document_too_complex") from None
    except Exception:  # noqa: BLE001 - whatever MuPDF or Pillow raise on a damaged file
        what = "PDF is damaged" if fileType == "pdf" else f"{fileType.upper()} image is damaged"
        code = "damaged_pdf" if fileType == "pdf" else "damaged_image"
        raise DocumentError(422, f"The {what} and cannot be rendered", code) from None
    result.renderSeconds = time.perf_counter() - startedAt
    return result


def renderInWorker(job: RenderJob) -> RenderedDocument | RenderFailure:
    """Worker entry point: the rendered document, or its 4xx as plain data (MuPDF's exceptions may hold objects that
    cannot be pickled back to the service)."""
    try:
        return renderDocument(job)
    except DocumentError as error:
        return RenderFailure(error.status, error.message, error.code or "damaged_document")


def workerReady() -> bool:
    """A no-op job: submitting it starts a worker process."""
    return True


def initWorker() -> None:
    """Run once in each render worker: import the libraries, silence MuPDF's console messages, and replace
    Pillow's decompression-bomb warning by our own limit (checked from the header in renderImage)."""
    import pymupdf
    from PIL import Image

    pymupdf.TOOLS.mupdf_display_errors(False)
    pymupdf.TOOLS.mupdf_display_warnings(False)
    Image.MAX_IMAGE_PIXELS = None
