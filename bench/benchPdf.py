"""PDF benchmark: milliseconds per page for a 5-page A4 PDF rendered at the default pixel budget (our PyMuPDF +
Pillow pipeline, in-process and through the render worker pool) versus poppler's ``pdftoppm`` on the same file at
the same pixel size, and requests/s of ``POST /api/analyze`` with a 1-page PDF against an instant Ollama stub.

Run:  python -m bench.benchPdf   (prints markdown tables; ``main()`` returns the results as a dict, with the tables
under "markdown", for ``make bench``)
Options (environment): BENCH_PDF_REPEATS (5), BENCH_PDF_SECONDS (10), BENCH_PDF_CONCURRENCY (8),
BENCH_PDF_WORKERS (1,2: render_workers values to measure), BENCH_PDF_SERVICE_CORE (0), BENCH_PDF_LOAD_CORE (1).
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx
import pymupdf
from PIL import Image

from bench.procs import BenchProcess, freePort
from bench.wrkRunner import WRK_TIMEOUT_SECONDS, WrkError, parseWrkOutput
from config import DocumentSettings
from documents import documentRender
from documents.documentRender import RenderJob, renderDocument, zoomForBudget
from documents.renderWorkers import RenderPool

REPO_ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "post.lua"
A4 = (595, 842)
PAGES = 5
BUDGET = DocumentSettings().default_pixel_budget
STUB_MODEL = "qwen2.5vl:7b"
START_TIMEOUT_SECONDS = 30
PROMPT = "What is the invoice total?"


def _option(name: str, default: str) -> str:
    return os.environ.get(name, default)


def makePhoto(width: int = 900, height: int = 600) -> bytes:
    """A photo-like JPEG (gradient plus noise), so pages carry an image as real invoices with logos/photos do."""
    gradient = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 40)
    photo = Image.merge("RGB", (gradient, noise, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def makeInvoicePdf(pages: int = PAGES) -> bytes:
    """A4 pages with a heading, 45 lines of text, a ruled table and an embedded photo."""
    doc = pymupdf.open()
    photo = makePhoto()
    for number in range(1, pages + 1):
        page = doc.new_page(width=A4[0], height=A4[1])
        page.insert_text((56, 60), f"PowerOn AG - Invoice 2024-{number:04d}", fontsize=18)
        for line in range(45):
            page.insert_text((56, 100 + line * 11), f"Item {line + 1:02d}  Service hours and material, "
                             f"reference {number}-{line:03d}   CHF {123.45 * (line + 1):10.2f}", fontsize=8)
        for row in range(8):
            page.draw_line((56, 610 + row * 14), (540, 610 + row * 14), width=0.5)
        page.insert_image(pymupdf.Rect(330, 620, 540, 760), stream=photo)
    return doc.tobytes()


def bestSeconds(function: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` runs (after one warm-up run)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        startedAt = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - startedAt)
    return best


def _renderOnly(data: bytes, budget: int) -> None:
    doc = pymupdf.open(stream=data, filetype="pdf")
    for page in doc:
        zoom = zoomForBudget(page.rect.width, page.rect.height, budget)
        page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)


def _renderPng(data: bytes, budget: int) -> None:
    doc = pymupdf.open(stream=data, filetype="pdf")
    for page in doc:
        zoom = zoomForBudget(page.rect.width, page.rect.height, budget)
        page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False).tobytes("png")


def benchPyMuPdf(data: bytes, repeats: int) -> dict[str, Any]:
    """ms per page: our pipeline (render + Pillow JPEG q90 + base64), rendering alone, and PyMuPDF's PNG."""
    documentRender.initWorker()
    job = RenderJob(data, (), PAGES, BUDGET, 50_000_000)
    sample = renderDocument(job)
    return {
        "pixels": [sample.images[0].width, sample.images[0].height],
        "pipelineMsPerPage": bestSeconds(lambda: renderDocument(job), repeats) * 1000 / PAGES,
        "renderOnlyMsPerPage": bestSeconds(lambda: _renderOnly(data, BUDGET), repeats) * 1000 / PAGES,
        "pngMsPerPage": bestSeconds(lambda: _renderPng(data, BUDGET), repeats) * 1000 / PAGES,
        "jpegKiBPerPage": round(sum(len(i.base64Jpeg) * 3 / 4 for i in sample.images) / PAGES / 1024, 1),
    }


