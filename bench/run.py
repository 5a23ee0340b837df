"""``make bench`` (``python -m bench.run``): the service against the upstream directly (the limit) and against
LiteLLM proxy (the anchor), side by side in one run, written to docu/performance.md.

Starts the instant upstream (bench/instantUpstream.py), the service (``python app.py`` with a generated config) and
LiteLLM proxy (own venv), pins the server under test to one core and the load generator to the other, and measures
in alternating rounds: wrk throughput and latency (non-streaming and streaming) at each concurrency, streaming TTFB
with a raw-asyncio probe, chunk pacing through each gateway, RSS idle / with 200 open streams / after the run.
Then the extra benches (EXTRA_BENCHES; BENCH_SKIP_EXTRA=1 skips them), each a section of the report: PDF analysis
(bench/benchPdf.py), speech-to-text speed (bench/benchStt.py), speech to text in the users' languages (detection
accuracy, word error rate and real-time factor per language, bench/sttLanguages.py), admission and fair sharing,
mixed traffic (model reloads on a realistic Ollama stand-in, must be 0), event-loop stalls, several workers with
Redis, several upstreams. BENCH_QUICK=1 shortens those with a quick mode (all but the PDF and upstreams benches).

Environment: BENCH_QUICK=1 (smoke: 2 s runs, 1 round), BENCH_SECONDS, BENCH_ROUNDS, BENCH_CONCURRENCY (1,16,64),
BENCH_PROBE_SECONDS, BENCH_SKIP_LITELLM=1, BENCH_SKIP_EXTRA=1, BENCH_SKIP_STUB=1, BENCH_OUTPUT (docu/performance.md),
BENCH_RESULTS_DIR (bench/results), BENCH_SERVICE_CORE (0), BENCH_LOAD_CORE (1).
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import platform
import signal
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import litellmProxy, report, tails
from bench.procs import BenchProcess, coreBusySeconds, coreStealSeconds, freePort, waitUntilIdle
from bench.streamProbe import (
    Endpoint,
    analyseGaps,
    holdStreams,
    probeConcurrentStreams,
    probeLatency,
    probeSequential,
    runAsync,
    summariseLatency,
)
from bench.wrkRunner import WrkError, runWrk

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_OUTPUT = REPO_ROOT / "docu" / "performance.md"
EXTERNAL_MODEL = "poweron-text-general"
OLLAMA_MODEL = "qwen2.5:7b"
CHUNKS = 32
PROMPT = "Say hello in one short sentence."
START_TIMEOUT_SECONDS = 60
LITELLM_START_TIMEOUT_SECONDS = 120
PACING_DELAY_MS = 20.0
PACING_CONCURRENCY = 16
STUB_FACTOR_RULE = report.STUB_FACTOR_RULE
"""The upstream must serve at least this many times the fastest gateway's rate, or it would be the bottleneck."""
HOLD_DELAY_MS = 100.0
OPEN_STREAMS = 200
PROBE_MAX_REQUESTS_PER_SECOND = 20000
SETTLE_SECONDS = 2.0
DISTURBED_SHARE = 0.10
"""A wrk run during which others (processes, steal) took more than this share of the server core is repeated."""
DISTURBED_RETRIES = 2
WARM_UP_SECONDS = 2
QUICK_WARM_UP_SECONDS = 1
EXTRA_BENCHES = (("pdf", "bench.benchPdf"), ("stt", "bench.benchStt"), ("sttLanguages", "bench.sttLanguages"),
                 ("admission", "bench.benchAdmission"),
                 ("mixed", "bench.benchMixed"), ("stalls", "bench.benchLoopStalls"),
                 ("instances", "bench.benchInstances"), ("upstreams", "bench.benchUpstreams"))
ENV_OVERRIDES = ("BENCH_QUICK", "BENCH_SECONDS", "BENCH_ROUNDS", "BENCH_CONCURRENCY", "BENCH_PROBE_SECONDS",
                 "BENCH_SKIP_LITELLM", "BENCH_SKIP_EXTRA", "BENCH_SKIP_STUB", "BENCH_OUTPUT", "BENCH_SERVICE_CORE",
                 "BENCH_LOAD_CORE", "BENCH_RESULTS_DIR")


