"""bench/benchPdf.py's report on canned results (the benchmark itself runs with `python -m bench.benchPdf`)."""

from __future__ import annotations

from bench.benchPdf import makeInvoicePdf, multipartBody, reportMarkdown

CANNED = {
    "pages": 5, "pixelBudget": 2097152, "pdfBytes": 334977, "repeats": 5, "seconds": 10,
    "pymupdf": {"pixels": [1212, 1715], "pipelineMsPerPage": 11.44, "renderOnlyMsPerPage": 4.5, "pngMsPerPage": 48.0,
                "jpegKiBPerPage": 364.4},
    "pdftoppm": {"version": "pdftoppm version 22.12.0", "jpegMsPerPage": 42.1, "pngMsPerPage": 342.0},
    "pool": {"poolMsPerPage": 13.1},
    "analyze": [{"renderWorkers": 1, "concurrency": 8, "rps": 38.84, "p50Ms": 177.4, "p99Ms": 291.9, "errors": 0},
                {"renderWorkers": 2, "error": "WrkError: wrk is not installed"}],
}


def test_reportShowsEveryMeasurement() -> None:
    text = reportMarkdown(CANNED)
    assert "1212x1715 px per page" in text
    assert "| PyMuPDF + Pillow JPEG q90 + base64 (our pipeline, in process) | 11.4 |" in text
    assert "| `pdftoppm -jpeg -jpegopt quality=90`, same pixel size (one process, writes files) | 42.1 |" in text
    assert "| 1 | 8 | 38.8 | 177.4 | 291.9 | 0 |" in text
    assert "| 2 | not measured: WrkError: wrk is not installed |" in text


def test_reportWithoutPdftoppmSaysWhy() -> None:
    text = reportMarkdown({**CANNED, "pdftoppm": {"error": "pdftoppm is not installed"}})
    assert "pdftoppm -jpeg" not in text and "Poppler: pdftoppm is not installed." in text


def test_benchUploadIsAValidMultipartPdf() -> None:
    body, contentType = multipartBody(makeInvoicePdf(1))
    boundary = contentType.split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\n".encode()) and body.endswith(f"--{boundary}--\r\n".encode())
    assert b'name="file"; filename="invoice.pdf"' in body and b"%PDF-" in body
