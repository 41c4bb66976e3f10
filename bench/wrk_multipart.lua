-- wrk script: POST one image as multipart/form-data (part "file"), then print a JSON summary line.
-- The image path comes from the environment: WRK_IMAGE=examples/ankle-boot.png wrk -s bench/wrk_multipart.lua ...
local boundary = "vitbenchboundary7d1a"
local handle = assert(io.open(os.getenv("WRK_IMAGE"), "rb"))
local image = handle:read("*all")
handle:close()

wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = "--" .. boundary .. "\r\n"
  .. "Content-Disposition: form-data; name=\"file\"; filename=\"image.png\"\r\n"
  .. "Content-Type: image/png\r\n\r\n"
  .. image .. "\r\n--" .. boundary .. "--\r\n"

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, errors.status, errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean))
end
