//! The OCI image `cargo xtask oci` writes, read back the way Istio's image fetcher reads it
//! (index → manifest → config and the single tar+gzip layer holding `plugin.wasm`), with
//! every digest and size checked against the blobs; its determinism; and the WasmPlugin
//! rendered for it pinning its manifest digest.

use std::{io::Read, path::Path};

use anyhow::{Context, Result, bail, ensure};
use fulcrum_release::oci::{self, OciError};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::test_support::{filter_wasm, rendered_template};

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads the blob a descriptor names and checks its digest and size.
pub fn blob(layout: &Path, descriptor: &Value) -> Result<Vec<u8>> {
    let digest = descriptor["digest"].as_str().context("descriptor digest")?;
    let hex = digest.strip_prefix("sha256:").context("sha256 digest")?;
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex))
        .with_context(|| format!("blob {digest}"))?;
    ensure!(
        sha256_hex(&bytes) == hex,
        "blob {digest} does not hash to its name"
    );
    ensure!(
        descriptor["size"].as_u64() == Some(bytes.len() as u64),
        "blob {digest}: descriptor size {} but {} bytes",
        descriptor["size"],
        bytes.len()
    );
    Ok(bytes)
}

/// What Istio would load from the layout: the manifest digest and `plugin.wasm`.
fn read_as_istio_would(layout: &Path, tag: &str) -> Result<(String, Vec<u8>)> {
    let oci_layout: Value = serde_json::from_slice(&std::fs::read(layout.join("oci-layout"))?)?;
    ensure!(oci_layout["imageLayoutVersion"] == "1.0.0");
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    ensure!(index["schemaVersion"] == 2);
    ensure!(index["mediaType"] == oci::INDEX_MEDIA_TYPE);
    let [descriptor] = index["manifests"]
        .as_array()
        .context("manifests")?
        .as_slice()
    else {
        bail!("index.json must name exactly one manifest");
    };
    ensure!(descriptor["mediaType"] == oci::MANIFEST_MEDIA_TYPE);
    ensure!(descriptor["annotations"][oci::REF_NAME_ANNOTATION] == tag);
    let manifest_bytes = blob(layout, descriptor)?;
    let manifest: Value = serde_json::from_slice(&manifest_bytes)?;
    ensure!(manifest["schemaVersion"] == 2);
    ensure!(manifest["mediaType"] == oci::MANIFEST_MEDIA_TYPE);
    ensure!(manifest["config"]["mediaType"] == oci::CONFIG_MEDIA_TYPE);
    let config: Value = serde_json::from_slice(&blob(layout, &manifest["config"])?)?;
    let [layer] = manifest["layers"].as_array().context("layers")?.as_slice() else {
        bail!("the compat variant has exactly one layer");
    };
    ensure!(layer["mediaType"] == oci::LAYER_MEDIA_TYPE);
    let compressed = blob(layout, layer)?;
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(compressed.as_slice()).read_to_end(&mut tar_bytes)?;
    ensure!(
        config["rootfs"]["diff_ids"][0] == format!("sha256:{}", sha256_hex(&tar_bytes)),
        "the config's diff id is the uncompressed layer's digest"
    );
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut plugin = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry
            .path()?
            .file_name()
            .is_some_and(|name| name == oci::PLUGIN_FILE_NAME)
        {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            plugin = Some(bytes);
        }
    }
    let digest = descriptor["digest"].as_str().context("digest")?.to_owned();
    Ok((digest, plugin.context("plugin.wasm not in the layer")?))
}

#[test]
fn packed_filter_reads_back_as_istio_reads_it() -> Result<()> {
    let wasm = filter_wasm()?;
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("fulcrum-balancer");
    let image = oci::pack(wasm, "0.1.0", &layout)?;
    let (digest, plugin) = read_as_istio_would(&layout, "0.1.0")?;
    assert_eq!(digest, image.manifest.digest.to_string());
    assert!(plugin == wasm, "plugin.wasm differs from the input");
    assert_eq!(image.wasm_sha256.hex(), sha256_hex(wasm));
    Ok(())
}

#[test]
fn packing_is_deterministic_and_repacking_replaces_the_layout() -> Result<()> {
    let wasm = filter_wasm()?;
    let dir = tempfile::tempdir()?;
    let first = oci::pack(wasm, "0.1.0", &dir.path().join("a"))?;
    let second = oci::pack(wasm, "0.1.0", &dir.path().join("b"))?;
    assert_eq!(first.manifest.digest, second.manifest.digest);
    let other = oci::pack(b"\0asm\x01\0\0\0", "0.1.0", &dir.path().join("a"))?;
    assert_ne!(other.manifest.digest, first.manifest.digest);
    let blobs = std::fs::read_dir(dir.path().join("a/blobs/sha256"))?.count();
    assert_eq!(blobs, 3, "config, layer and manifest of the new image only");
    read_as_istio_would(&dir.path().join("a"), "0.1.0")?;
    Ok(())
}

#[test]
fn rendered_wasmplugin_pins_the_manifest_digest_of_the_built_filter() -> Result<()> {
    let wasm = filter_wasm()?;
    let dir = tempfile::tempdir()?;
    let image = oci::pack(wasm, "0.1.0", &dir.path().join("image"))?;
    let (digest, _) = read_as_istio_would(&dir.path().join("image"), "0.1.0")?;
    let plugin = rendered_template(
        "wasmplugin",
        "registry.example/fulcrum-balancer:0.1.0",
        image.manifest.digest.hex(),
    )?;
    assert_eq!(
        plugin.value["spec"]["url"],
        "oci://registry.example/fulcrum-balancer:0.1.0"
    );
    assert_eq!(
        format!(
            "sha256:{}",
            plugin.value["spec"]["sha256"].as_str().context("sha256")?
        ),
        digest
    );
    Ok(())
}

#[test]
fn packing_refuses_non_wasm_input_bad_tags_and_foreign_directories() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    assert!(matches!(
        oci::pack(b"MZ not wasm", "1", &out),
        Err(OciError::NotWasm)
    ));
    assert!(matches!(
        oci::pack(b"\0asm\x01\0\0\0", "-bad", &out),
        Err(OciError::InvalidTag(_))
    ));
    std::fs::create_dir(&out)?;
    std::fs::write(out.join("notes.txt"), "keep me")?;
    assert!(matches!(
        oci::pack(b"\0asm\x01\0\0\0", "1", &out),
        Err(OciError::NotALayout(_))
    ));
    assert_eq!(std::fs::read_to_string(out.join("notes.txt"))?, "keep me");
    Ok(())
}
