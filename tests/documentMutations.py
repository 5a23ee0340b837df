"""Seed documents and mutators for the document fuzz test (tests/test_documentFuzz.py): valid PDFs from several
producers (PyMuPDF with text, drawings, images, annotations, object streams and encryption; hand-written; Pillow;
pdftocairo when installed) and images in every accepted format, mutated by truncation, byte flips, zeroed windows,
broken cross-references, page trees, counts, lengths and media boxes. Everything is driven by one random.Random,
so a seed and a case number give the same bytes again."""

from __future__ import annotations

import io
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pymupdf
from PIL import Image

from tests.documentSamples import makePdf, makePdfWithInlineImage, makeRawPagesPdf

EXTREME_NUMBERS = (b"0", b"-1", b"-5", b"1", b"7", b"65535", b"2147483647", b"2147483648", b"1000000000",
                   b"99999999999999999999", b"1e308", b"-0", b"3.5", b"nan")
EXTREME_BOXES = (b"[0 0 0 0]", b"[0 0 1 14400000]", b"[0 0 1e38 1e38]", b"[0 0 -595 -842]", b"[0 0]", b"[]",
                 b"[0 0 1e-30 842]", b"[(a) /b 1 2]", b"7 0 R", b"[0 0 595 842 9 9]", b"[nan 0 inf 842]")
COUNTED_KEYS = rb"/(Count|Length|W|H|Width|Height|Size|N|First|BitsPerComponent|Columns|Rows|Predictor|Colors|Rotate)"


def _pymupdfRich() -> bytes:
    """Text, vector drawings, an image XObject, a link and annotations, uncompressed (so the structure mutators find
    the dictionaries)."""
    doc = pymupdf.open()
    for number in range(2):
        page = doc.new_page(width=420, height=595)
        page.insert_text((40, 60), f"Page {number + 1}: Rechnung 2024, Summe 99,90 EUR", fontsize=11)
        page.draw_rect(pymupdf.Rect(40, 80, 200, 160), color=(0, 0, 1), fill=(1, 1, 0))
        page.draw_circle((300, 300), 40, color=(1, 0, 0))
        buffer = io.BytesIO()
        Image.new("RGB", (24, 16), (10, 200, 90)).save(buffer, format="PNG")
        page.insert_image(pymupdf.Rect(40, 200, 160, 280), stream=buffer.getvalue())
        page.add_text_annot((300, 80), "a note")
        page.add_freetext_annot(pymupdf.Rect(200, 400, 380, 440), "free text", fontsize=9)
        page.insert_link({"kind": pymupdf.LINK_URI, "from": pymupdf.Rect(40, 500, 200, 520), "uri": "about:blank"})
    return doc.tobytes(no_new_id=True)


def _pymupdfObjectStreams() -> bytes:
    return pymupdf.open(stream=makePdf(3)).tobytes(use_objstms=1, garbage=3, deflate=True, no_new_id=True)


def _pymupdfEncrypted() -> bytes:
    return makePdf(2, encryptWith="fuzz")


def _pillowPdf() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (90, 60), (120, 40, 200)).save(buffer, format="PDF", resolution=72)
    return buffer.getvalue()


def _cairoPdf() -> bytes | None:
    """The text PDF rewritten by poppler's pdftocairo (another producer: cairo's object layout), if installed."""
    if shutil.which("pdftocairo") is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        source, target = Path(directory) / "in.pdf", Path(directory) / "out.pdf"
        source.write_bytes(makePdf(2))
        done = subprocess.run(["pdftocairo", "-pdf", str(source), str(target)], capture_output=True, timeout=60)
        return target.read_bytes() if done.returncode == 0 else None


def _image(fmt: str, mode: str = "RGB", **saveArgs: object) -> bytes:
    image = Image.linear_gradient("L").resize((96, 64)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **saveArgs)
    return buffer.getvalue()


def seedDocuments() -> dict[str, bytes]:
    """The valid documents every mutation starts from."""
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = {
        "pymupdf-text": makePdf(3), "pymupdf-rich": _pymupdfRich(), "pymupdf-objstm": _pymupdfObjectStreams(),
        "pymupdf-encrypted": _pymupdfEncrypted(), "handwritten": makeRawPagesPdf(),
        "handwritten-inline-image": makePdfWithInlineImage(64, 64), "pillow-pdf": _pillowPdf(),
        "png": _image("PNG"), "png-palette": _image("PNG", "P", transparency=0), "jpeg": _image("JPEG", exif=exif),
        "jpeg-progressive": _image("JPEG", progressive=True), "gif": _image("GIF", "P"), "webp": _image("WEBP"),
        "tiff-deflate": _image("TIFF", compression="tiff_adobe_deflate"), "bmp": _image("BMP"),
    }
    cairo = _cairoPdf()
    if cairo is not None:
        seeds["pdftocairo"] = cairo
    return seeds


