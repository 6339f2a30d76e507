//! Renders the WasmPlugin / TrafficExtension templates (`istio/filter/*.yaml.tmpl`) with the
//! image reference and digest of a packed filter.
//!
//! The committed manifests cannot know the digest of every build, so they are templates with
//! two `envsubst`-style placeholders, [`IMAGE_PLACEHOLDER`] and [`SHA256_PLACEHOLDER`];
//! `cargo xtask oci` renders them next to the image it packs, and a CI pipeline that pushes
//! elsewhere can render them with `envsubst` alone. A template that lost a placeholder is an
//! error, so a rendered manifest never silently ships without its digest.

/// Placeholder for the image reference without scheme, e.g. `ghcr.io/acme/fulcrum-balancer:0.1.0`.
pub const IMAGE_PLACEHOLDER: &str = "${FULCRUM_IMAGE}";
/// Placeholder for the image's manifest digest, 64 lowercase hex characters.
pub const SHA256_PLACEHOLDER: &str = "${FULCRUM_WASM_SHA256}";

/// Why a template could not be rendered.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A placeholder is missing from the template.
    #[error("the template has no {0} placeholder; restore it (see docs/istio.md)")]
    MissingPlaceholder(&'static str),
    /// The digest is not 64 lowercase hex characters.
    #[error("`{0}` is not a sha256 digest: expected 64 lowercase hex characters without `sha256:`")]
    InvalidDigest(String),
    /// The image reference is empty, has a scheme or whitespace.
    #[error("`{0}` is not an image reference: expected REGISTRY/REPOSITORY:TAG without `oci://`")]
    InvalidImage(String),
}

/// `template` with every placeholder replaced by `image` and `sha256`.
pub fn render(template: &str, image: &str, sha256: &str) -> Result<String, TemplateError> {
    if sha256.len() != 64
        || !sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(TemplateError::InvalidDigest(sha256.to_owned()));
    }
    if image.is_empty() || image.contains("://") || image.contains(char::is_whitespace) {
        return Err(TemplateError::InvalidImage(image.to_owned()));
    }
    for placeholder in [IMAGE_PLACEHOLDER, SHA256_PLACEHOLDER] {
        if !template.contains(placeholder) {
            return Err(TemplateError::MissingPlaceholder(placeholder));
        }
    }
    Ok(template
        .replace(IMAGE_PLACEHOLDER, image)
        .replace(SHA256_PLACEHOLDER, sha256))
}
