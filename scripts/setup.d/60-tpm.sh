# TPM-rooted identity and attestation (attest/, `kernex-updater attest`):
# - libtss2-dev: tpm2-tss (ESAPI, MU, TCTI loaders) that the `tss-esapi`
#   crate links (Debian 12 ships 3.2.1: tss-esapi 7.x, not the 8.0 alphas).
#   tss-esapi-sys runs pkg-config (10-bundle.sh installs it).
# - swtpm, swtpm-tools: the software TPM each test starts (swtpm socket) and
#   the manufacturer-style provisioning of its EK certificate (swtpm_setup).
# - tpm2-tools: the independent peers the tests cross-check against
#   (tpm2_checkquote verifies our quotes, tpm2_pcrread reads our extends).
need_apt /usr/include/tss2/tss2_esys.h libtss2-dev
need_apt swtpm swtpm
need_apt swtpm_setup swtpm-tools
need_apt tpm2_checkquote tpm2-tools
