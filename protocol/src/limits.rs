//! Size limits for everything the protocol parses.
//!
//! Every length read from a bundle, an index or an archive header is checked
//! against one of these before anything is allocated, so a hostile or corrupt
//! file can at worst be rejected, never exhaust memory.

/// Largest accepted manifest (JSON bytes).
pub const MAX_MANIFEST_SIZE: u64 = 64 * 1024;
/// Largest accepted detached signature (DER bytes).
pub const MAX_SIGNATURE_SIZE: u64 = 64 * 1024;
/// Most images (slot classes) one bundle may carry.
pub const MAX_IMAGES: usize = 8;
/// Largest image (slot content) a bundle may describe: 16 TiB.
pub const MAX_IMAGE_SIZE: u64 = 1 << 44;
/// Longest `compatible` string.
pub const MAX_COMPATIBLE_LEN: usize = 64;
/// Largest manifest `security-version` (fits the server's signed 64-bit
/// columns and a device's floor files with room to spare).
pub const MAX_SECURITY_VERSION: u64 = u32::MAX as u64;
/// Most free-form metadata entries in a manifest.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key.
pub const MAX_METADATA_KEY_LEN: usize = 64;
/// Longest metadata value.
pub const MAX_METADATA_VALUE_LEN: usize = 4096;
/// Largest chunk (uncompressed) any index or archive may describe: 16 MiB,
/// bita's own maximum chunk size.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Largest bita archive: its header plus chunk data, which is never larger
/// than the image (a chunk that does not compress is stored raw).
pub const MAX_ARCHIVE_SIZE: u64 = MAX_ARCHIVE_HEADER_SIZE + MAX_IMAGE_SIZE;
/// Largest chunk index file.
pub const MAX_INDEX_SIZE: u64 = 256 * 1024 * 1024;
/// Most pages one chunk index may have.
pub const MAX_INDEX_PAGES: u32 = 1 << 20;
/// Largest single index page.
pub const MAX_INDEX_PAGE_SIZE: u32 = 1024 * 1024;
/// Largest bita archive header (magic, dictionary, offset, checksum).
pub const MAX_ARCHIVE_HEADER_SIZE: u64 = 512 * 1024 * 1024;
/// Shortest chunk hash the protocol accepts, in bytes (see `index` for why 16
/// is the default and 12 the floor).
pub const MIN_CHUNK_HASH_LEN: u8 = 12;
/// Longest chunk hash (a full BLAKE2b-512 digest).
pub const MAX_CHUNK_HASH_LEN: u8 = 64;
/// Most health checks in one health spec.
pub const MAX_HEALTH_CHECKS: usize = 32;
/// Longest string in a health check (URL, name, argument, prompt).
pub const MAX_HEALTH_STRING_LEN: usize = 4096;
/// Most arguments of a health check command.
pub const MAX_HEALTH_ARGS: usize = 64;
/// Longest duration in a health spec, seconds (one day).
pub const MAX_HEALTH_SECONDS: u64 = 86_400;
/// Most tokens an `llm` health check may ask to generate.
pub const MAX_HEALTH_LLM_TOKENS: u32 = 4096;
/// Most chunk patches (one per older release) an image may carry.
pub const MAX_PATCHES: usize = 16;
/// Largest patch table (header and entries).
pub const MAX_PATCH_TABLE_SIZE: u64 = 64 * 1024 * 1024;
/// Most base-image ranges one patched chunk refers to.
pub const MAX_PATCH_REFS: usize = 4;
/// Most base-image bytes one patched chunk refers to (the zstd prefix a
/// device holds in memory while decoding it).
pub const MAX_PATCH_REF_BYTES: u32 = 1024 * 1024;
