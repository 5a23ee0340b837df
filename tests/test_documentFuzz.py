"""Mutation fuzz of the document pipeline (issue 17): valid PDFs and images from several producers
(tests/documentMutations.py) are truncated, flipped, zeroed, and get broken cross-references, page trees, counts and
media boxes. Every case must end in a render or a 4xx with a message, within a time bound, and the service must serve
normally afterwards.

Most cases go through the render workers exactly as a request does (``RenderPool.render``: worker processes, the
worker's entry point, its time limit and crash recovery), without HTTP; a smaller set goes through ``POST
/api/preview`` of the real service process over HTTP (status, JSON error, X-Request-ID, no connection reset).

Seeded: POWERON_FUZZ_SEED (default 17) and POWERON_FUZZ_CASES (default 300, `make fuzz` runs 5000) choose the cases;
a failing case is written to tests/artifacts/fuzz/ with its seed, number and mutations in the name.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
from pathlib import Path

import httpx
import pytest

from core.errors import ServiceError
from documents.documentRender import RenderJob
from documents.renderWorkers import RenderPool
from tests.conftest import API_KEY, REPO_ROOT
from tests.documentMutations import mutate, seedDocuments
from tests.documentSamples import makeImage, makePdf

FUZZ_SEED = int(os.environ.get("POWERON_FUZZ_SEED", "17"))
FUZZ_CASES = int(os.environ.get("POWERON_FUZZ_CASES", "300"))
HTTP_CASES = max(24, FUZZ_CASES // 10)
WORKERS = 2
RENDER_TIMEOUT_SECONDS = 10.0
CASE_SECONDS = 2 * RENDER_TIMEOUT_SECONDS + 10
"""Longest a case may take: a render timeout, or a crash, a fresh pool and one retry."""
WARM_UP_SECONDS = 120.0
"""The first request waits for the render workers to start (slow on a busy shared machine)."""
PIXEL_BUDGET, MAX_PAGES, MAX_IMAGE_PIXELS = 60_000, 3, 50_000_000
ARTIFACTS = REPO_ROOT / "tests" / "artifacts" / "fuzz"
SEEDS = seedDocuments()


def fuzzCases(seed: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` mutated documents: (case name with seed document and mutations, bytes)."""
    rng = random.Random(seed)
    names = sorted(SEEDS)
    cases = []
    for number in range(count):
        seedName = names[number % len(names)]
        data, mutations = mutate(rng, SEEDS[seedName])
        cases.append((f"{seed}-{number}-{seedName}-{'+'.join(mutations)}", data))
    return cases


def keepFailure(name: str, data: bytes) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.bin"
    path.write_bytes(data)
    return path


async def renderCase(pool: RenderPool, data: bytes, password: str | None) -> tuple[int, str, str]:
    """(status, code, message) of one render: 200 for a rendered document."""
    job = RenderJob(data, (), MAX_PAGES, PIXEL_BUDGET, MAX_IMAGE_PIXELS, password)
    try:
        await asyncio.wait_for(pool.render(job), CASE_SECONDS)
    except ServiceError as error:
        return error.status, error.code or "", error.message
    return 200, "rendered", ""


def judge(status: int, message: str) -> bool:
    return status == 200 or (400 <= status < 500 and len(message) > 10)


async def test_mutatedDocumentsRenderOrGetA4xxThroughTheRenderWorkers() -> None:
    cases = fuzzCases(FUZZ_SEED, FUZZ_CASES)
    pool = RenderPool(WORKERS, RENDER_TIMEOUT_SECONDS)
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    slowest = 0.0
    lock = asyncio.Semaphore(WORKERS)

    async def runOne(name: str, data: bytes) -> None:
        nonlocal slowest
        async with lock:
            startedAt = time.perf_counter()
            try:
                status, code, message = await renderCase(pool, data, "fuzz" if "encrypted" in name else None)
            except Exception as error:  # noqa: BLE001 - any escape is a finding
                status, code, message = 0, type(error).__name__, repr(error)
            slowest = max(slowest, time.perf_counter() - startedAt)
        outcomes[f"{status} {code}"] += 1
        if not judge(status, message):
            failures.append(f"{name}: {status} {code} {message[:200]} -> {keepFailure(name, data)}")

    startedAt = time.perf_counter()
    try:
        await pool.warmUp()
        await asyncio.gather(*(runOne(name, data) for name, data in cases))
        assert (await pool.render(RenderJob(makePdf(2), (), MAX_PAGES, PIXEL_BUDGET, MAX_IMAGE_PIXELS))).pages == [1, 2]
    finally:
        await pool.close()
    print(f"\ndocument fuzz: seed {FUZZ_SEED}, {len(cases)} cases in {time.perf_counter() - startedAt:.1f} s, "
          f"slowest {slowest:.2f} s, worker restarts {pool.restarts}: {dict(sorted(outcomes.items()))}")
    assert not failures, "\n".join(failures[:20])
    assert outcomes["200 rendered"] > 0 and sum(outcomes.values()) == len(cases)


@pytest.mark.e2e
def test_mutatedDocumentsThroughTheRealPreviewRoute(serviceFactory) -> None:
    """A smaller set over real HTTP: every answer is 200 or a 4xx with a JSON message and a request id (no 5xx, no
    connection reset), and the service answers normally afterwards."""
    service = serviceFactory({"PRIVATE_LLM_DOCUMENTS__RENDER_WORKERS": "2",
                              "PRIVATE_LLM_DOCUMENTS__RENDER_TIMEOUT_SECONDS": str(RENDER_TIMEOUT_SECONDS),
                              "PRIVATE_LLM_RATELIMIT__API_BURST": str(10 * HTTP_CASES)})
    failures, statuses = [], collections.Counter()
    with httpx.Client(base_url=service.baseUrl, headers={"X-API-Key": API_KEY}, timeout=CASE_SECONDS) as client:
        warmUp = client.post("/api/preview", files={"file": ("ok.pdf", makePdf(1))}, timeout=WARM_UP_SECONDS)
        assert warmUp.status_code == 200, "the render workers start before the cases are timed"
        for name, data in fuzzCases(FUZZ_SEED + 1, HTTP_CASES):
            fields = {"password": "fuzz"} if "encrypted" in name else {}
            try:
                response = client.post("/api/preview", files={"file": ("upload.bin", data)}, data=fields)
            except httpx.HTTPError as error:
                failures.append(f"{name}: {type(error).__name__} -> {keepFailure(name, data)}")
                continue
            statuses[response.status_code] += 1
            assert response.status_code != 429, "the rate limit must not hide cases"
            body = response.json()
            message = "" if response.status_code == 200 else body.get("detail", "")
            if not judge(response.status_code, message) or not response.headers.get("X-Request-ID"):
                failures.append(f"{name}: {response.status_code} {body} -> {keepFailure(name, data)}")
        assert client.get("/health/liveliness").status_code == 200
        assert client.post("/api/preview", files={"file": ("ok.png", makeImage(60, 40))}).status_code == 200
    print(f"\ndocument fuzz over HTTP: {HTTP_CASES} cases: {dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(failures[:20])
    assert "internal_error" not in service.logText()
