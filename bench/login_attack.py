#!/usr/bin/env python3
""""Login under attack" (bench/server.sh): legitimate latency while 256
clients hammer POST /api/v1/login with wrong passwords.

Attackers: --attackers concurrent clients, each on its own loopback source
address (127.2.x.y, a distributed attacker: per-address limits alone do not
stop it) and guessing its own made-up accounts (so the per-account throttle
does not either): each keeps one request in flight, reconnecting after every
answer (the server closes on 429/413), for --duration seconds.

Legitimate traffic, measured at the same time, at a fixed rate (not as
fast as possible: a real fleet and operator do not saturate the server):
  * poll: GET /api/v1/device/poll, every request another device's
    credential (kxd_bench_NNNNNN, seeded by bench/server.sh), --rate per s;
  * operator: GET /api/v1/releases with an operator token, --rate per s.

The server's VmRSS is sampled every 100 ms; VmHWM is read at the end.
Prints one JSON object. Only loopback addresses are used.
"""

import argparse
import asyncio
import json
import random
import sys
import time


async def request(host, port, raw, source=None, timeout=30.0):
    """Sends one HTTP/1.1 request (Connection: close); answers the status."""
    kwargs = {"local_addr": (source, 0)} if source else {}
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, **kwargs), timeout
    )
    try:
        writer.write(raw)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        status = int(line.split()[1]) if line else 0
        await asyncio.wait_for(reader.read(), timeout)
        return status
    finally:
        writer.close()


def http(method, path, headers=(), body=b""):
    lines = [f"{method} {path} HTTP/1.1", "Host: kernex", "Connection: close"]
    lines += list(headers)
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))
    return values[k]


async def attacker(n, host, port, deadline, counts):
    source = f"127.2.{n // 250}.{n % 250 + 1}"
    i = 0
    while time.monotonic() < deadline:
        body = json.dumps(
            {"email": f"guess{n}-{i}@example.com", "password": f"wrong {random.random()}"}
        ).encode()
        i += 1
        try:
            status = await request(host, port, http("POST", "/api/v1/login", body=body), source)
        except (OSError, asyncio.TimeoutError):
            status = "error"
        counts[status] = counts.get(status, 0) + 1


async def sampler(host, port, deadline, rate, make, latencies, errors):
    interval = 1.0 / rate
    nxt = time.monotonic()
    i = 0
    while time.monotonic() < deadline:
        raw = make(i)
        i += 1
        t0 = time.monotonic()
        try:
            status = await request(host, port, raw)
            if status >= 500 or status in (0, 429):
                errors.append(status)
            latencies.append((time.monotonic() - t0) * 1000)
        except (OSError, asyncio.TimeoutError):
            errors.append("error")
        nxt += interval
        await asyncio.sleep(max(0.0, nxt - time.monotonic()))


async def rss_sampler(pid, deadline, samples):
    while time.monotonic() < deadline:
        samples.append(status_kb(pid, "VmRSS:"))
        await asyncio.sleep(0.1)


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
    ap.add_argument("--pid", type=int, required=True, help="the server's pid")
    ap.add_argument("--token", required=True, help="an operator bearer token")
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--attackers", type=int, default=256)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--rate", type=float, default=10, help="legitimate requests/s per kind")
    a = ap.parse_args()
    host, port = a.url.removeprefix("http://").rsplit(":", 1)
    if not host.startswith("127."):
        sys.exit("login_attack.py: loopback targets only")
    port = int(port)

    # Baseline: the legitimate traffic alone.
    def poll(i):
        d = random.randrange(a.devices)
        return http("GET", "/api/v1/device/poll", [f"Authorization: Bearer kxd_bench_{d:06d}"])

    def operator(i):
        return http("GET", "/api/v1/releases", [f"Authorization: Bearer {a.token}"])

    out = {"attackers": a.attackers, "duration_secs": a.duration, "rate": a.rate}
    for phase in ("baseline", "attack"):
        deadline = time.monotonic() + (a.duration if phase == "attack" else min(a.duration, 5))
        polls, ops, errs_p, errs_o, rss, counts = [], [], [], [], [], {}
        tasks = [
            sampler(host, port, deadline, a.rate, poll, polls, errs_p),
            sampler(host, port, deadline, a.rate, operator, ops, errs_o),
            rss_sampler(a.pid, deadline, rss),
        ]
        if phase == "attack":
            tasks += [attacker(n, host, port, deadline, counts) for n in range(a.attackers)]
        await asyncio.gather(*tasks)
        out[phase] = {
            "poll_p50_ms": percentile(polls, 50),
            "poll_p99_ms": percentile(polls, 99),
            "poll_requests": len(polls),
            "poll_errors": len(errs_p),
            "operator_p50_ms": percentile(ops, 50),
            "operator_p99_ms": percentile(ops, 99),
            "operator_requests": len(ops),
            "operator_errors": len(errs_o),
            "rss_max_mb": max(rss) / 1024 if rss else None,
            "login_answers": {str(k): v for k, v in sorted(counts.items(), key=str)},
        }
    out["vmhwm_mb"] = status_kb(a.pid, "VmHWM:") / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
