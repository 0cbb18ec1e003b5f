#!/usr/bin/env python3
"""A point-to-point link emulator for bench/delta.sh, for kernels built
without sch_netem: what `tc qdisc add ... netem delay D rate R loss L limit N`
on both ends of a veth pair does, in user space between two TUN devices.

Usage: link_emu.py NAME_A NAME_B DELAY_MS RATE_BIT_S LOSS_PERCENT [LIMIT_PACKETS] [SEED]

Creates the TUN devices NAME_A and NAME_B (IFF_TUN, no packet info), prints
"ready", then forwards every IP packet read from one to the other. Each
direction has its own serialiser at RATE_BIT_S (a packet leaves when the
link has sent the ones before it), then DELAY_MS of propagation delay; a
packet is dropped with probability LOSS_PERCENT / 100 (a seeded PRNG, so
runs repeat), or when LIMIT_PACKETS (default 1000, netem's) are already
queued in its direction. The caller moves the devices into its network
namespaces and gives them addresses. Ends on SIGTERM or SIGINT.
"""
import collections
import fcntl
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name):
    if not 0 < len(name) < 16:
        sys.exit(f"link_emu.py: bad interface name {name!r}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main():
    if len(sys.argv) not in (6, 7, 8):
        sys.exit(__doc__)
    name_a, name_b = sys.argv[1], sys.argv[2]
    delay = float(sys.argv[3]) / 1000.0
    rate = float(sys.argv[4])
    loss = float(sys.argv[5]) / 100.0
    limit = int(sys.argv[6]) if len(sys.argv) > 6 else 1000
    rng = random.Random(int(sys.argv[7]) if len(sys.argv) > 7 else 22)
    if rate <= 0 or delay < 0 or not 0 <= loss < 1 or limit < 1:
        sys.exit("link_emu.py: bad DELAY_MS, RATE_BIT_S, LOSS_PERCENT or LIMIT_PACKETS")
    fa, fb = open_tun(name_a), open_tun(name_b)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    # Per direction (from fd): destination fd, queue of (deliver_at, packet),
    # the time the serialiser is free, and counters.
    dirs = {
        fa: {"to": fb, "q": collections.deque(), "free": 0.0, "sent": 0, "lost": 0, "full": 0},
        fb: {"to": fa, "q": collections.deque(), "free": 0.0, "sent": 0, "lost": 0, "full": 0},
    }
    while True:
        now = time.monotonic()
        timeout = None
        for d in dirs.values():
            q = d["q"]
            while q and q[0][0] <= now:
                try:
                    os.write(d["to"], q.popleft()[1])
                    d["sent"] += 1
                except BlockingIOError:
                    pass  # the receiving stack's queue is full: a drop
                except OSError:
                    pass  # the device is down (namespace going away)
            if q:
                wait = q[0][0] - now
                timeout = wait if timeout is None else min(timeout, wait)
        readable, _, _ = select.select([fa, fb], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            d = dirs[fd]
            for _ in range(64):
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if loss and rng.random() < loss:
                    d["lost"] += 1
                    continue
                if len(d["q"]) >= limit:
                    d["full"] += 1
                    continue
                start = max(now, d["free"])
                d["free"] = start + len(pkt) * 8 / rate
                d["q"].append((d["free"] + delay, pkt))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
