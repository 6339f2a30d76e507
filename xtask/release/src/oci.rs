//! Packs a `.wasm` filter into an OCI image layout on disk, in the Wasm OCI artifact spec's
//! *compat* variant that Istio's wasm image fetcher (`pkg/wasm/imagefetcher.go`,
//! `extractOCIStandardImage`) accepts:
//!
//! - one layer, `application/vnd.oci.image.layer.v1.tar+gzip`, a tar holding `plugin.wasm`;
//! - an image config, `application/vnd.oci.image.config.v1+json` (`os: wasip1`,
//!   `architecture: wasm`, the layer's diff id);
//! - an OCI manifest and an `index.json` naming it with `org.opencontainers.image.ref.name`,
//!   so `skopeo copy oci:DIR:TAG docker://…`, `oras cp --from-oci-layout DIR:TAG …` and
//!   `crane push DIR …` push it unchanged.
//!
//! Everything is deterministic — fixed tar header (mtime 0, uid/gid 0, mode 0644, ustar),
//! gzip header without mtime or name, JSON from structs with a fixed field order — so the same
//! `.wasm` always gives the same manifest digest (for a given `Cargo.lock`: the gzip bytes
//! come from `flate2`'s backend). That digest is what a WasmPlugin's `sha256` must hold for an
//! `oci://` URL: Istio compares it with the pulled image's manifest digest (`pkg/wasm/cache.go`).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use flate2::{Compression, GzBuilder};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// Media type of the image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of the image index (`index.json`).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of the image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of the single layer (the compat variant's gzipped tar).
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The file name Istio looks for inside the layer.
pub const PLUGIN_FILE_NAME: &str = "plugin.wasm";
/// Annotation carrying the tag in `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Why packing failed.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The input does not start with the wasm magic number; Istio would refuse it.
    #[error("the input is not a WebAssembly module (no `\\0asm` header); pass the built .wasm")]
    NotWasm,
    /// The input does not start with the ELF magic number; no runtime could execute it.
    #[error(
        "the input is not an ELF executable (no `\\x7fELF` header); pass the built control-plane binary"
    )]
    NotElf,
    /// The tag is not a valid OCI tag.
    #[error(
        "`{0}` is not a valid image tag: use 1..=128 of [A-Za-z0-9_.-], not starting with . or -"
    )]
    InvalidTag(String),
    /// The output directory holds something other than an OCI layout; nothing was written.
    #[error(
        "{} exists and is not an OCI image layout (no oci-layout file); choose an empty or new directory",
        .0.display()
    )]
    NotALayout(PathBuf),
    /// Reading or writing the layout failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// A `sha256:<hex>` content digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256Digest(String);

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let hash = Sha256::digest(bytes);
        let mut hex = String::with_capacity(64);
        for byte in hash {
            hex.push_str(&format!("{byte:02x}"));
        }
        Self(hex)
    }

    /// The 64 lowercase hex characters (what a WasmPlugin's `sha256` holds).
    pub fn hex(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The blob's media type.
    pub media_type: &'static str,
    /// The blob's digest.
    pub digest: Sha256Digest,
    /// The blob's size in bytes.
    pub size: u64,
    /// Annotations; omitted when empty.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<&'static str, String>,
}

