//! Bearer tokens for the registry API, and the identity each one stands for.
//!
//! The token file has one token per line, optionally named: `IDENTITY TOKEN`, or just `TOKEN`
//! (its identity is then `token-` and the first 12 hex digits of its SHA-256). Blank lines
//! and `#` comments are skipped. Tokens are kept only as SHA-256 digests, and a presented
//! token is hashed before the lookup, so the comparison does not leak the secret's bytes
//! through timing. The identity is recorded as the owner of what a token registers.

use std::{collections::HashMap, path::Path};

use sha2::{Digest, Sha256};

/// Shortest token accepted in the file: 16 characters (about 96 bits when random).
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read the registry token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("registry token file, line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// No token at all.
    #[error(
        "the registry token file has no token; add a line `IDENTITY TOKEN` (token of at least {MIN_TOKEN_LEN} characters)"
    )]
    Empty,
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` header / metadata.
    #[error("missing `authorization: Bearer <token>`")]
    Missing,
    /// Not a bearer token.
    #[error("`authorization` must be `Bearer <token>`")]
    Malformed,
    /// Not a configured token.
    #[error("unknown bearer token")]
    Unknown,
}

/// The configured tokens. See the module docs.
#[derive(Clone)]
pub struct TokenAuth {
    identities: HashMap<[u8; 32], String>,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut identities: Vec<&str> = self.identities.values().map(String::as_str).collect();
        identities.sort_unstable();
        f.debug_struct("TokenAuth")
            .field("identities", &identities)
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenAuth {
    /// Reads a token file.
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses token file text.
    pub fn parse(text: &str) -> Result<Self, TokenFileError> {
        let mut identities = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (identity, token) = match fields.as_slice() {
                [token] => (anonymous_identity(token), *token),
                [identity, token] => ((*identity).to_owned(), *token),
                _ => {
                    return Err(TokenFileError::Line {
                        line: index + 1,
                        reason: "expected `IDENTITY TOKEN` or `TOKEN`".into(),
                    });
                }
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(TokenFileError::Line {
                    line: index + 1,
                    reason: format!(
                        "the token is {} characters; use at least {MIN_TOKEN_LEN}",
                        token.len()
                    ),
                });
            }
            if identities.insert(digest(token), identity).is_some() {
                return Err(TokenFileError::Line {
                    line: index + 1,
                    reason: "this token is listed twice".into(),
                });
            }
        }
        if identities.is_empty() {
            return Err(TokenFileError::Empty);
        }
        Ok(Self { identities })
    }

    /// Tokens given in code: `(identity, token)` pairs (tests and embedding).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            identities: pairs
                .into_iter()
                .map(|(identity, token)| (digest(token), identity.to_owned()))
                .collect(),
        }
    }

    /// The identity of the token in an `authorization` value.
    pub fn identify(&self, authorization: Option<&str>) -> Result<String, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed);
        }
        self.identities
            .get(&digest(token.trim()))
            .cloned()
            .ok_or(AuthError::Unknown)
    }
}

fn anonymous_identity(token: &str) -> String {
    let hex: String = digest(token)[..6]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("token-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# registry tokens\nalice 0123456789abcdef0123\n\nfedcba9876543210fedc\n";

    #[test]
    fn named_and_anonymous_tokens_map_to_identities() {
        let auth = TokenAuth::parse(FILE).expect("valid");
        assert_eq!(
            auth.identify(Some("Bearer 0123456789abcdef0123")),
            Ok("alice".into())
        );
        let anonymous = auth
            .identify(Some("bearer fedcba9876543210fedc"))
            .expect("known");
        assert!(
            anonymous.starts_with("token-") && anonymous.len() == 18,
            "{anonymous}"
        );
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_refused() {
        let auth = TokenAuth::parse(FILE).expect("valid");
        assert_eq!(auth.identify(None), Err(AuthError::Missing));
        assert_eq!(
            auth.identify(Some("Basic 0123456789abcdef0123")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.identify(Some("Bearer 0123456789abcdef0124")),
            Err(AuthError::Unknown)
        );
    }

    #[test]
    fn short_tokens_and_empty_files_are_refused_with_the_line() {
        let error = TokenAuth::parse("bob short\n").expect_err("short");
        assert!(error.to_string().contains("line 1"), "{error}");
        assert!(matches!(
            TokenAuth::parse("# nothing\n"),
            Err(TokenFileError::Empty)
        ));
    }

    #[test]
    fn debug_output_shows_identities_not_tokens() {
        let auth = TokenAuth::parse(FILE).expect("valid");
        assert!(!format!("{auth:?}").contains("0123456789abcdef"));
    }
}
