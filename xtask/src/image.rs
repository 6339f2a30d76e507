//! `cargo xtask image`: builds the control plane as a static musl executable and packs it as a
//! container image into an OCI layout on disk — no Docker engine or registry needed.
//!
//! The packer is `fulcrum_release::image`, the same code the manifest tests check; this
//! module builds, collects the provenance labels (version, git revision) and reports. Pushing
//! is left to standard tools (`skopeo`, `oras`, `crane`), which copy the manifest unchanged,
//! so the digest printed here is the one the registry serves.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use fulcrum_release::image::{self, Provenance};

use crate::{
    setup,
    tools::{self, MUSL_TARGET},
};

/// The control plane's package and binary.
const PACKAGE: &str = "fulcrum-control-plane";
const DEFAULT_REPOSITORY: &str = "ghcr.io/fulcrum-lb/fulcrum-control-plane";
const DEFAULT_SOURCE: &str = "https://github.com/fulcrum-lb/fulcrum";
const DEFAULT_OUT: &str = "target-oci/fulcrum-control-plane";

/// Options of `cargo xtask image`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Directory for the OCI layout
    #[arg(
        long,
        value_name = "DIR",
        default_value_os_t = super::workspace_root().join(DEFAULT_OUT)
    )]
    out: PathBuf,
    /// The image's tag
    #[arg(long, value_name = "TAG", default_value = env!("CARGO_PKG_VERSION"))]
    tag: String,
    /// Where the image will be pushed: the reference in the push commands and the pin
    #[arg(long, value_name = "REGISTRY/REPO", default_value = DEFAULT_REPOSITORY)]
    repository: String,
    /// The source repository, recorded in the image's org.opencontainers.image.source label
    #[arg(long, value_name = "URL", default_value = DEFAULT_SOURCE)]
    source: String,
}

/// Builds the control plane for [`MUSL_TARGET`] in release mode and returns the static
/// binary's path. The caller has run [`setup::ensure`] with [`setup::FOR_IMAGE`] (the musl
/// target, `musl-gcc`, protoc).
pub fn build_binary() -> Result<PathBuf> {
    let started = Instant::now();
    tools::run(
        super::cargo()
            .args(["build", "--release", "--package", PACKAGE, "--bin", PACKAGE])
            .args(["--target", MUSL_TARGET])
            .env("CC_x86_64_unknown_linux_musl", "musl-gcc"),
    )
    .context("building the control plane for musl failed")?;
    let binary = super::target_dir()?
        .join(MUSL_TARGET)
        .join("release")
        .join(PACKAGE);
    if !binary.is_file() {
        bail!("the build succeeded but {} is missing", binary.display());
    }
    eprintln!(
        "xtask: control plane {} (static, {} MiB) built in {:.0?}",
        binary.display(),
        std::fs::metadata(&binary).map(|m| m.len()).unwrap_or(0) / (1024 * 1024),
        started.elapsed()
    );
    Ok(binary)
}

/// The commit of the checkout, with `-dirty` when tracked files have uncommitted changes.
fn git_revision(root: &Path) -> Result<String> {
    let git = |args: &[&str]| {
        tools::output(
            std::process::Command::new("git")
                .current_dir(root)
                .args(args),
        )
        .context("running git for the image's revision label (is this a git checkout?)")
    };
    let commit = git(&["rev-parse", "HEAD"])?.trim().to_owned();
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])?
        .trim()
        .is_empty();
    Ok(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

/// Runs `cargo xtask image`.
pub fn run(options: &Options) -> Result<()> {
    let root = super::workspace_root();
    setup::ensure(&root, setup::FOR_IMAGE)?;
    let binary_path = build_binary()?;
    let binary = std::fs::read(&binary_path)
        .with_context(|| format!("reading {}", binary_path.display()))?;
    let provenance = Provenance {
        source: options.source.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        revision: git_revision(&root)?,
    };
    let packed = image::pack(&binary, &provenance, &options.tag, &options.out)?;
    let reference = format!("{}:{}", options.repository, options.tag);
    let layout = options.out.display();
    println!("OCI layout:       {layout} (tag {})", packed.tag);
    println!("manifest digest:  {}", packed.manifest.digest);
    println!(
        "layer:            {} MiB compressed, entrypoint {} as user {}",
        packed.layer.size / (1024 * 1024),
        image::ENTRYPOINT,
        image::USER
    );
    println!("revision:         {}", provenance.revision);
    println!(
        "push with one of:\n  skopeo copy oci:{layout}:{tag} docker://{reference}\n  oras cp --from-oci-layout {layout}:{tag} {reference}\n  crane push {layout} {reference}",
        tag = packed.tag
    );
    println!(
        "then pin it in istio/kustomization.yaml (images: fulcrum-control-plane):\n  newName: {}\n  digest: {}",
        options.repository, packed.manifest.digest
    );
    Ok(())
}
