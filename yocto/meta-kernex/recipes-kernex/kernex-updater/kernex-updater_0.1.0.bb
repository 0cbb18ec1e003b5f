SUMMARY = "Kernex updater: A/B OTA installs, boot health watchdog, control-plane agent"
DESCRIPTION = "kernex-updater installs signed Kernex releases into the inactive \
               A/B slot, runs the health watchdog after a trial boot and talks to the \
               Kernex control plane."
HOMEPAGE = "https://github.com/kernex-ota/kernex"
BUGTRACKER = "https://github.com/kernex-ota/kernex/issues"
SECTION = "admin"
LICENSE = "Apache-2.0"
CVE_PRODUCT = "kernex"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

require kernex-source.inc
require kernex-crates.inc

inherit cargo cargo-update-recipe-crates systemd update-rc.d

# The workspace member to build (Cargo.lock is the workspace's).
CARGO_SRC_DIR = "updater"

DEPENDS += "openssl"

# The cargo features, from PACKAGECONFIG:
# - llm (on by default, as in a plain `cargo build --release`): the health
#   watchdog's `llm` check. llama.cpp is built by llama-cpp-sys-2's build
#   script with cmake and bindgen (libclang: clang-native, from meta-clang
#   before styhead). `PACKAGECONFIG:remove:pn-kernex-updater = "llm"` builds
#   without it (an `llm` check in a manifest then fails with that reason).
# - tpm: `kernex-updater attest` (TPM identity, slot measurement, quotes),
#   links tpm2-tss (meta-security's meta-tpm).
# oe-core's cargo class has no feature list of its own: the features go on
# its cargo command line, defaults off and the chosen ones on.
PACKAGECONFIG ??= "llm"
PACKAGECONFIG[llm] = ",,cmake-native clang-native"
PACKAGECONFIG[tpm] = ",,tpm2-tss"
KERNEX_CARGO_FEATURES = "${@' '.join(f for f in ['llm', 'tpm'] if bb.utils.contains('PACKAGECONFIG', f, True, False, d))}"
CARGO_BUILD_FLAGS:append = " --no-default-features --features '${KERNEX_CARGO_FEATURES}'"
# bindgen (llm) finds libclang in the native sysroot and parses llama.cpp's
# headers for the target.
export LIBCLANG_PATH = "${@bb.utils.contains('PACKAGECONFIG', 'llm', '${STAGING_LIBDIR_NATIVE}', '', d)}"
export BINDGEN_EXTRA_CLANG_ARGS = "${@bb.utils.contains('PACKAGECONFIG', 'llm', '--sysroot=${STAGING_DIR_TARGET} --target=${HOST_SYS}', '', d)}"

# Trusted CA certificates (PEM) releases must be signed under: installed
# as /etc/kernex/keyring.pem. Required.
KERNEX_KEYRING ??= ""
# Where the data partition is mounted (disk create's [device] data-mount):
# /etc/kernex/system.toml links to the config provisioning writes there.
KERNEX_DATA_MOUNT ?= "/data"

SYSTEMD_SERVICE:${PN} = "kernex-updater.service"
INITSCRIPT_NAME = "kernex-updater"
INITSCRIPT_PARAMS = "defaults 90"

python do_check_keyring() {
    path = d.getVar("KERNEX_KEYRING")
    if not path or not os.path.isfile(path):
        bb.fatal("kernex-updater: set KERNEX_KEYRING to the CA certificate(s) (PEM) releases are signed under")
}
addtask check_keyring before do_install after do_compile
do_check_keyring[doc] = "Fails early when KERNEX_KEYRING is not set to a PEM file"
do_check_keyring[file-checksums] += "${KERNEX_KEYRING}:True"

do_install:append() {
    install -d ${D}${sysconfdir}/kernex
    install -m 0644 ${KERNEX_KEYRING} ${D}${sysconfdir}/kernex/keyring.pem
    # The config lives on the data partition (written by `kernex-image disk
    # create`, completed by `kernex-image provision`).
    ln -sf ${KERNEX_DATA_MOUNT}/etc/kernex/system.toml ${D}${sysconfdir}/kernex/system.toml
    install -d ${D}${KERNEX_DATA_MOUNT}
    if ${@bb.utils.contains('DISTRO_FEATURES', 'systemd', 'true', 'false', d)}; then
        install -d ${D}${systemd_system_unitdir}
        install -m 0644 ${S}/updater/init/kernex-updater.service ${D}${systemd_system_unitdir}/
    fi
    if ${@bb.utils.contains('DISTRO_FEATURES', 'sysvinit', 'true', 'false', d)}; then
        install -d ${D}${sysconfdir}/init.d
        install -m 0755 ${S}/updater/init/S90kernex-updater ${D}${sysconfdir}/init.d/kernex-updater
    fi
}

FILES:${PN} += "${KERNEX_DATA_MOUNT}"
RDEPENDS:${PN} += "libubootenv-bin"
