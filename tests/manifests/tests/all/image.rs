//! The control plane's container image (`cargo xtask image`), read back as a container
//! runtime reads it: index → manifest → config and the tar+gzip layer, every digest and size
//! checked; the config runs the entrypoint as the non-root user with the ports and labels; the
//! layer's binary is the built one and runs once extracted; packing is deterministic.

use std::{io::Read, os::unix::fs::PermissionsExt, path::Path, process::Command};

use anyhow::{Context, Result, bail, ensure};
use fulcrum_release::{
    image::{self, Provenance},
    oci::{self, OciError},
};
use serde_json::Value;

use crate::{
    oci::{blob, sha256_hex},
    test_support::control_plane_binary,
};

fn provenance() -> Provenance {
    Provenance {
        source: "https://example.org/fulcrum".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        revision: "0123456789abcdef0123456789abcdef01234567".to_owned(),
    }
}

/// A file of the image's layer.
struct LayerFile {
    path: String,
    mode: u32,
    uid: u64,
    bytes: Vec<u8>,
}

/// The image config and the regular files of the single layer.
fn read_image(layout: &Path, tag: &str) -> Result<(Value, Vec<LayerFile>)> {
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    ensure!(index["mediaType"] == oci::INDEX_MEDIA_TYPE);
    let [descriptor] = index["manifests"]
        .as_array()
        .context("manifests")?
        .as_slice()
    else {
        bail!("index.json must name exactly one manifest");
    };
    ensure!(descriptor["annotations"][oci::REF_NAME_ANNOTATION] == tag);
    let manifest: Value = serde_json::from_slice(&blob(layout, descriptor)?)?;
    ensure!(manifest["schemaVersion"] == 2);
    ensure!(manifest["mediaType"] == oci::MANIFEST_MEDIA_TYPE);
    ensure!(manifest["config"]["mediaType"] == oci::CONFIG_MEDIA_TYPE);
    let config: Value = serde_json::from_slice(&blob(layout, &manifest["config"])?)?;
    let [layer] = manifest["layers"].as_array().context("layers")?.as_slice() else {
        bail!("the image has exactly one layer");
    };
    ensure!(layer["mediaType"] == oci::LAYER_MEDIA_TYPE);
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(blob(layout, layer)?.as_slice()).read_to_end(&mut tar_bytes)?;
    ensure!(
        config["rootfs"]["diff_ids"][0] == format!("sha256:{}", sha256_hex(&tar_bytes)),
        "the config's diff id is the uncompressed layer's digest"
    );
    let mut files = Vec::new();
    for entry in tar::Archive::new(tar_bytes.as_slice()).entries()? {
        let mut entry = entry?;
        if entry.header().entry_type().is_file() {
            let mut bytes = Vec::new();
            let path = entry.path()?.display().to_string();
            let (mode, uid) = (entry.header().mode()?, entry.header().uid()?);
            entry.read_to_end(&mut bytes)?;
            files.push(LayerFile {
                path,
                mode,
                uid,
                bytes,
            });
        }
    }
    Ok((config, files))
}

#[test]
fn packed_control_plane_runs_as_non_root_and_its_binary_runs_once_extracted() -> Result<()> {
    let binary = std::fs::read(control_plane_binary()?)?;
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("image");
    let packed = image::pack(&binary, &provenance(), "0.1.0", &layout)?;
    let (config, files) = read_image(&layout, "0.1.0")?;
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let runtime = &config["config"];
    assert_eq!(runtime["User"], "65532:65532");
    assert_eq!(
        runtime["Entrypoint"],
        serde_json::json!([image::ENTRYPOINT])
    );
    for port in ["18000/tcp", "18001/tcp", "18080/tcp"] {
        assert!(runtime["ExposedPorts"].get(port).is_some(), "{port}");
    }
    let labels = &runtime["Labels"];
    assert_eq!(labels[image::SOURCE_LABEL], "https://example.org/fulcrum");
    assert_eq!(labels[image::VERSION_LABEL], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        labels[image::REVISION_LABEL],
        "0123456789abcdef0123456789abcdef01234567"
    );

    let [file] = files.as_slice() else {
        bail!("the layer holds one file, the binary");
    };
    assert_eq!(format!("/{}", file.path), image::ENTRYPOINT);
    assert_eq!(file.mode, 0o755, "executable, not writable by the user");
    assert_eq!(file.uid, 0, "root-owned");
    assert!(file.bytes == binary, "the layer's binary is the built one");
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(packed.layer.digest.to_string().len(), 71);

    let extracted = dir.path().join("fulcrum-control-plane");
    std::fs::write(&extracted, &file.bytes)?;
    std::fs::set_permissions(&extracted, std::fs::Permissions::from_mode(file.mode))?;
    let version = Command::new(&extracted).arg("--version").output()?;
    ensure!(version.status.success(), "--version: {version:?}");
    assert_eq!(
        String::from_utf8(version.stdout)?.trim(),
        format!("fulcrum-control-plane {}", env!("CARGO_PKG_VERSION"))
    );
    let help = Command::new(&extracted).arg("--help").output()?;
    ensure!(help.status.success(), "--help: {help:?}");
    assert!(String::from_utf8(help.stdout)?.contains("--registry-token-file"));
    Ok(())
}

#[test]
fn packing_the_control_plane_is_deterministic_and_labels_change_the_digest() -> Result<()> {
    let binary = std::fs::read(control_plane_binary()?)?;
    let dir = tempfile::tempdir()?;
    let first = image::pack(&binary, &provenance(), "0.1.0", &dir.path().join("a"))?;
    let second = image::pack(&binary, &provenance(), "0.1.0", &dir.path().join("b"))?;
    assert_eq!(first.manifest.digest, second.manifest.digest);
    let other = Provenance {
        revision: "fedcba9876543210fedcba9876543210fedcba98".to_owned(),
        ..provenance()
    };
    let relabelled = image::pack(&binary, &other, "0.1.0", &dir.path().join("a"))?;
    assert_ne!(relabelled.manifest.digest, first.manifest.digest);
    assert_eq!(relabelled.layer.digest, first.layer.digest, "same layer");
    let blobs = std::fs::read_dir(dir.path().join("a/blobs/sha256"))?.count();
    assert_eq!(blobs, 3, "config, layer and manifest of the new image only");
    Ok(())
}

#[test]
fn packing_refuses_a_non_executable_and_a_bad_tag() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    assert!(matches!(
        image::pack(b"#!/bin/sh\n", &provenance(), "1", &out),
        Err(OciError::NotElf)
    ));
    assert!(matches!(
        image::pack(b"\x7fELF", &provenance(), ".bad", &out),
        Err(OciError::InvalidTag(_))
    ));
    assert!(!out.exists(), "nothing written");
    Ok(())
}
