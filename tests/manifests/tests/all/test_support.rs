//! Shared fixtures: the repository's manifests as JSON values, the vendored CRDs, the
//! release filter (`FULCRUM_FILTER_WASM`, or built once for these tests), the native module
//! (`FULCRUM_NATIVE_MODULE`, or built once) and the control plane's static binary
//! (`FULCRUM_CONTROL_PLANE_BIN`, or built once).

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

/// The release filter's bytes (see [`filter_wasm_path`]).
pub fn filter_wasm() -> Result<&'static [u8]> {
    static WASM: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    WASM.get_or_init(|| {
        let path = filter_wasm_path().map_err(|error| format!("{error:#}"))?;
        std::fs::read(path).map_err(|error| format!("reading {}: {error}", path.display()))
    })
    .as_deref()
    .map_err(|error| anyhow::anyhow!("{error}"))
}

/// A release artifact these tests run: where `cargo xtask test` put it, else built once
/// into a target directory of its own, so a build never waits on the lock of the running one.
struct Artifact {
    /// The variable `cargo xtask test` sets to the artifact's path.
    env: &'static str,
    /// The target directory's name under `CARGO_TARGET_TMPDIR`.
    dir: &'static str,
    /// `cargo build --release` arguments.
    args: &'static [&'static str],
    /// Environment of the build.
    build_env: &'static [(&'static str, &'static str)],
    /// The artifact's path in the target directory.
    path: &'static str,
    /// What it is, and what it needs, for the error of a failed build.
    what: &'static str,
}

impl Artifact {
    /// The artifact's path, built at the first call if `env` is not set.
    fn get(&self, cell: &'static OnceLock<Result<PathBuf, String>>) -> Result<&'static Path> {
        cell.get_or_init(|| {
            if let Some(path) = std::env::var_os(self.env) {
                return Ok(PathBuf::from(path));
            }
            let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join(self.dir);
            let status = Command::new(env!("CARGO"))
                .current_dir(repo_root())
                .args(["build", "--release"])
                .args(self.args)
                .envs(self.build_env.iter().copied())
                .env("CARGO_TARGET_DIR", &target)
                .status()
                .map_err(|error| format!("running cargo to build {}: {error}", self.what))?;
            if !status.success() {
                return Err(format!("building {} failed ({status})", self.what));
            }
            Ok(target.join(self.path))
        })
        .as_deref()
        .map_err(|error| anyhow::anyhow!("{error}"))
    }
}

/// The release filter: `FULCRUM_FILTER_WASM`, else built once.
pub fn filter_wasm_path() -> Result<&'static Path> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    Artifact {
        env: "FULCRUM_FILTER_WASM",
        dir: "filter-wasm",
        args: &["--package", "fulcrum-balancer", "--target", "wasm32-wasip1"],
        build_env: &[],
        path: "wasm32-wasip1/release/fulcrum_balancer.wasm",
        what: "the filter (is the wasm32-wasip1 target installed? `cargo xtask setup`)",
    }
    .get(&PATH)
}

/// The release native module, `libfulcrum_native.so`: `FULCRUM_NATIVE_MODULE`, else built
/// once.
pub fn native_module() -> Result<&'static Path> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    Artifact {
        env: "FULCRUM_NATIVE_MODULE",
        dir: "native-module",
        args: &["--package", "fulcrum-native"],
        build_env: &[],
        path: "release/libfulcrum_native.so",
        what: "the native module",
    }
    .get(&PATH)
}

/// The control plane's static (musl) release binary, as `cargo xtask image` builds it:
/// `FULCRUM_CONTROL_PLANE_BIN`, else built once.
pub fn control_plane_binary() -> Result<&'static Path> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    Artifact {
        env: "FULCRUM_CONTROL_PLANE_BIN",
        dir: "control-plane-musl",
        args: &[
            "--package",
            "fulcrum-control-plane",
            "--bin",
            "fulcrum-control-plane",
            "--target",
            "x86_64-unknown-linux-musl",
        ],
        build_env: &[("CC_x86_64_unknown_linux_musl", "musl-gcc")],
        path: "x86_64-unknown-linux-musl/release/fulcrum-control-plane",
        what: "the control plane for x86_64-unknown-linux-musl (are the target and musl-gcc \
               installed? `cargo xtask setup`)",
    }
    .get(&PATH)
}