@dataclass
class BenchOptions:
    quick: bool = False
    wrkSeconds: float = 5.0
    rounds: int = 2
    concurrencies: list[int] = field(default_factory=lambda: [1, 16, 64])
    probeSeconds: float = 2.0
    skipLitellm: bool = False
    skipExtra: bool = False
    skipStub: bool = False
    output: Path = DEFAULT_OUTPUT
    resultsDir: Path = RESULTS_DIR
    serviceCore: int = 0
    loadCore: int = 1


def _flag(env: dict[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def optionsFromEnv(env: dict[str, str]) -> BenchOptions:
    """Options from BENCH_* variables; BENCH_QUICK=1 shortens everything for a smoke run."""
    quick = _flag(env, "BENCH_QUICK")
    return BenchOptions(
        quick=quick, wrkSeconds=float(env.get("BENCH_SECONDS", 2 if quick else 5)),
        rounds=int(env.get("BENCH_ROUNDS", 1 if quick else 2)),
        concurrencies=[int(c) for c in env.get("BENCH_CONCURRENCY", "1,16,64").split(",") if c.strip()],
        probeSeconds=float(env.get("BENCH_PROBE_SECONDS", 1 if quick else 2)),
        skipLitellm=_flag(env, "BENCH_SKIP_LITELLM"), skipExtra=_flag(env, "BENCH_SKIP_EXTRA"),
        skipStub=quick or _flag(env, "BENCH_SKIP_STUB"), output=Path(env.get("BENCH_OUTPUT", DEFAULT_OUTPUT)),
        resultsDir=Path(env.get("BENCH_RESULTS_DIR", RESULTS_DIR)),
        serviceCore=int(env.get("BENCH_SERVICE_CORE", 0)), loadCore=int(env.get("BENCH_LOAD_CORE", 1)))


@dataclass
class Target:
    """One thing under test: the service, LiteLLM or the upstream directly."""

    name: str
    label: str
    port: int
    path: str
    bearer: str
    bodies: dict[bool, bytes]
    bodyFiles: dict[bool, Path]
    process: BenchProcess | None = None
    available: bool = False
    note: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def endpoint(self, stream: bool) -> Endpoint:
        return Endpoint("127.0.0.1", self.port, self.path, self.bodies[stream], self.bearer)


def openAiBody(stream: bool) -> bytes:
    body: dict[str, Any] = {"model": EXTERNAL_MODEL, "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": 64}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def ollamaBody(stream: bool) -> bytes:
    return orjson.dumps({"model": OLLAMA_MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": stream})


def serviceIni(port: int, upstreamUrl: str, apiKey: str, openAiKey: str) -> str:
    """The bench config: generated keys, limits far above the load, no whisper, no warm-up, quiet logs."""
    return (f"[server]\nhost = 127.0.0.1\nport = {port}\nlog_level = warning\ngraceful_shutdown_seconds = 2\n\n"
            f"[ollama]\nbase_url = {upstreamUrl}\n"
            f"num_parallel = 100000\nmax_queue = 100000\n\n"
            f"[auth]\napi_keys = gateway={apiKey}\nopenai_keys = bench={openAiKey}\n\n"
            f"[ratelimit]\nper_key = bench=10000000/100000/100000, gateway=10000000/100000/100000\n\n"
            f"[whisper]\nenabled = false\n\n[warmup]\nmodels =\n")


class BenchRun:
    """Processes, targets and results of one run."""

    def __init__(self, options: BenchOptions, workDir: Path) -> None:
        self.options, self.workDir = options, workDir
        self.processes: list[BenchProcess] = []
        self.targets: dict[str, Target] = {}
        self.notes: list[str] = []
        self.results: dict[str, Any] = {"wrk": {}, "probe": {}, "pacing": {}, "memory": {}, "notes": self.notes}
        self.upstream: BenchProcess | None = None
        self.upstreamPort = 0

    # ----------------------------------------------------------------------------------------- processes

    def bodyFile(self, name: str, body: bytes) -> Path:
        path = self.workDir / f"{name}.json"
        path.write_bytes(body)
        return path

    def makeTarget(self, name: str, label: str, port: int, path: str, bearer: str, openAi: bool) -> Target:
        bodies = {stream: (openAiBody if openAi else ollamaBody)(stream) for stream in (False, True)}
        files = {stream: self.bodyFile(f"{name}-{'stream' if stream else 'whole'}", bodies[stream])
                 for stream in (False, True)}
        return Target(name, label, port, path, bearer, bodies, files)

    def launch(self, name: str, command: list[str], env: dict[str, str], core: int) -> BenchProcess:
        process = BenchProcess(name, command, env, core, self.workDir / f"{name}.log", REPO_ROOT).start()
        self.processes.append(process)
        return process

    def startUpstream(self) -> None:
        self.upstreamPort = freePort()
        command = [sys.executable, "-m", "bench.instantUpstream", "--port", str(self.upstreamPort),
                   "--models", OLLAMA_MODEL, "--chunks", str(CHUNKS)]
        self.upstream = self.launch("upstream", command, dict(os.environ), self.options.loadCore)
        self.upstream.waitForHttp(f"http://127.0.0.1:{self.upstreamPort}/api/version", START_TIMEOUT_SECONDS)
        target = self.makeTarget("direct", "upstream direct", self.upstreamPort, "/api/chat", "", openAi=False)
        target.process, target.available = self.upstream, True
        self.targets["direct"] = target

    def startService(self) -> None:
        port, openAiKey = freePort(), secrets.token_urlsafe(32)
        iniPath = self.workDir / "service.ini"
        iniPath.write_text(serviceIni(port, f"http://127.0.0.1:{self.upstreamPort}", secrets.token_urlsafe(32),
                                      openAiKey), encoding="utf-8")
        env = {key: value for key, value in os.environ.items() if not key.startswith("PRIVATE_LLM_")}
        env["PRIVATE_LLM_CONFIG"] = str(iniPath)
        target = self.makeTarget("service", "service", port, "/v1/chat/completions", openAiKey, openAi=True)
        self.targets["service"] = target
        target.process = self.launch("service", [sys.executable, "app.py"], env, self.options.serviceCore)
        target.process.waitForHttp(f"http://127.0.0.1:{port}/health/liveliness", START_TIMEOUT_SECONDS)
        self.verify(target)

    def startLitellm(self) -> None:
        port, masterKey = freePort(), "sk-bench-" + secrets.token_urlsafe(24)
        target = self.makeTarget("litellm", f"LiteLLM {litellmProxy.LITELLM_VERSION}", port, "/v1/chat/completions",
                                 masterKey, openAi=True)
        self.targets["litellm"] = target
        if self.options.skipLitellm:
            target.note = "skipped (BENCH_SKIP_LITELLM=1)"
            return
        try:
            self.results["litellmVersion"] = litellmProxy.ensureLitellm(self.workDir / "litellm-install.log")
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            target.note = f"not measured: {exc}"
            return
        configPath, logConfigPath = litellmProxy.writeConfig(self.workDir, EXTERNAL_MODEL, OLLAMA_MODEL,
                                                             f"http://127.0.0.1:{self.upstreamPort}", masterKey)
        target.process = self.launch("litellm", litellmProxy.litellmCommand(configPath, logConfigPath, port),
                                     litellmProxy.litellmEnv(), self.options.serviceCore)
        try:
            target.process.waitForHttp(f"http://127.0.0.1:{port}/health/liveliness", LITELLM_START_TIMEOUT_SECONDS)
        except (RuntimeError, TimeoutError) as exc:
            target.note = f"not measured: did not start ({str(exc).splitlines()[0]})"
            return
        self.verify(target)

    def verify(self, target: Target) -> None:
        """A target is measured only when it answers a chat request and streams all chunks."""
        try:
            response = httpx.post(target.url, content=target.bodies[False], timeout=30, trust_env=False,
                                  headers={"Content-Type": "application/json",
                                           **({"Authorization": f"Bearer {target.bearer}"} if target.bearer else {})})
        except httpx.HTTPError as exc:
            target.note = f"not measured: {type(exc).__name__} on the first chat request"
            return
        if response.status_code != 200:
            target.note = f"not measured: first chat request answered {response.status_code} {response.text[:200]}"
            return
        streamed = runAsync(probeSequential(target.endpoint(True), 1))[0]
        if streamed.status != 200 or len(streamed.contentTimes) != CHUNKS:
            target.note = (f"not measured: stream answered {streamed.status} with {len(streamed.contentTimes)} "
                           f"content chunks (expected {CHUNKS})")
            return
        target.available = True

    def stopAll(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    # ----------------------------------------------------------------------------------------- measuring

    def measured(self) -> list[Target]:
        return [self.targets[name] for name in report.TARGET_ORDER if name in self.targets
                and self.targets[name].available]

    def underTest(self, target: Target) -> Any:
        """Context: the direct upstream is moved to the server core while it is the target, and the other gateways
        (on the server core too) are stopped meanwhile."""
        others = [other.process for other in self.targets.values() if other.process is not None
                  and other.process not in (target.process, self.upstream)]
        return _Isolated(self.upstream, self.options.serviceCore, self.options.loadCore, target.name == "direct",
                         others)

    def wrkOnce(self, target: Target, stream: bool, concurrency: int, seconds: float) -> dict[str, Any] | None:
        """One wrk run; adds the server's CPU time per request (robust against other load on the machine)."""
        process, core = target.process, self.options.serviceCore
        metricsBefore = scrapeMetrics(target)
        with self.underTest(target):
            cpuBefore, busyBefore = (process.cpuSeconds() if process else 0.0), coreBusySeconds(core)
            stealBefore = coreStealSeconds(core)
            try:
                result = runWrk(target.url, target.bodyFiles[stream], target.bearer, concurrency, seconds,
                                self.options.loadCore).asDict()
            except (WrkError, subprocess.TimeoutExpired) as exc:
                self.notes.append(f"wrk against {target.label} (c={concurrency}, stream={stream}) failed: {exc}")
                return None
            cpuUsed = (process.cpuSeconds() if process else 0.0) - cpuBefore
            busy = coreBusySeconds(core) - busyBefore
            steal = coreStealSeconds(core) - stealBefore
        result.update(serverCpu(cpuUsed, busy, result["requests"], result["seconds"]))
        result["stealShare"] = steal / result["seconds"] if result["seconds"] else 0.0
        result.update(loopLagBetween(metricsBefore, scrapeMetrics(target)))
        if process is not None:
            result["idleWaitSeconds"] = waited = round(waitUntilIdle(process), 2)
            if waited >= 1.0:
                self.notes.append(f"{target.label} kept its core busy {waited:g} s after its wrk run (c={concurrency}, "
                                  f"{'streaming' if stream else 'non-streaming'}): the next run waited for it")
        return result

    def warmUp(self) -> None:
        """Not recorded: first requests (lazy imports, upstream connections, LiteLLM's first calls) at the highest
        concurrency, so start-up work does not land in the first measured run's tail."""
        seconds = QUICK_WARM_UP_SECONDS if self.options.quick else WARM_UP_SECONDS
        for target in self.measured():
            for stream in (False, True):
                self.wrkOnce(target, stream, max(self.options.concurrencies), seconds)

    def roundOrder(self, roundIndex: int) -> list[Target]:
        order = self.measured()
        return order if roundIndex % 2 == 0 else order[::-1]

    def throughputRound(self, roundIndex: int) -> None:
        for mode, stream in (("nonstream", False), ("stream", True)):
            for concurrency in self.options.concurrencies:
                for target in self.roundOrder(roundIndex):
                    result = self.undisturbedRun(target, stream, concurrency)
                    if result is not None:
                        slot = self.results["wrk"].setdefault(mode, {}).setdefault(str(concurrency), {})
                        slot.setdefault(target.name, []).append(result)
                    print(f"  round {roundIndex + 1} {mode:9} c={concurrency:<3} {target.label:16} "
                          f"{_short(result)}", flush=True)

    def undisturbedRun(self, target: Target, stream: bool, concurrency: int) -> dict[str, Any] | None:
        """One wrk run, repeated (at most DISTURBED_RETRIES times) while other processes or the hypervisor (steal)
        took more than DISTURBED_SHARE of the server core: such a run measures the neighbours, not the target (the
        direct upstream's own c=1 max went from 5 to 36 ms in such a round). Every target gets the same rule; the
        least disturbed attempt is kept and every repeat is named in the report's notes."""
        attempts: list[dict[str, Any]] = []
        for _ in range(1 + DISTURBED_RETRIES):
            result = self.wrkOnce(target, stream, concurrency, self.options.wrkSeconds)
            if result is None:
                return None
            attempts.append(result)
            if result["otherLoad"] <= DISTURBED_SHARE:
                break
        kept = min(attempts, key=lambda attempt: attempt["otherLoad"])
        kept["attempts"] = len(attempts)
        if len(attempts) > 1:
            shares = ", ".join(f"{attempt['otherLoad']:.0%} (steal {attempt.get('stealShare', 0.0):.0%})"
                               for attempt in attempts)
            self.notes.append(f"{target.label}, {'streaming' if stream else 'non-streaming'} c={concurrency}: other "
                              f"load on the server core in {len(attempts)} attempts {shares}; kept the run with "
                              f"{kept['otherLoad']:.0%}")
        return kept

    def probeRound(self, roundIndex: int) -> None:
        seconds = self.options.probeSeconds
        for concurrency in self.options.concurrencies:
            for target in self.roundOrder(roundIndex):
                with self.underTest(target):
                    timings = runAsync(probeLatency(target.endpoint(True), concurrency, seconds,
                                                    int(seconds * PROBE_MAX_REQUESTS_PER_SECOND)))
                summary = summariseLatency(timings, seconds)
                slot = self.results["probe"].setdefault(str(concurrency), {})
                slot.setdefault(target.name, []).append(summary)
                print(f"  round {roundIndex + 1} ttfb      c={concurrency:<3} {target.label:16} "
                      f"first byte p50 {summary['ttfbP50Ms']:.2f} ms, first content p50 "
                      f"{summary['contentP50Ms']:.2f} ms, total p50 {summary['totalP50Ms']:.2f} ms", flush=True)

    def setPacing(self, delayMs: float) -> None:
        httpx.post(f"http://127.0.0.1:{self.upstreamPort}/_bench/config", json={"chunkDelayMs": delayMs},
                   timeout=5, trust_env=False).raise_for_status()

    def measurePacing(self, streams: int) -> None:
        """Chunk gaps through each target with a paced upstream: ``streams`` sequential streams (concurrency 1),
        then PACING_CONCURRENCY connections with 2 streams each (concurrency 16)."""
        self.results["pacingStreams"], self.results["pacingConcurrency"] = streams, PACING_CONCURRENCY
        self.setPacing(PACING_DELAY_MS)
        try:
            for target in self.measured():
                timings = runAsync(probeSequential(target.endpoint(True), streams))
                self.results["pacing"][target.name] = analyseGaps([t.contentTimes for t in timings], PACING_DELAY_MS)
                with self.underTest(target):
                    loaded = runAsync(probeConcurrentStreams(target.endpoint(True), PACING_CONCURRENCY, 2))
                gaps = analyseGaps([t.contentTimes for t in loaded], PACING_DELAY_MS)
                self.results.setdefault("pacingConcurrent", {})[target.name] = gaps
        finally:
            self.setPacing(0)

    def memoryOf(self, name: str) -> dict[str, Any]:
        return self.results["memory"].setdefault(name, {"rounds": []})

    def sampleRss(self, key: str) -> None:
        for name in ("service", "litellm"):
            target = self.targets.get(name)
            if target is not None and target.available and target.process is not None:
                rss = target.process.rssBytes()
                memory = self.memoryOf(name)
                if key == "rounds":
                    memory["rounds"].append(rss)
                else:
                    memory[key] = rss

    def holdOpenStreams(self) -> None:
        """200 slow streams at once through each gateway; RSS sampled while they are open."""
        self.setPacing(HOLD_DELAY_MS)
        try:
            for name in ("service", "litellm"):
                target = self.targets.get(name)
                if target is None or not target.available or target.process is None:
                    continue
                streamSeconds = CHUNKS * HOLD_DELAY_MS / 1000.0
                held = runAsync(holdStreams(target.endpoint(True), OPEN_STREAMS, streamSeconds / 2,
                                            target.process.rssBytes, streamSeconds * 4))
                self.memoryOf(name)["streams"] = held
                print(f"  {OPEN_STREAMS} open streams through {target.label}: RSS {held['sample'] / 2**20:.1f} MiB, "
                      f"{held['startedAtSample']} open at the sample, {held['completed']} completed", flush=True)
        finally:
            self.setPacing(0)

    def measureStub(self) -> None:
        """The test stub's own speed on one core, measured first, before any upstream is chosen. The rule
        (STUB_FACTOR_RULE): an upstream must serve >= 10x the fastest gateway's rate; the report compares the stub's
        and bench/instantUpstream.py's rates with the gateways' and says which one meets it."""
        port = freePort()
        stub = self.launch("stub", [sys.executable, "-m", "tests.ollamaStub", "--host", "127.0.0.1", "--port",
                                    str(port), "--models", OLLAMA_MODEL, "--chunks", str(CHUNKS), "--no-record",
                                    "--kind"],
                           dict(os.environ), self.options.serviceCore)
        try:
            stub.waitForHttp(f"http://127.0.0.1:{port}/api/version", START_TIMEOUT_SECONDS)
            concurrency = max(self.options.concurrencies)
            speeds = {}
            for stream in (False, True):
                bodyFile = self.bodyFile(f"stub-{'stream' if stream else 'whole'}", ollamaBody(stream))
                result = runWrk(f"http://127.0.0.1:{port}/api/chat", bodyFile, "",
                                concurrency, self.options.wrkSeconds, self.options.loadCore)
                speeds["stream" if stream else "nonstream"] = result.rps
            self.results["stub"] = {"concurrency": concurrency, "rule": STUB_FACTOR_RULE, **speeds}
        except (RuntimeError, TimeoutError, WrkError) as exc:
            self.notes.append(f"tests/ollamaStub.py could not be measured: {str(exc).splitlines()[0]}")
        finally:
            stub.stop()

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.results["loadBefore"] = loadAverage()
        if not self.options.skipStub:
            self.measureStub()
        self.startUpstream()
        self.startService()
        self.startLitellm()
        self.sampleRss("idle")
        print(f"measuring: {', '.join(t.label for t in self.measured())}", flush=True)
        self.warmUp()
        for roundIndex in range(self.options.rounds):
            self.throughputRound(roundIndex)
            self.probeRound(roundIndex)
            self.sampleRss("rounds")
        self.measurePacing(3 if self.options.quick else 5)
        self.holdOpenStreams()
        time.sleep(SETTLE_SECONDS)
        self.sampleRss("after")
        self.notes.append(f"service, LiteLLM and upstream measurements took {time.monotonic() - started:.0f} s")
        return self.results


def scrapeMetrics(target: Target) -> str | None:
    """The service's /metrics text (its loop lag and GC pauses), None for other targets or on failure."""
    if target.name != "service":
        return None
    try:
        response = httpx.get(f"http://127.0.0.1:{target.port}/metrics", timeout=10, trust_env=False,
                             headers={"Authorization": f"Bearer {target.bearer}"})
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def loopLagBetween(before: str | None, after: str | None) -> dict[str, Any]:
    """The loop-lag histogram and the GC seconds per generation recorded between two scrapes."""
    if not before or not after:
        return {}
    lag = tails.diffHistogram(tails.parseHistogram(before, tails.LAG_METRIC),
                              tails.parseHistogram(after, tails.LAG_METRIC))
    gcBefore, gcAfter = tails.gcSecondsByGeneration(before), tails.gcSecondsByGeneration(after)
    return {"loopLag": lag, "gcSeconds": {gen: gcAfter[gen] - gcBefore.get(gen, 0.0) for gen in gcAfter}}


class _Isolated:
    """While a target is measured: the upstream moves to the server core when it is the target (and back after),
    and the other gateways on the server core are stopped (SIGSTOP, SIGCONT after). An idle LiteLLM proxy keeps
    running its background loops, about 15 % of that core in earlier runs ("other load"): it took the core from the
    target whenever it ran and evicted the target's caches, which inflated the target's CPU per request and its
    latency at concurrency 1. Stopped, the others neither run nor lose anything (their connections stay open). A
    stopped service records one long loop-lag sample as it continues; each run's lag is the difference of two scrapes
    taken after that (``wrkOnce``), so the sample counts in no run."""

    def __init__(self, upstream: BenchProcess | None, serverCore: int, loadCore: int, active: bool,
                 others: list[BenchProcess]) -> None:
        self.upstream, self.serverCore, self.loadCore, self.active = upstream, serverCore, loadCore, active
        self.others = others

    def __enter__(self) -> None:
        for other in self.others:
            other.signalTree(signal.SIGSTOP)
        if self.active and self.upstream is not None:
            self.upstream.pinTo(self.serverCore)

    def __exit__(self, *exc: object) -> None:
        if self.active and self.upstream is not None:
            self.upstream.pinTo(self.loadCore)
        for other in self.others:
            other.signalTree(signal.SIGCONT)


def serverCpu(cpuUsed: float, coreBusy: float, requests: int, seconds: float) -> dict[str, float]:
    """The server's CPU per request, its share of its core, and how much of that core other processes took
    (other load on the machine makes a run noisy; the CPU per request stays comparable)."""
    return {"cpuMsPerRequest": cpuUsed * 1000.0 / requests if requests else 0.0,
            "cpuShare": cpuUsed / seconds if seconds else 0.0,
            "otherLoad": max(0.0, coreBusy - cpuUsed) / seconds if seconds else 0.0}


def _short(result: dict[str, Any] | None) -> str:
    if result is None:
        return "failed"
    return (f"{result['rps']:8.0f} req/s  p50 {result['p50Ms']:7.2f}  p99 {result['p99Ms']:7.2f}  "
            f"max {result['maxMs']:7.1f} ms{'  ' + tails.STALL_MARK if tails.isStall(result) else ''}  "
            f"CPU {result['cpuMsPerRequest']:.3f} ms/req ({result['cpuShare']:.0%} of the core, others "
            f"{result['otherLoad']:.0%})"
            f"{'  errors ' + str(result['errors']) if result['errors'] else ''}")


# --------------------------------------------------------------------------------------------- extras + meta


def runExtraBench(moduleName: str) -> dict[str, Any] | None:
    """A colleague's bench module (``main()`` returning a dict); None when it does not exist."""
    if importlib.util.find_spec(moduleName) is None:
        return None
    try:
        result = importlib.import_module(moduleName).main()
    except (Exception, SystemExit) as exc:
        return {"error": f"{moduleName}.main() failed: {type(exc).__name__}: {str(exc)[:300]}"}
    return result if isinstance(result, dict) else {"error": f"{moduleName}.main() returned {type(result).__name__}"}


def runExtras(notes: list[str]) -> dict[str, Any]:
    """The PDF and STT benches of the colleagues' issues, timed."""
    extra: dict[str, Any] = {}
    for key, moduleName in EXTRA_BENCHES:
        started = time.monotonic()
        print(f"running {moduleName}", flush=True)
        extra[key] = runExtraBench(moduleName)
        if extra[key] is not None:
            notes.append(f"{moduleName} took {time.monotonic() - started:.0f} s")
    return extra


def _readCommand(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpuModel() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def gitDescription() -> str:
    commit = _readCommand(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = _readCommand(["git", "status", "--porcelain", "--untracked-files=no"])
    return commit + (" + uncommitted changes" if dirty else "")


def commandLine() -> str:
    overrides = " ".join(f"{name}={os.environ[name]}" for name in ENV_OVERRIDES if name in os.environ)
    base = "make bench" if os.environ.get("MAKELEVEL") else "python -m bench.run"
    return f"{overrides} {base}".strip()


def buildMeta(options: BenchOptions, results: dict[str, Any], elapsed: float) -> dict[str, Any]:
    memGiB = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "nproc": os.cpu_count(),
            "cpuModel": cpuModel(), "memGiB": memGiB, "kernel": f"Linux {platform.release()}",
            "python": platform.python_version(), "command": commandLine(), "gitCommit": gitDescription(),
            "elapsedSeconds": elapsed, "rounds": options.rounds, "concurrencies": options.concurrencies,
            "wrkSeconds": options.wrkSeconds, "probeSeconds": options.probeSeconds, "pacingDelayMs": PACING_DELAY_MS,
            "pacingStreams": results.get("pacingStreams", 0),
            "pacingConcurrency": results.get("pacingConcurrency", PACING_CONCURRENCY),
            "litellmVersion": results.get("litellmVersion"), "wrkVersion": wrkVersion(),
            "loadBefore": results.get("loadBefore"), "loadAfter": loadAverage(),
            "pinning": f"servers under test (service, LiteLLM, and the upstream while it is measured directly) on core "
                       f"{options.serviceCore} with taskset; wrk, the probe client and the upstream (while it serves "
                       f"a gateway) on core {options.loadCore}",
            "upstream": upstreamDescription(results)}


def loadAverage() -> str:
    return " / ".join(Path("/proc/loadavg").read_text().split()[:3])


def wrkVersion() -> str:
    text = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return text.split("[", 1)[0].replace("wrk", "").strip() or "unknown"


def upstreamDescription(results: dict[str, Any]) -> str:
    text = (f"bench/instantUpstream.py (raw asyncio protocol on uvloop, Ollama /api/chat NDJSON contract, {CHUNKS} "
            f"chunks per streamed reply, {CHUNKS}-word non-streaming reply)")
    return text


def finishTargets(bench: BenchRun) -> dict[str, Any]:
    return {name: {"label": t.label, "available": t.available, "note": t.note} for name, t in bench.targets.items()}


def writeOutputs(results: dict[str, Any], options: BenchOptions) -> str:
    previous = options.output.read_text(encoding="utf-8") if options.output.exists() else ""
    text = report.renderReport(results) + report.keptSections(previous)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(text, encoding="utf-8")
    options.resultsDir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (options.resultsDir / f"bench-{stamp}.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return text


def main() -> dict[str, Any]:
    options = optionsFromEnv(dict(os.environ))
    started = time.monotonic()
    allCores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {options.loadCore})
    with tempfile.TemporaryDirectory(prefix="poweron-bench-") as workDir:
        bench = BenchRun(options, Path(workDir))
        try:
            results = bench.run()
        finally:
            bench.stopAll()
        results["targets"] = finishTargets(bench)
    os.sched_setaffinity(0, allCores)
    if not options.skipExtra:
        results["extra"] = runExtras(results["notes"])
    results["meta"] = buildMeta(options, results, time.monotonic() - started)
    text = writeOutputs(results, options)
    print(text)
    return results


if __name__ == "__main__":
    main()
