#!/usr/bin/env python3
"""A small HTTP/1.1 file server with Range support and keep-alive, for
bench/delta.sh (python3 -m http.server ignores Range).

Usage: range_server.py DIR LOG [ADDRESS]   -- prints the port it listens
on (chosen by the OS) at ADDRESS (default 127.0.0.1), then serves DIR. For every response it
appends "PATH FIRST-BYTE BODY-BYTES-SENT" to LOG, so the bench counts what
each client really downloaded.
"""
import os
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.realpath(sys.argv[1])
LOG = open(sys.argv[2], "a", buffering=1)
RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.serve(body=False)

    def do_GET(self):
        self.serve(body=True)

    def serve(self, body):
        path = os.path.realpath(os.path.join(ROOT, self.path.split("?")[0].lstrip("/")))
        if not path.startswith(ROOT + os.sep) or not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = os.path.getsize(path)
        start, end, status = 0, size, 200
        m = RANGE.match(self.headers.get("Range", "").strip())
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)) + 1, size) if m.group(2) else size
            else:  # suffix range: the last N bytes
                start = max(size - int(m.group(2)), 0)
            if start >= size or start >= end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        sent = 0
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start
                try:
                    while left:
                        data = f.read(min(left, 1 << 16))
                        if not data:
                            break
                        self.wfile.write(data)
                        sent += len(data)
                        left -= len(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
        LOG.write(f"{self.path} {start} {sent}\n")


server = ThreadingHTTPServer((sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