# ------------------------------------------------------------------ mutators: (rng, data) -> data


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[:rng.randrange(1, len(data))]


def flipBytes(rng: random.Random, data: bytes) -> bytes:
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        mutated[rng.randrange(len(mutated))] ^= rng.randrange(1, 256)
    return bytes(mutated)


def zeroWindow(rng: random.Random, data: bytes) -> bytes:
    start, length = rng.randrange(len(data)), rng.choice((1, 4, 16, 64, 512))
    return data[:start] + bytes(len(data[start:start + length])) + data[start + length:]


def duplicateWindow(rng: random.Random, data: bytes) -> bytes:
    start = rng.randrange(len(data))
    return data[:start] + data[start:start + rng.randint(1, 2048)] * rng.randint(2, 4) + data[start:]


def _replaceOne(rng: random.Random, data: bytes, pattern: bytes, replacement: Callable[[re.Match], bytes]) -> bytes:
    """Replace one randomly chosen match of pattern (or flip bytes when the document has none)."""
    matches = list(re.finditer(pattern, data))
    if not matches:
        return flipBytes(rng, data)
    match = rng.choice(matches)
    return data[:match.start()] + replacement(match) + data[match.end():]


def breakXref(rng: random.Random, data: bytes) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:  # startxref points elsewhere
        return _replaceOne(rng, data, rb"startxref\s+\d+", lambda _: b"startxref\n" + rng.choice(EXTREME_NUMBERS))
    if choice == 1:  # an offset in the table is wrong
        return _replaceOne(rng, data, rb"\d{10} \d{5} n", lambda _: b"%010d 00000 n" % rng.randrange(10**10))
    if choice == 2:  # the subsection header claims another range
        return _replaceOne(rng, data, rb"xref\s+\d+ \d+", lambda _: b"xref\n%s %s" % (
            rng.choice(EXTREME_NUMBERS), rng.choice(EXTREME_NUMBERS)))
    return _replaceOne(rng, data, rb"trailer|/Root \d+ \d+ R|/Prev \d+|/Type\s*/XRef",
                       lambda _: rng.choice((b"trailor", b"/Root 2 0 R", b"/Root 99 0 R", b"/Prev 3")))


def breakPageTree(rng: random.Random, data: bytes) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        return _replaceOne(rng, data, rb"/Kids\s*\[[^\]]*\]", lambda _: rng.choice((
            b"/Kids [2 0 R]", b"/Kids [3 0 R 2 0 R]", b"/Kids []", b"/Kids [0 0 R]", b"/Kids 3 0 R",
            b"/Kids [1 0 R 1 0 R]", b"/Kids [[3 0 R]]")))
    if choice == 1:
        return _replaceOne(rng, data, rb"/Type\s*/Pages?\b", lambda _: rng.choice((
            b"/Type /Page", b"/Type /Pages", b"/Type /Catalog", b"/Type /Font")))
    if choice == 2:
        return _replaceOne(rng, data, rb"/Parent \d+ \d+ R", lambda _: b"/Parent %d 0 R" % rng.randrange(0, 12))
    return _replaceOne(rng, data, rb"/Count\s+-?\d+", lambda _: b"/Count " + rng.choice(EXTREME_NUMBERS))


def breakCounts(rng: random.Random, data: bytes) -> bytes:
    """A count, length or size (page counts, stream lengths, image sizes, predictors) set to an extreme."""
    return _replaceOne(rng, data, COUNTED_KEYS + rb"\s+-?\d+(\.\d+)?",
                       lambda match: b"/" + match.group(1) + b" " + rng.choice(EXTREME_NUMBERS))


def breakMediaBox(rng: random.Random, data: bytes) -> bytes:
    return _replaceOne(rng, data, rb"/(MediaBox|CropBox)\s*\[[^\]]*\]",
                       lambda match: b"/" + match.group(1) + b" " + rng.choice(EXTREME_BOXES))


BYTE_MUTATORS = (truncate, flipBytes, zeroWindow, duplicateWindow)
PDF_MUTATORS = (breakXref, breakPageTree, breakCounts, breakMediaBox)


def mutate(rng: random.Random, data: bytes) -> tuple[bytes, list[str]]:
    """One to three mutations in a row (PDFs get the structure mutators half the time); their names for the report."""
    isPdf = data.startswith(b"%PDF")
    names = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        pool = PDF_MUTATORS if isPdf and rng.random() < 0.5 else BYTE_MUTATORS
        mutator = rng.choice(pool)
        data = mutator(rng, data) or b"%PDF"
        names.append(mutator.__name__)
    return data, names
