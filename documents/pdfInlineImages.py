"""Inline images in a PDF's content streams (``BI <dictionary> ID <data> EI``): their declared size, read without
decoding anything, so a page that would make MuPDF decode a pixel bomb is refused before it renders.

Image XObjects are listed by MuPDF (``Page.get_images``); inline images are not, and MuPDF's own image listing decodes
them. So every content-like stream a page to be rendered can draw (its contents, its own or inherited resources with
form XObjects at any depth, patterns and Type 3 glyphs, its annotations' appearances) is scanned for ``BI``
dictionaries: the objects reachable from the page object, never through ``/Parent`` and never into another page, so
a bomb on a page that is not rendered is neither refused nor read. Flate streams are inflated piecewise, so a
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
_REFERENCE = re.compile(r"(\d+)\s+\d+\s+R(?![A-Za-z0-9_])")
_PARENT = re.compile(r"/Parent\s*\d+\s+\d+\s+R")
PAGE_TREE_TYPES = frozenset({"/Page", "/Pages", "/Catalog"})
"""Objects a page's walk never enters: other pages (a link's /Dest names them) and the tree above them."""
MAX_PARENT_DEPTH = 64


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


def _references(doc, xref: int) -> list[int]:  # noqa: ANN001
    """Objects the object's dictionary (or array) refers to, except its /Parent."""
    return [int(number) for number in _REFERENCE.findall(_PARENT.sub("", doc.xref_object(xref, compressed=True)))]


def _inheritedResources(doc, pageXref: int) -> list[int]:  # noqa: ANN001
    """The objects of the /Resources a page inherits from the page tree (none when it has its own)."""
    xref, seen = pageXref, set()
    while xref and xref not in seen and len(seen) < MAX_PARENT_DEPTH:
        seen.add(xref)
        kind, value = doc.xref_get_key(xref, "Resources")
        if kind != "null":
            return [] if xref == pageXref else [int(number) for number in _REFERENCE.findall(value)]
        kind, value = doc.xref_get_key(xref, "Parent")
        xref = int(value.split()[0]) if kind == "xref" else 0
    return []


def _enters(doc, xref: int, seen: set[int]) -> bool:  # noqa: ANN001
    return (0 < xref < doc.xref_length() and xref not in seen
            and doc.xref_get_key(xref, "Type")[1] not in PAGE_TREE_TYPES)


def _pageStreams(doc, pageIndex: int, seen: set[int]) -> list[int]:  # noqa: ANN001
    """The content-like streams reachable from one page; objects in ``seen`` (walked for an earlier page) are
    skipped, so a stream shared by several pages is scanned once."""
    pageXref = doc.page_xref(pageIndex)
    seen.add(pageXref)
    todo = [pageXref, *(ref for ref in _inheritedResources(doc, pageXref) if _enters(doc, ref, seen)
                        and not seen.add(ref))]
    streams = []
    while todo:
        xref = todo.pop()
        try:
            if _isContentLike(doc, xref):
                streams.append(xref)
            todo.extend(ref for ref in _references(doc, xref) if _enters(doc, ref, seen) and not seen.add(ref))
        except (RuntimeError, ValueError):
            continue
    return streams


def inlineImagesOfPages(doc, pages: list[int]) -> Iterator[tuple[int, int, int]]:  # noqa: ANN001
    """(0-based page, width, height) of each inline image the given pages draw, in page order. Objects MuPDF
    cannot read are skipped: rendering reports that damage."""
    seen: set[int] = set()
    for pageIndex in pages:
        try:
            streams = _pageStreams(doc, pageIndex, seen)
        except (RuntimeError, ValueError):
            continue
        for xref in streams:
            try:
                for width, height in inlineImageSizes(_streamChunks(doc, xref)):
                    yield pageIndex, width, height
            except (RuntimeError, ValueError):
                continue
