-- wrk script for the benchmark harness: POSTs one prebuilt body (file in BENCH_BODY_FILE) with its Content-Type
-- (BENCH_CONTENT_TYPE, default application/json), an optional Bearer key (BENCH_BEARER) and an optional analysis
-- key (BENCH_API_KEY as X-API-Key), and prints a machine-readable summary line (BENCHJSON {...}) that
-- bench/wrkRunner.parseWrkOutput reads.
local bodyFile = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"), "BENCH_BODY_FILE is not readable")
wrk.method = "POST"
wrk.body = bodyFile:read("*a")
bodyFile:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/json"
local bearer = os.getenv("BENCH_BEARER")
if bearer and bearer ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. bearer
end
local apiKey = os.getenv("BENCH_API_KEY")
if apiKey and apiKey ~= "" then
  wrk.headers["X-API-Key"] = apiKey
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max))
end
