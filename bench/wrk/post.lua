-- wrk script for the benchmark harness: POSTs one JSON body (file in BENCH_BODY_FILE) with an optional Bearer key
-- (BENCH_BEARER), and prints a machine-readable summary line (BENCHJSON {...}) that bench/run.py parses.
local bodyFile = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"), "BENCH_BODY_FILE is not readable")
wrk.method = "POST"
wrk.body = bodyFile:read("*a")
bodyFile:close()
wrk.headers["Content-Type"] = "application/json"
local bearer = os.getenv("BENCH_BEARER")
if bearer and bearer ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. bearer
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
