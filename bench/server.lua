-- wrk script of bench/server.sh. Every request carries another device's
-- credential: thread t of T walks the devices upwards from t * DEVICES / T
-- (mod DEVICES), so a 10 s run at 10,000 requests/s authenticates 100,000
-- distinct devices and no device comes near its rate limit. The credentials are the ones
-- bench/server.sh seeds: kxd_bench_000000, kxd_bench_000001, ...
--
-- wrk -s bench/server.lua URL -- METHOD PATH DEVICES THREADS [BODY-FILE]
-- At the end it prints one JSON line (latencies in microseconds).

local threads = {}

function setup(thread)
    thread:set("id", #threads)
    table.insert(threads, thread)
end

function init(args)
    method = args[1]
    path = args[2]
    devices = tonumber(args[3])
    step = tonumber(args[4])
    body = nil
    if args[5] then
        local f = assert(io.open(args[5], "rb"))
        body = f:read("*a")
        f:close()
    end
    -- Start threads far apart so they do not walk the same devices;
    -- KX_WRK_OFFSET moves every thread on (the warm-up's later runs).
    n = id * math.floor(devices / step) + (tonumber(os.getenv("KX_WRK_OFFSET") or "0") or 0)
end

function request()
    local headers = {
        ["Authorization"] = string.format("Bearer kxd_bench_%06d", n % devices),
    }
    if body then
        headers["Content-Type"] = "application/json"
    end
    n = n + 1
    return wrk.format(method, path, headers, body)
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        '{"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
        '"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
        '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
        summary.requests, summary.duration, e.connect, e.read, e.write, e.status,
        e.timeout, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency.max))
end
