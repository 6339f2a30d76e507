//! Shared fixtures: the repository's manifests as JSON values, the vendored CRDs, the
//! release filter (`FULCRUM_FILTER_WASM`, or built once for these tests) and the control
//! plane's static binary (`FULCRUM_CONTROL_PLANE_BIN`, or built once).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context, Result, bail};
use fulcrum_release::template;
use serde_json::Value;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One YAML document of a file under `istio/`.
#[derive(Debug)]
pub struct Document {
    /// `istio/…` path and document index, for messages.
    pub origin: String,
    /// The document as JSON.
    pub value: Value,
}

impl Document {
    /// `apiVersion/kind`.
    pub fn type_name(&self) -> String {
        format!(
            "{}/{}",
            self.value["apiVersion"].as_str().unwrap_or("?"),
            self.value["kind"].as_str().unwrap_or("?")
        )
    }
}

/// Every document of a YAML text.
pub fn parse_documents(origin: &str, text: &str) -> Result<Vec<Document>> {
    let mut documents = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(document)
            .with_context(|| format!("{origin}: document {index} is not valid YAML"))?;
        if !value.is_null() {
            documents.push(Document {
                origin: format!("{origin}#{index}"),
                value,
            });
        }
    }
    Ok(documents)
}

/// Every Kubernetes object in the `*.yaml` files under `istio/` (the kustomization excluded).
pub fn istio_objects() -> Result<Vec<Document>> {
    let mut files = Vec::new();
    collect_yaml(&repo_root().join("istio"), &mut files)?;
    files.sort();
    let mut documents = Vec::new();
    for file in files {
        if file
            .file_name()
            .is_some_and(|name| name == "kustomization.yaml")
        {
            continue;
        }
        let origin = file
            .strip_prefix(repo_root())
            .unwrap_or(&file)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&file).with_context(|| origin.clone())?;
        documents.extend(parse_documents(&origin, &text)?);
    }
    Ok(documents)
}

fn collect_yaml(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.is_dir() {
            collect_yaml(&path, files)?;
        } else if path.extension().is_some_and(|ext| ext == "yaml") {
            files.push(path);
        }
    }
    Ok(())
}

/// A 64-hex digest the templates are rendered with when no image is at hand.
pub const SAMPLE_DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The template `istio/filter/<name>.yaml.tmpl` rendered with `image` and `sha256`, parsed.
pub fn rendered_template(name: &str, image: &str, sha256: &str) -> Result<Document> {
    let path = format!("istio/filter/{name}.yaml.tmpl");
    let text = std::fs::read_to_string(repo_root().join(&path)).context(path.clone())?;
    let rendered = template::render(&text, image, sha256)?;
    let mut documents = parse_documents(&path, &rendered)?;
    if documents.len() != 1 {
        bail!(
            "{path} must hold exactly one document, found {}",
            documents.len()
        );
    }
    Ok(documents.remove(0))
}

/// The release filter: `FULCRUM_FILTER_WASM` (set by `cargo xtask test`), else built once
/// into a target directory of its own so it never waits on the lock of the running build.
pub fn filter_wasm() -> Result<&'static [u8]> {
    static WASM: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    WASM.get_or_init(|| load_filter_wasm().map_err(|error| format!("{error:#}")))
        .as_deref()
        .map_err(|error| anyhow::anyhow!("{error}"))
}

fn load_filter_wasm() -> Result<Vec<u8>> {
    if let Some(path) = std::env::var_os("FULCRUM_FILTER_WASM") {
        return std::fs::read(&path).with_context(|| {
            format!("reading FULCRUM_FILTER_WASM={}", Path::new(&path).display())
        });
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("filter-wasm");
    let status = Command::new(env!("CARGO"))
        .current_dir(repo_root())
        .args([
            "build",
            "--release",
            "--package",
            "fulcrum-balancer",
            "--target",
            "wasm32-wasip1",
        ])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .context("running cargo to build the filter")?;
    if !status.success() {
        bail!(
            "building the filter failed ({status}); is the wasm32-wasip1 target installed (`cargo xtask setup`)?"
        );
    }
    let wasm = target.join("wasm32-wasip1/release/fulcrum_balancer.wasm");
    std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))
}

/// The control plane's static (musl) release binary: `FULCRUM_CONTROL_PLANE_BIN` (set by
/// `cargo xtask test`, which builds it as `cargo xtask image` does), else built once into a
/// target directory of its own.
pub fn control_plane_binary() -> Result<&'static Path> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| build_control_plane().map_err(|error| format!("{error:#}")))
        .as_deref()
        .map_err(|error| anyhow::anyhow!("{error}"))
}

fn build_control_plane() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("FULCRUM_CONTROL_PLANE_BIN") {
        return Ok(PathBuf::from(path));
    }
    const MUSL: &str = "x86_64-unknown-linux-musl";
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("control-plane-musl");
    let status = Command::new(env!("CARGO"))
        .current_dir(repo_root())
        .args(["build", "--release", "--package", "fulcrum-control-plane"])
        .args(["--bin", "fulcrum-control-plane", "--target", MUSL])
        .env("CARGO_TARGET_DIR", &target)
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .status()
        .context("running cargo to build the control plane")?;
    if !status.success() {
        bail!(
            "building the control plane for {MUSL} failed ({status}); are the target and musl-gcc installed (`cargo xtask setup`)?"
        );
    }
    Ok(target.join(MUSL).join("release/fulcrum-control-plane"))
}
