"""Documents the analysis tests generate on the fly: PDFs written with PyMuPDF, images with Pillow, and broken or
hostile files (truncated, encrypted, ZIP in disguise, a PNG header claiming 20000x20000 pixels)."""

from __future__ import annotations

import base64
import io
import struct
import zipfile
import zlib

import pymupdf
from PIL import Image

A4_POINTS = (595, 842)
LETTER_LANDSCAPE_POINTS = (792, 612)


def makePdf(pages: int = 3, size: tuple[float, float] = A4_POINTS, text: str = "Invoice 2024-{page} total 123.45 EUR",
            encryptWith: str | None = None) -> bytes:
    """A PDF with one line of text per page (optionally AES-256 encrypted with a user password)."""
    doc = pymupdf.open()
    for page in range(1, pages + 1):
        pdfPage = doc.new_page(width=size[0], height=size[1])
        pdfPage.insert_text((72, 72), text.format(page=page), fontsize=14)
    if encryptWith:
        return doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=encryptWith, owner_pw=encryptWith + "-o")
    return doc.tobytes()


def makeMixedPdf() -> bytes:
    """Page 1 A4 portrait, page 2 US Letter landscape."""
    doc = pymupdf.open()
    for size in (A4_POINTS, LETTER_LANDSCAPE_POINTS):
        doc.new_page(width=size[0], height=size[1]).insert_text((72, 72), "mixed", fontsize=12)
    return doc.tobytes()


def makeImage(width: int, height: int, fmt: str = "PNG", mode: str = "RGB", color: object = (200, 30, 30),
              **saveArgs: object) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format=fmt, **saveArgs)
    return buffer.getvalue()


def makeNoisePng(width: int, height: int) -> bytes:
    """A PNG that does not compress (random pixels): about width*height*3 bytes."""
    import os

    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buffer, format="PNG",
                                                                                  compress_level=0)
    return buffer.getvalue()


def makeRotatedJpeg(width: int = 200, height: int = 100) -> bytes:
    """A landscape JPEG whose EXIF orientation (6) says: rotate 90 degrees clockwise to display (a phone photo)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return makeImage(width, height, "JPEG", exif=exif.tobytes())


def _pngChunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def makePixelBombPng(width: int = 20000, height: int = 20000, padding: int = 0) -> bytes:
    """A tiny file whose PNG header claims width x height pixels (decoding would need gigabytes); ``padding``
    bytes of text chunk make the file itself big."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" + b"\x00" * (width * 3) * 1)
    text = _pngChunk(b"tEXt", b"padding\x00" + b"x" * padding) if padding else b""
    return (b"\x89PNG\r\n\x1a\n" + _pngChunk(b"IHDR", header) + text + _pngChunk(b"IDAT", rows)
            + _pngChunk(b"IEND", b""))


def makeZipNamedPdf() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("invoice.pdf", b"not really")
    return buffer.getvalue()


def makeZeroPagePdf() -> bytes:
    """A PDF cut off inside its page tree: MuPDF opens it without an error, 'repaired', with no pages."""
    data = makePdf(3)
    return data[: data.index(b"2 0 obj") + 2]


def makeHeaderOnlyPdf() -> bytes:
    """Nothing but a PDF header: MuPDF cannot open it at all."""
    return b"%PDF-1.7\n%\xc2\xb5\xc2\xb6\n"


def makeTruncatedPdf() -> bytes:
    """A PDF missing its second half."""
    data = makePdf(3)
    return data[: len(data) // 2]


def makeBigPdf(pages: int = 2000) -> bytes:
    doc = pymupdf.open()
    for _ in range(pages):
        doc.new_page(width=A4_POINTS[0], height=A4_POINTS[1])
    doc[-1].insert_text((72, 72), "last page", fontsize=12)
    return doc.tobytes()


def decodedSize(base64Jpeg: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(base64Jpeg))) as image:
        return image.size


def decodedImage(base64Jpeg: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(base64Jpeg)))
    image.load()
    return image


def makePdfWithHugeImage(width: int = 20000, height: int = 20000) -> bytes:
    """A one-page PDF whose embedded image declares width x height pixels (the data is a tiny stand-in: the
    service must refuse the page from the declared size, before MuPDF would decode it)."""
    doc = pymupdf.open()
    page = doc.new_page(width=A4_POINTS[0], height=A4_POINTS[1])
    xref = page.insert_image(pymupdf.Rect(50, 50, 300, 300), stream=makeImage(8, 8, "PNG"))
    doc.xref_set_key(xref, "Width", str(width))
    doc.xref_set_key(xref, "Height", str(height))
    return doc.tobytes()


# ------------------------------------------------------------------ hand-written PDFs (exact bytes, correct xref)


def rawPdf(objects: list[bytes], root: int = 1) -> bytes:
    """A PDF from the bodies of objects 1..n, with a correct cross-reference table (so MuPDF takes the file as it
    is written instead of repairing it)."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, root, xref)
    return bytes(out)


def pdfStream(dictionary: bytes, data: bytes) -> bytes:
    return b"<< %s /Length %d >>\nstream\n" % (dictionary, len(data)) + data + b"\nendstream"


def makeRawPagesPdf(count: bytes = b"3", kids: bytes = b"[3 0 R 4 0 R 5 0 R]",
                    mediaBox: bytes = b"[0 0 595 842]") -> bytes:
    """Three text pages (objects 3-5) under the page tree object 2, whose /Count, /Kids and media box are given as
    written: ``count=b"1000000000"``, ``kids=b"[2 0 R]"`` (a tree listing itself) or ``mediaBox=b"[0 0 1 1e7]"``."""
    content = pdfStream(b"", b"BT /F1 14 Tf 72 720 Td (Invoice 2024 total 123.45 EUR) Tj ET")
    font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    page = (b"<< /Type /Page /Parent 2 0 R /MediaBox %s /Contents 6 0 R /Resources << /Font << /F1 7 0 R >> >> >>"
            % mediaBox)
    return rawPdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids %s /Count %s >>" % (kids, count),
                   page, page, page, content, font])


def inlineImageContent(width: int, height: int, data: bytes = b"\x00" * 16) -> bytes:
    """Page content drawing one inline image (``BI <dictionary> ID <data> EI``) that declares width x height
    pixels (1 bit gray); the data is a stand-in unless given."""
    return (b"q 200 0 0 200 50 50 cm\nBI /W %d /H %d /CS /G /BPC 1 ID " % (width, height) + data + b"\nEI\nQ")


def makePdfWithInlineImage(width: int = 30000, height: int = 30000, inForm: bool = False) -> bytes:
    """One page whose content (or, with ``inForm``, a form XObject nested twice in it) holds an inline image
    declaring width x height pixels."""
    catalog, tree = b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>"
    image = inlineImageContent(width, height)
    if not inForm:
        return rawPdf([catalog, tree, b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R >>",
                       pdfStream(b"", image)])
    form = b"/Type /XObject /Subtype /Form /BBox [0 0 595 842]"
    return rawPdf([catalog, tree, b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
                                  b"/Resources << /XObject << /Fx1 5 0 R >> >> >>",
                   pdfStream(b"", b"q /Fx1 Do Q"),
                   pdfStream(form + b" /Resources << /XObject << /Fx2 6 0 R >> >>", b"q /Fx2 Do Q"),
                   pdfStream(form, image)])
