-- POST a pool of prepared bodies in turn, and print the run's figures as one JSON line.
-- Usage: wrk -s bench/wrk/post.lua URL -- PATH CONTENT_TYPE ACCEPT BODY_PREFIX COUNT
--   PATH          request path, e.g. /v1/predict
--   CONTENT_TYPE  e.g. application/json
--   ACCEPT        Accept header value, or "-" for none
--   BODY_PREFIX   bodies are read from BODY_PREFIX.0 .. BODY_PREFIX.(COUNT-1)
-- Each wrk thread formats every request once in init(); request() only cycles through them.

local requests = {}
local next_index = 0

function init(args)
  local path, ctype, accept, prefix, count = args[1], args[2], args[3], args[4], tonumber(args[5])
  local headers = { ["Content-Type"] = ctype }
  if accept ~= "-" then headers["Accept"] = accept end
  for i = 0, count - 1 do
    local f = assert(io.open(prefix .. "." .. i, "rb"))
    local body = f:read("*a")
    f:close()
    requests[#requests + 1] = wrk.format("POST", path, headers, body)
  end
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"latency_mean_us":%.1f,"latency_max_us":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p95_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency:percentile(99.9)))
end
