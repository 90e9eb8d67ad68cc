-- POST one prepared body back to back on every connection; print wrk's figures as one JSON line,
-- with the count of each HTTP status (summed over wrk's threads).
-- Usage: wrk -s reliability/wrk_post.lua URL -- BODY_FILE CONTENT_TYPE PATH
local req
local threads = {}
statuses = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local body = f:read("*a")
  f:close()
  req = wrk.format("POST", args[3], { ["Content-Type"] = args[2] }, body)
end

function request()
  return req
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, _)
  local sums, counts = {}, {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("statuses")) do
      sums[status] = (sums[status] or 0) + n
    end
  end
  for status, n in pairs(sums) do
    counts[#counts + 1] = string.format('"%d":%d', status, n)
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"errors_connect":%d,"errors_read":%d,"errors_write":%d,' ..
    '"errors_status":%d,"errors_timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, table.concat(counts, ",")))
end
