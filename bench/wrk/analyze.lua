-- wrk script for bench/benchPdf.py: POSTs one prebuilt body (file in BENCH_BODY_FILE, e.g. a multipart upload)
-- with its Content-Type (BENCH_CONTENT_TYPE) and an analysis key (BENCH_API_KEY as X-API-Key), and prints the
-- same BENCHJSON summary line as post.lua, so bench/wrkRunner.parseWrkOutput reads it.
local bodyFile = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"), "BENCH_BODY_FILE is not readable")
wrk.method = "POST"
wrk.body = bodyFile:read("*a")
bodyFile:close()
wrk.headers["Content-Type"] = assert(os.getenv("BENCH_CONTENT_TYPE"), "BENCH_CONTENT_TYPE is not set")
wrk.headers["X-API-Key"] = assert(os.getenv("BENCH_API_KEY"), "BENCH_API_KEY is not set")

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
