SUMMARY = "kernex-image: Kernex root filesystem images, signed bundles, factory disk images"
DESCRIPTION = "Builds reproducible root filesystem images, signed Kernex bundles and \
               factory disk images (kernex-image disk create); used by kernex-bundle.bbclass \
               as a native tool."
HOMEPAGE = "https://github.com/kernex-ota/kernex"
BUGTRACKER = "https://github.com/kernex-ota/kernex/issues"
SECTION = "devel"
LICENSE = "Apache-2.0"
CVE_PRODUCT = "kernex"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

require recipes-kernex/kernex-updater/kernex-source.inc
require recipes-kernex/kernex-updater/kernex-crates.inc

inherit cargo cargo-update-recipe-crates

CARGO_SRC_DIR = "image-builder"

DEPENDS += "openssl"
# What disk create and rootfs run.
RDEPENDS:${PN} += "dosfstools e2fsprogs-e2fsck e2fsprogs-mke2fs mtools squashfs-tools"

BBCLASSEXTEND = "native"
