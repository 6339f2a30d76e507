//! Packs the control-plane binary into a container image, as an OCI image layout on disk —
//! what `cargo xtask image` writes and `skopeo copy oci:…`, `oras cp --from-oci-layout` or
//! `crane push` push to a registry. No container engine is involved.
//!
//! The binary is a static (musl) executable, so the image holds nothing else: one
//! `application/vnd.oci.image.layer.v1.tar+gzip` layer with `usr/local/bin/` and the binary
//! ([`ENTRYPOINT`]), and a `linux/amd64` config running it as the non-root user
//! [`USER`] with the control plane's ports exposed and the `org.opencontainers.image.*`
//! labels. Like the filter's image ([`crate::oci`]) it is deterministic: fixed tar headers
//! (mtime 0, root-owned), gzip without mtime, no `created` time, so the same binary and
//! labels always give the same digest.

use std::{collections::BTreeMap, path::Path};

use serde::Serialize;

use crate::oci::{
    self, Descriptor, OciError, RootFs, Sha256Digest, gzip, io_error, prepare_layout_dir, to_json,
    write_image,
};

/// Where the binary lives in the image; the image's entrypoint.
pub const ENTRYPOINT: &str = "/usr/local/bin/fulcrum-control-plane";
/// The user the image runs as (distroless' `nonroot`), matching the Deployment's
/// `runAsUser`/`runAsGroup`.
pub const USER: &str = "65532:65532";
/// The control plane's ports: xDS gRPC, registry gRPC, HTTP (snapshot, registry REST,
/// health, metrics).
pub const EXPOSED_PORTS: [u16; 3] = [18000, 18001, 18080];
/// Label naming the source repository.
pub const SOURCE_LABEL: &str = "org.opencontainers.image.source";
/// Label naming the version.
pub const VERSION_LABEL: &str = "org.opencontainers.image.version";
/// Label naming the source revision (commit).
pub const REVISION_LABEL: &str = "org.opencontainers.image.revision";

/// What the image says about where it comes from (its `org.opencontainers.image.*` labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// The source repository URL.
    pub source: String,
    /// The control plane's version.
    pub version: String,
    /// The commit it was built from (`-dirty` when the checkout had changes).
    pub revision: String,
}

/// What [`pack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedImage {
    /// The tag recorded in `index.json`.
    pub tag: String,
    /// The manifest's descriptor; its digest is the image digest to deploy by.
    pub manifest: Descriptor,
    /// The config blob's descriptor.
    pub config: Descriptor,
    /// The layer blob's descriptor.
    pub layer: Descriptor,
}

#[derive(Serialize)]
struct ImageConfig<'a> {
    architecture: &'static str,
    os: &'static str,
    config: RuntimeConfig<'a>,
    rootfs: RootFs<'a>,
}

/// The OCI image config's `config` (execution parameters), in its PascalCase field names.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RuntimeConfig<'a> {
    user: &'static str,
    entrypoint: [&'static str; 1],
    exposed_ports: BTreeMap<String, Empty>,
    env: [&'static str; 1],
    working_dir: &'static str,
    labels: BTreeMap<&'static str, &'a str>,
}

/// `{}`, the value of each exposed port.
#[derive(Serialize)]
struct Empty {}

/// Writes `binary` as a container image tagged `tag` into the OCI layout `out`.
///
/// `out` is created if missing; if it already is an OCI layout its `index.json` and blobs are
/// replaced, and any other non-empty directory is refused untouched.
pub fn pack(
    binary: &[u8],
    provenance: &Provenance,
    tag: &str,
    out: &Path,
) -> Result<PackedImage, OciError> {
    if !binary.starts_with(b"\x7fELF") {
        return Err(OciError::NotElf);
    }
    if !oci::is_valid_tag(tag) {
        return Err(OciError::InvalidTag(tag.to_owned()));
    }
    prepare_layout_dir(out)?;
    let tar =
        binary_tar(binary).map_err(|source| io_error("building the layer tar for", out, source))?;
    let layer_blob =
        gzip(&tar).map_err(|source| io_error("compressing the layer for", out, source))?;
    let diff_id = Sha256Digest::of(&tar);
    let config_blob = to_json(&ImageConfig {
        architecture: "amd64",
        os: "linux",
        config: RuntimeConfig {
            user: USER,
            entrypoint: [ENTRYPOINT],
            exposed_ports: EXPOSED_PORTS
                .iter()
                .map(|port| (format!("{port}/tcp"), Empty {}))
                .collect(),
            env: ["PATH=/usr/local/bin"],
            working_dir: "/",
            labels: BTreeMap::from([
                (SOURCE_LABEL, provenance.source.as_str()),
                (VERSION_LABEL, provenance.version.as_str()),
                (REVISION_LABEL, provenance.revision.as_str()),
            ]),
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: [&diff_id],
        },
    });
    let [manifest, config, layer] = write_image(out, tag, &config_blob, &layer_blob)?;
    Ok(PackedImage {
        tag: tag.to_owned(),
        manifest,
        config,
        layer,
    })
}

/// A tar with the directories of [`ENTRYPOINT`] and the executable, root-owned (the user
/// cannot modify it), with headers that do not depend on the machine or the time.
fn binary_tar(binary: &[u8]) -> std::io::Result<Vec<u8>> {
    let path = ENTRYPOINT.trim_start_matches('/');
    let mut builder = tar::Builder::new(Vec::new());
    let mut directory = String::new();
    for component in path.split('/').take(path.split('/').count() - 1) {
        directory.push_str(component);
        directory.push('/');
        let mut header = fixed_header(tar::EntryType::Directory, 0o755, 0);
        header.set_path(&directory)?;
        header.set_cksum();
        builder.append(&header, std::io::empty())?;
    }
    let mut header = fixed_header(tar::EntryType::Regular, 0o755, binary.len() as u64);
    header.set_path(path)?;
    header.set_cksum();
    builder.append(&header, binary)?;
    builder.into_inner()
}

fn fixed_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}
