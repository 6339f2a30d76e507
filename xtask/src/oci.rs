//! `cargo xtask oci`: builds the release filter, packs it as a Wasm OCI image (compat variant,
//! what Istio's WasmPlugin / TrafficExtension pull) into an OCI layout on disk, and renders the
//! WasmPlugin and TrafficExtension templates of `istio/filter/` with the image's digest.
//!
//! The packer is `fulcrum_release::oci`, the same code the manifest tests check; this
//! module only declares its options, builds, and reports. Pushing is left to standard tools
//! (`skopeo`, `oras`, `crane`), which copy the layout's manifest unchanged, so the digest
//! printed here is the one the registry will serve.

use std::path::PathBuf;

use anyhow::{Context, Result};
use fulcrum_release::{oci, template};

const DEFAULT_REPOSITORY: &str = "localhost:5000/fulcrum-balancer";
const DEFAULT_OUT: &str = "target-oci/fulcrum-balancer";
/// Templates rendered next to the layout: (template in the repository, rendered file name).
const TEMPLATES: &[(&str, &str)] = &[
    ("istio/filter/wasmplugin.yaml.tmpl", "wasmplugin.yaml"),
    (
        "istio/filter/trafficextension.yaml.tmpl",
        "trafficextension.yaml",
    ),
];

/// Options of `cargo xtask oci`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Directory for the OCI layout and the rendered manifests
    #[arg(
        long,
        value_name = "DIR",
        default_value_os_t = super::workspace_root().join(DEFAULT_OUT)
    )]
    out: PathBuf,
    /// The image's tag
    #[arg(long, value_name = "TAG", default_value = env!("CARGO_PKG_VERSION"))]
    tag: String,
    /// Where the image will be pushed: the reference in the manifests and push commands
    #[arg(long, value_name = "REGISTRY/REPO", default_value = DEFAULT_REPOSITORY)]
    repository: String,
}

/// Runs `cargo xtask oci`.
pub fn run(options: &Options) -> Result<()> {
    let root = super::workspace_root();
    let wasm_path = super::build_wasm()?;
    let wasm =
        std::fs::read(&wasm_path).with_context(|| format!("reading {}", wasm_path.display()))?;
    let image = oci::pack(&wasm, &options.tag, &options.out)?;
    let reference = format!("{}:{}", options.repository, options.tag);

    let mut rendered = Vec::new();
    for (template_path, file_name) in TEMPLATES {
        let text = std::fs::read_to_string(root.join(template_path))
            .with_context(|| format!("reading {template_path}"))?;
        let manifest = template::render(&text, &reference, image.manifest.digest.hex())
            .with_context(|| format!("rendering {template_path}"))?;
        let path = options.out.join(file_name);
        std::fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))?;
        rendered.push(path);
    }

    let layout = image.layout.display();
    println!("OCI layout:       {layout} (tag {})", image.tag);
    println!("manifest digest:  {}", image.manifest.digest);
    println!("wasm sha256:      {}", image.wasm_sha256.hex());
    println!(
        "WasmPlugin:       url: oci://{reference}\n                  sha256: {}",
        image.manifest.digest.hex()
    );
    for path in &rendered {
        println!("rendered:         {}", path.display());
    }
    println!(
        "push with one of:\n  skopeo copy oci:{layout}:{tag} docker://{reference}\n  oras cp --from-oci-layout {layout}:{tag} {reference}\n  crane push {layout} {reference}",
        tag = image.tag
    );
    Ok(())
}
