#!/usr/bin/env bash
# Attestation benchmark (prints numbers; it is not a test): quote round trip
# against a real swtpm (nonce -> TPM2_Quote with the AK loaded under the EK
# -> verify), credential activation round trip, and the verifier's
# throughput on one core. Needs swtpm/swtpm_setup (scripts/setup).
#
# Usage: bench/attest.sh          (BENCH_ROUNDS=50 BENCH_VERIFY_SECS=3)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."
# One core for the verifier figure: pin the whole run to CPU 0.
exec taskset -c 0 cargo bench --locked -q -p kernex-attest --bench attest
