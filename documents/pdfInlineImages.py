"""Inline images in a PDF's content streams (``BI <dictionary> ID <data> EI``): their declared size, read without
decoding anything, so a page that would make MuPDF decode a pixel bomb is refused before it renders.

Image XObjects are listed by MuPDF (``Page.get_images``); inline images are not, and MuPDF's own image listing decodes
them. So every content-like stream of the document (page contents, form XObjects at any depth, patterns, Type 3
glyphs, annotation appearances) is scanned for ``BI`` dictionaries. Flate streams are inflated piecewise, so a
compressed content stream is never held whole in memory.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator

SCAN_CHUNK_BYTES = 1 << 20
"""Inflated bytes scanned at a time."""
MAX_DICTIONARY_BYTES = 2048
"""Longest inline-image dictionary recognised (real ones are under 200 bytes)."""
SKIPPED_TYPES = frozenset({"/XRef", "/ObjStm", "/Metadata", "/EmbeddedFile"})
SKIPPED_SUBTYPES = frozenset({"/Image", "/XML"})
INLINE_IMAGE = re.compile(rb"(?:^|[\s\]>})])BI\s(.{1,%d}?)\sID\s" % MAX_DICTIONARY_BYTES, re.S)
"""``BI`` as an operator (after a delimiter), its dictionary, then ``ID`` and one white-space byte."""
_SIZE_KEY = re.compile(rb"/(W|Width|H|Height)(?=[\s/\[<(])\s*\+?(\d{1,12})(?![\d.])")
_INNER_BI = re.compile(rb"\sBI\s")
"""A ``BI`` inside a match starts the real dictionary (the first was e.g. in a comment or string)."""
_FLATE_NAMES = ("/FlateDecode", "/Fl", "[/FlateDecode]", "[/Fl]")


def declaredSize(dictionary: bytes) -> tuple[int, int] | None:
    """Width and height from an inline image's dictionary (abbreviated or full key names), if it declares both."""
    sizes: dict[bytes, int] = {}
    for key, value in _SIZE_KEY.findall(dictionary):
        sizes.setdefault(key[:1], int(value))
    return (sizes[b"W"], sizes[b"H"]) if b"W" in sizes and b"H" in sizes else None


def inlineImageSizes(chunks: Iterator[bytes]) -> Iterator[tuple[int, int]]:
    """Sizes of the inline images in a content stream given piecewise (a dictionary cut by a piece boundary is seen
    whole in the overlap with the next piece)."""
    overlap = 2 * MAX_DICTIONARY_BYTES
    tail = b""
    for chunk in chunks:
        window = tail + chunk
        for match in INLINE_IMAGE.finditer(window):
            size = declaredSize(_INNER_BI.split(match.group(1))[-1])
            if size is not None:
                yield size
        tail = window[-overlap:]


def _isContentLike(doc, xref: int) -> bool:  # noqa: ANN001 - a pymupdf.Document
    if not doc.xref_is_stream(xref):
        return False
    return (doc.xref_get_key(xref, "Type")[1] not in SKIPPED_TYPES
            and doc.xref_get_key(xref, "Subtype")[1] not in SKIPPED_SUBTYPES)


def _streamChunks(doc, xref: int) -> Iterator[bytes]:  # noqa: ANN001
    """The stream's decoded bytes: Flate inflated piecewise, any other filter decoded by MuPDF."""
    if doc.xref_get_key(xref, "Filter")[1].replace(" ", "") in _FLATE_NAMES \
            and doc.xref_get_key(xref, "DecodeParms")[0] == "null":
        inflater, data = zlib.decompressobj(), doc.xref_stream_raw(xref)
        try:
            while data:
                yield inflater.decompress(data, SCAN_CHUNK_BYTES)
                data = inflater.unconsumed_tail
            return
        except zlib.error:
            pass  # damaged or not really Flate: MuPDF's tolerant decoder reads what it can
    yield doc.xref_stream(xref) or b""


def largestInlineImage(doc) -> tuple[int, int] | None:  # noqa: ANN001
    """The inline image with the most pixels in any content-like stream of the document (None if there is none).
    Objects MuPDF cannot read are skipped: rendering reports that damage."""
    largest: tuple[int, int] | None = None
    for xref in range(1, doc.xref_length()):
        try:
            if not _isContentLike(doc, xref):
                continue
            for width, height in inlineImageSizes(_streamChunks(doc, xref)):
                if largest is None or width * height > largest[0] * largest[1]:
                    largest = (width, height)
        except (RuntimeError, ValueError):
            continue
    return largest