def _pdftoppm(pdfPath: Path, outDir: Path, fmt: str, width: int, height: int) -> None:
    formatArgs = ["-jpeg", "-jpegopt", "quality=90"] if fmt == "jpeg" else ["-png"]
    subprocess.run(["pdftoppm", *formatArgs, "-scale-to-x", str(width), "-scale-to-y", str(height),
                    str(pdfPath), str(outDir / f"page-{uuid.uuid4().hex[:6]}")], check=True, capture_output=True)


def benchPdftoppm(data: bytes, width: int, height: int, repeats: int) -> dict[str, Any]:
    """ms per page of pdftoppm (one process for the 5 pages, files in a temporary directory) at the same size."""
    if shutil.which("pdftoppm") is None:
        return {"error": "pdftoppm is not installed (Debian: poppler-utils)"}
    with tempfile.TemporaryDirectory(prefix="benchPdf-") as folder:
        pdfPath, outDir = Path(folder) / "invoice.pdf", Path(folder)
        pdfPath.write_bytes(data)
        version = subprocess.run(["pdftoppm", "-v"], capture_output=True, text=True).stderr.split("\n")[0]
        return {"version": version.strip(),
                "jpegMsPerPage": bestSeconds(lambda: _pdftoppm(pdfPath, outDir, "jpeg", width, height),
                                             repeats) * 1000 / PAGES,
                "pngMsPerPage": bestSeconds(lambda: _pdftoppm(pdfPath, outDir, "png", width, height),
                                            repeats) * 1000 / PAGES}


async def _poolSeconds(data: bytes, repeats: int) -> float:
    pool = RenderPool(1, 60)
    try:
        await pool.warmUp()
        job = RenderJob(data, (), PAGES, BUDGET, 50_000_000)
        await pool.render(job)
        best = float("inf")
        for _ in range(repeats):
            startedAt = time.perf_counter()
            await pool.render(job)
            best = min(best, time.perf_counter() - startedAt)
        return best
    finally:
        await pool.close()


def benchPool(data: bytes, repeats: int) -> dict[str, Any]:
    """ms per page through the render worker pool: the pipeline plus handing the PDF and images between processes."""
    return {"poolMsPerPage": asyncio.run(_poolSeconds(data, repeats)) * 1000 / PAGES}


def serviceIni(port: int, stubUrl: str, apiKey: str, workers: int) -> str:
    """Limits far above the load, workers started with the service, quiet logs."""
    return (f"[server]\nhost = 127.0.0.1\nport = {port}\nlog_level = warning\ngraceful_shutdown_seconds = 2\n\n"
            f"[ollama]\nbase_url = {stubUrl}\n"
            f"num_parallel = 100000\nmax_queue = 100000\n\n"
            f"[auth]\napi_keys = gateway={apiKey}\nopenai_keys = bench={secrets.token_urlsafe(32)}\n\n"
            f"[ratelimit]\nper_key = gateway=10000000/100000/100000\n\n"
            f"[documents]\nrender_workers = {workers}\nprestart_workers = true\n\n"
            f"[whisper]\nenabled = false\n\n[warmup]\nmodels =\n")


