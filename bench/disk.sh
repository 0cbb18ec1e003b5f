#!/usr/bin/env bash
# Factory disk benchmark (prints numbers; it is not a test): the time to
# create a qemu-aarch64 disk image from a bundle of a ~200 MB root
# filesystem (signature, extraction with every chunk verified, FAT, env,
# ext4 data partition), and to `provision` it to a file target (write,
# read back, hash, identity into the data partition) against a local
# server that answers the pre-authorisation with 201.
#
# Usage: bench/disk.sh [--size MB] [--work-dir DIR]   (release build)
set -euo pipefail
cd "$(dirname "$0")/.."
size_mb=${BENCH_IMAGE_MB:-200}
work=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --size) size_mb=$2; shift 2 ;;
        --work-dir) work=$2; shift 2 ;;
        *) echo "usage: bench/disk.sh [--size MB] [--work-dir DIR]" >&2; exit 2 ;;
    esac
done
[[ -n $work ]] || work=$(mktemp -d)
mkdir -p "$work"
cargo build --release -q -p kernex-image
bin=${CARGO_TARGET_DIR:-target}/release/kernex-image
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# A root filesystem of about size_mb: half random (incompressible), half
# repetitive text, like binaries next to config and docs.
root=$work/root
rm -rf "$root"; mkdir -p "$root/usr/lib" "$root/etc"
head -c $((size_mb * 1024 * 1024 / 2)) /dev/urandom > "$root/usr/lib/blob.bin"
head -c $((size_mb * 1024 * 1024 / 2 - 4 * 1024 * 1024)) < <(yes "kernex factory benchmark line") > "$root/etc/text.conf"
"$bin" keys create --out "$work/keys" --force >/dev/null 2>&1
"$bin" rootfs "$root" --size $(((size_mb + 30) * 1024 * 1024)) --out "$work/rootfs.img" >/dev/null
"$bin" bundle create --compatible qemu-aarch64 --version 1.0.0 --rootfs "$work/rootfs.img" \
    --key "$work/keys/signing.key" --cert "$work/keys/signing.crt" --out "$work/r.kxb" >/dev/null
image_bytes=$(stat -c %s "$work/rootfs.img")

t0=$(now)
"$bin" disk create --board qemu-aarch64 --bundle "$work/r.kxb" --keyring "$work/keys/ca.crt" \
    --output "$work/disk.img" --json >/dev/null
t1=$(now)

# A one-route server: 201 for every pre-authorisation (python3's http.server).
port_file=$work/port
python3 - "$port_file" <<'PY' &
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        out = json.dumps({"id": "bench", "device_id": body["device_id"], "ek_fingerprint": None}).encode()
        self.send_response(201); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
open(sys.argv[1], "w").write(str(s.server_address[1]))
s.serve_forever()
PY
server_pid=$!
trap 'kill $server_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do [[ -s $port_file ]] && break; sleep 0.1; done
t2=$(now)
"$bin" provision --image "$work/disk.img" --target "$work/target.img" \
    --server "http://127.0.0.1:$(cat "$port_file")" --enroll-token kxe_bench \
    --api-token kxo_bench --device-id BENCH-1 --json >/dev/null
t3=$(now)

disk_bytes=$(stat -c %s "$work/disk.img")
echo "| step | input | time |"
echo "| --- | --- | --- |"
echo "| disk create (qemu-aarch64) | bundle of a $((image_bytes / 1048576)) MiB rootfs | $(secs "$t0" "$t1") s |"
echo "| provision to a file | $((disk_bytes / 1048576)) MiB disk image, no TPM | $(secs "$t2" "$t3") s |"
echo "(cores: $(nproc); work dir: $work)"