impl Descriptor {
    fn of(media_type: &'static str, blob: &[u8]) -> Self {
        Self {
            media_type,
            digest: Sha256Digest::of(blob),
            size: blob.len() as u64,
            annotations: BTreeMap::new(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    schema_version: u32,
    media_type: &'static str,
    config: &'a Descriptor,
    layers: [&'a Descriptor; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Index<'a> {
    schema_version: u32,
    media_type: &'static str,
    manifests: [&'a Descriptor; 1],
}

#[derive(Serialize)]
struct ImageConfig<'a> {
    architecture: &'static str,
    os: &'static str,
    rootfs: RootFs<'a>,
}

/// The image config's `rootfs`: the diff ids (uncompressed digests) of the layers.
#[derive(Serialize)]
pub(crate) struct RootFs<'a> {
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) diff_ids: [&'a Sha256Digest; 1],
}

/// What [`pack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedImage {
    /// The layout directory.
    pub layout: PathBuf,
    /// The tag recorded in `index.json`.
    pub tag: String,
    /// The manifest's descriptor; its digest is the image digest a WasmPlugin's `sha256` pins.
    pub manifest: Descriptor,
    /// The config blob's descriptor.
    pub config: Descriptor,
    /// The layer blob's descriptor.
    pub layer: Descriptor,
    /// sha256 of the `.wasm` itself (what a `file://` or `https://` WasmPlugin URL would pin).
    pub wasm_sha256: Sha256Digest,
}

/// Writes `wasm` as a compat-variant Wasm image, tagged `tag`, into the OCI layout `out`.
///
/// `out` is created if missing; if it already is an OCI layout its `index.json` and blobs are
/// replaced, and any other non-empty directory is refused untouched. The same `wasm` and `tag`
/// always produce byte-identical blobs.
pub fn pack(wasm: &[u8], tag: &str, out: &Path) -> Result<PackedImage, OciError> {
    if !wasm.starts_with(b"\0asm") {
        return Err(OciError::NotWasm);
    }
    if !is_valid_tag(tag) {
        return Err(OciError::InvalidTag(tag.to_owned()));
    }
    prepare_layout_dir(out)?;

    let tar =
        plugin_tar(wasm).map_err(|source| io_error("building the layer tar for", out, source))?;
    let layer_blob =
        gzip(&tar).map_err(|source| io_error("compressing the layer for", out, source))?;
    let diff_id = Sha256Digest::of(&tar);
    let config_blob = to_json(&ImageConfig {
        architecture: "wasm",
        os: "wasip1",
        rootfs: RootFs {
            kind: "layers",
            diff_ids: [&diff_id],
        },
    });
    let [manifest, config, layer] = write_image(out, tag, &config_blob, &layer_blob)?;

    Ok(PackedImage {
        layout: out.to_path_buf(),
        tag: tag.to_owned(),
        manifest,
        config,
        layer,
        wasm_sha256: Sha256Digest::of(wasm),
    })
}

/// Writes an image of one config and one tar+gzip layer into the prepared layout `out`: the
/// blobs, a manifest, and an `index.json` naming it `tag`. Returns the descriptors of the
/// manifest (annotated with the tag), the config and the layer.
pub(crate) fn write_image(
    out: &Path,
    tag: &str,
    config_blob: &[u8],
    layer_blob: &[u8],
) -> Result<[Descriptor; 3], OciError> {
    let config = Descriptor::of(CONFIG_MEDIA_TYPE, config_blob);
    let layer = Descriptor::of(LAYER_MEDIA_TYPE, layer_blob);
    let manifest_blob = to_json(&Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE,
        config: &config,
        layers: [&layer],
    });
    let mut manifest = Descriptor::of(MANIFEST_MEDIA_TYPE, &manifest_blob);
    for (descriptor, blob) in [
        (&config, config_blob),
        (&layer, layer_blob),
        (&manifest, manifest_blob.as_slice()),
    ] {
        write(&blob_path(out, &descriptor.digest), blob)?;
    }
    manifest
        .annotations
        .insert(REF_NAME_ANNOTATION, tag.to_owned());
    let index = to_json(&Index {
        schema_version: 2,
        media_type: INDEX_MEDIA_TYPE,
        manifests: [&manifest],
    });
    write(&out.join("index.json"), &index)?;
    write(
        &out.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok([manifest, config, layer])
}

/// Where the blob with `digest` lives in the layout `root`.
pub fn blob_path(root: &Path, digest: &Sha256Digest) -> PathBuf {
    root.join("blobs").join("sha256").join(digest.hex())
}

/// The OCI distribution spec's tag grammar: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub(crate) fn is_valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphanumeric() || first == '_')
        && tag.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Creates `out`, or clears the blobs and index of an existing layout; refuses anything else.
pub(crate) fn prepare_layout_dir(out: &Path) -> Result<(), OciError> {
    if out.join("oci-layout").is_file() {
        let blobs = out.join("blobs");
        if blobs.exists() {
            fs::remove_dir_all(&blobs).map_err(|source| io_error("removing", &blobs, source))?;
        }
    } else if out.exists() {
        let mut entries = fs::read_dir(out).map_err(|source| io_error("reading", out, source))?;
        if entries.next().is_some() {
            return Err(OciError::NotALayout(out.to_path_buf()));
        }
    }
    let sha256 = out.join("blobs").join("sha256");
    fs::create_dir_all(&sha256).map_err(|source| io_error("creating", &sha256, source))
}

/// A tar with one regular file, `plugin.wasm`, and a header that does not depend on the
/// machine or the time of the build.
fn plugin_tar(wasm: &[u8]) -> io::Result<Vec<u8>> {
    let mut header = tar::Header::new_ustar();
    header.set_path(PLUGIN_FILE_NAME)?;
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(wasm.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, wasm)?;
    builder.into_inner()
}

/// gzip at the best level, with no file name and mtime 0 in the header.
pub(crate) fn gzip(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), Compression::best());
    encoder.write_all(bytes)?;
    encoder.finish()
}

/// `value` as compact JSON (field order fixed by the struct).
pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("OCI documents are plain structs of strings and numbers")
}

/// Writes `bytes` to `path`.
pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<(), OciError> {
    fs::write(path, bytes).map_err(|source| io_error("writing", path, source))
}

/// An [`OciError::Io`] for `action` on `path`.
pub(crate) fn io_error(action: &'static str, path: &Path, source: io::Error) -> OciError {
    OciError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