def multipartBody(pdf: bytes) -> tuple[bytes, str]:
    boundary = "bench" + secrets.token_hex(8)
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n{PROMPT}\r\n".encode(),
             f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"invoice.pdf\"\r\n"
             f"Content-Type: application/pdf\r\n\r\n".encode() + pdf + b"\r\n",
             f"--{boundary}--\r\n".encode()]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _runWrk(url: str, bodyPath: Path, contentType: str, apiKey: str, seconds: float, concurrency: int,
            core: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise WrkError("wrk is not installed (Debian: apt-get install wrk)")
    env = {**os.environ, "BENCH_BODY_FILE": str(bodyPath), "BENCH_CONTENT_TYPE": contentType,
           "BENCH_API_KEY": apiKey}
    command = ["taskset", "-c", str(core), "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
               "--timeout", f"{WRK_TIMEOUT_SECONDS}s", "-s", str(WRK_SCRIPT), url]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 40)
    if done.returncode != 0:
        raise WrkError(f"wrk failed ({done.returncode}): {done.stderr.strip()[:300]}")
    return parseWrkOutput(done.stdout).asDict()


def _startStub(workDir: Path, core: int) -> tuple[BenchProcess, str]:
    port = freePort()
    command = [sys.executable, "-m", "tests.ollamaStub", "--port", str(port), "--models", STUB_MODEL,
               "--no-record", "--kind", "--chunks", "4"]
    stub = BenchProcess("stub", command, dict(os.environ), core, workDir / "stub.log", REPO_ROOT).start()
    stub.waitForHttp(f"http://127.0.0.1:{port}/api/version", START_TIMEOUT_SECONDS)
    return stub, f"http://127.0.0.1:{port}"


def _startService(workDir: Path, stubUrl: str, workers: int, core: int) -> tuple[BenchProcess, str, str]:
    port, apiKey = freePort(), secrets.token_urlsafe(32)
    iniPath = workDir / f"service-{workers}.ini"
    iniPath.write_text(serviceIni(port, stubUrl, apiKey, workers), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PRIVATE_LLM_")}
    env["PRIVATE_LLM_CONFIG"] = str(iniPath)
    service = BenchProcess(f"service-{workers}", [sys.executable, "app.py"], env, core,
                           workDir / f"service-{workers}.log", REPO_ROOT).start()
    service.waitForHttp(f"http://127.0.0.1:{port}/health/liveliness", START_TIMEOUT_SECONDS)
    return service, f"http://127.0.0.1:{port}", apiKey


def _checkOnce(baseUrl: str, apiKey: str, body: bytes, contentType: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        response = httpx.post(baseUrl + "/api/analyze", content=body, timeout=30, trust_env=False,
                              headers={"Content-Type": contentType, "X-API-Key": apiKey})
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # model discovery or the render workers are still starting
    if response.status_code != 200:
        raise RuntimeError(f"/api/analyze answered {response.status_code}: {response.text[:300]}")


def benchAnalyze(workers: int, seconds: float, concurrency: int, serviceCore: int, loadCore: int) -> dict[str, Any]:
    """requests/s of /api/analyze (multipart, 1-page PDF) with the service (and its render workers) on one core."""
    body, contentType = multipartBody(makeInvoicePdf(1))
    with tempfile.TemporaryDirectory(prefix="benchPdf-") as folder:
        workDir = Path(folder)
        bodyPath = workDir / "analyze.body"
        bodyPath.write_bytes(body)
        stub, stubUrl = _startStub(workDir, loadCore)
        service = None
        try:
            service, baseUrl, apiKey = _startService(workDir, stubUrl, workers, serviceCore)
            _checkOnce(baseUrl, apiKey, body, contentType)
            result = _runWrk(baseUrl + "/api/analyze", bodyPath, contentType, apiKey, seconds, concurrency, loadCore)
            result["serviceRssMiB"] = round(service.rssBytes() / 2**20, 1)
            return {"renderWorkers": workers, "concurrency": concurrency, **result}
        finally:
            for process in (service, stub):
                if process is not None:
                    process.stop()


def _renderRows(results: dict[str, Any]) -> list[tuple[str, float]]:
    ours, poppler, pool = results["pymupdf"], results["pdftoppm"], results["pool"]
    rows = [("PyMuPDF + Pillow JPEG q90 + base64 (our pipeline, in process)", ours["pipelineMsPerPage"]),
            ("same, through the render worker pool (hand-over between processes included)", pool["poolMsPerPage"]),
            ("PyMuPDF rasterising only (no encoding)", ours["renderOnlyMsPerPage"]),
            ("PyMuPDF PNG (`pix.tobytes(\"png\")`)", ours["pngMsPerPage"])]
    if "error" not in poppler:
        rows += [("`pdftoppm -jpeg -jpegopt quality=90`, same pixel size (one process, writes files)",
                  poppler["jpegMsPerPage"]),
                 ("`pdftoppm -png`, same pixel size (one process, writes files)", poppler["pngMsPerPage"])]
    return rows


def _analyzeRow(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"| {run.get('renderWorkers', '?')} | not measured: {run['error']} | | | | |"
    return (f"| {run['renderWorkers']} | {run['concurrency']} | {run['rps']:.1f} | {run['p50Ms']:.1f} | "
            f"{run['p99Ms']:.1f} | {run['errors']} |")


def reportMarkdown(results: dict[str, Any]) -> str:
    """The results as markdown tables (printed, and used by bench/report.py for docu/performance.md)."""
    ours, poppler = results["pymupdf"], results["pdftoppm"]
    width, height = ours["pixels"]
    lines = [f"Rendering a {PAGES}-page A4 invoice PDF (text, ruled table, embedded photo; {results['pdfBytes']} "
             f"bytes) at the default budget of {BUDGET} px: {width}x{height} px per page, JPEG "
             f"{ours['jpegKiBPerPage']} KiB per page; best of {results['repeats']} runs. "
             f"Poppler: {poppler.get('version', poppler.get('error'))}.", "",
             "| Method | ms per page |", "|---|---:|"]
    lines += [f"| {label} | {value:.1f} |" for label, value in _renderRows(results)]
    lines += ["", f"`POST /api/analyze` with a 1-page PDF (multipart) against an instant Ollama stub, wrk "
              f"{results['seconds']:g} s; the service and its render workers share one core, stub and wrk the "
              "other.", "", "| Render workers | Connections | Requests/s | p50 ms | p99 ms | Errors |",
              "|---:|---:|---:|---:|---:|---:|"]
    lines += [_analyzeRow(run) for run in results["analyze"]]
    return "\n".join(lines)


def main() -> dict[str, Any]:
    """Run every measurement; returns the results (also printed as a table)."""
    repeats = int(_option("BENCH_PDF_REPEATS", "5"))
    seconds = float(_option("BENCH_PDF_SECONDS", "10"))
    concurrency = int(_option("BENCH_PDF_CONCURRENCY", "8"))
    serviceCore, loadCore = int(_option("BENCH_PDF_SERVICE_CORE", "0")), int(_option("BENCH_PDF_LOAD_CORE", "1"))
    data = makeInvoicePdf(PAGES)
    results: dict[str, Any] = {"pages": PAGES, "pixelBudget": BUDGET, "pdfBytes": len(data), "repeats": repeats,
                               "seconds": seconds}
    results["pymupdf"] = benchPyMuPdf(data, repeats)
    results["pdftoppm"] = benchPdftoppm(data, *results["pymupdf"]["pixels"], repeats)
    results["pool"] = benchPool(data, repeats)
    results["analyze"] = []
    for workers in (int(value) for value in _option("BENCH_PDF_WORKERS", "1,2").split(",")):
        try:
            results["analyze"].append(benchAnalyze(workers, seconds, concurrency, serviceCore, loadCore))
        except (WrkError, RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
            results["analyze"].append({"renderWorkers": workers, "error": f"{type(exc).__name__}: {exc}"[:300]})
    results["markdown"] = reportMarkdown(results)
    print(results["markdown"])
    return results


if __name__ == "__main__":
    main()
