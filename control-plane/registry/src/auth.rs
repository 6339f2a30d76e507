//! Bearer tokens for the registry API, the identity each one stands for, and its scope.
//!
//! The token file has one token per line, optionally named, optionally scoped:
//! `IDENTITY TOKEN [services=PATTERN,...] [addresses=CIDR,...] [max=N]`, or `TOKEN [...]`
//! (its identity is then `token-` and the first 12 hex digits of its SHA-256). Blank lines
//! and `#` comments are skipped. The fields are the identity's [`Scope`]: the service names
//! (`shop-*`, `cart`) and address ranges it may register, and how many live registrations it
//! may hold (`max=0`: a token that only reads). Every line of one identity (several tokens,
//! while one is rotated) must give the same fields.
//!
//! A field left out leaves that part open, so a file written before scopes existed keeps
//! working after an upgrade; [`TokenAuth::from_file`] logs a warning per identity with open
//! parts, naming them. Refused address classes and the registry's cap apply to every
//! identity (see [`crate::admission`]).
//!
//! Tokens are kept only as SHA-256 digests, and a presented token is hashed before the
//! lookup, so the comparison does not leak the secret's bytes through timing. The identity
//! is recorded as the owner of what a token registers.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::Arc,
};

use sha2::{Digest, Sha256};
use tracing::warn;

use crate::admission::{SCOPE_KEYS, Scope};

/// Shortest token accepted in the file: 16 characters (about 96 bits when random).
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// No token at all.
    #[error(
        "the token file has no token; add a line `IDENTITY TOKEN` (token of at least {MIN_TOKEN_LEN} characters)"
    )]
    Empty,
}

/// An authenticated caller: the identity its token stands for, and what it may register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The name recorded as the owner of its registrations.
    pub name: String,
    /// What it may register.
    pub scope: Arc<Scope>,
}

impl Identity {
    /// An identity without a scope: any service name, any address the registry admits.
    pub fn unscoped(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            scope: Arc::default(),
        }
    }
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
    identities: HashMap<[u8; 32], Identity>,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut identities: Vec<&str> = self
            .identities
            .values()
            .map(|identity| identity.name.as_str())
            .collect();
        identities.sort_unstable();
        identities.dedup();
        f.debug_struct("TokenAuth")
            .field("identities", &identities)
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `word` is a scope field (`services=...`, `addresses=...`, `max=...`).
fn is_field(word: &str) -> bool {
    word.split_once('=')
        .is_some_and(|(key, _)| SCOPE_KEYS.contains(&key))
}

/// One line's identity name, token and scope.
fn parse_line(line: &str) -> Result<(String, &str, Scope), String> {
    const FORMAT: &str =
        "expected `IDENTITY TOKEN [services=PATTERN,...] [addresses=CIDR,...] [max=N]`";
    let words: Vec<&str> = line.split_whitespace().collect();
    // The first word is always a token or an identity, so a token may hold `=`.
    let (identity, token, fields) = match words.as_slice() {
        [identity, token, fields @ ..] if !is_field(token) => {
            ((*identity).to_owned(), *token, fields)
        }
        [token, fields @ ..] => (anonymous_identity(token), *token, fields),
        [] => return Err(FORMAT.into()),
    };
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is {} characters; use at least {MIN_TOKEN_LEN}",
            token.len()
        ));
    }
    let mut scope = Scope::default();
    for word in fields {
        let Some((key, value)) = word.split_once('=') else {
            return Err(format!("{FORMAT}; `{word}` is not a field"));
        };
        scope.set(key, value)?;
    }
    Ok((identity, token, scope))
}

impl TokenAuth {
    /// Reads a token file, and warns once per identity whose scope leaves a part open.
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let auth = Self::parse(&text)?;
        for (identity, open) in auth.open_scopes() {
            warn!(
                identity,
                open = %open.join(","),
                "registry token without a full scope: add services=PATTERN,... addresses=CIDR,... max=N to its line in the token file (left out: any service name, any address the registry admits, up to the registry's cap)"
            );
        }
        Ok(auth)
    }

    /// Parses token file text.
    pub fn parse(text: &str) -> Result<Self, TokenFileError> {
        let mut identities = HashMap::new();
        // Each identity's scope and the line that gave it, shared by all its tokens.
        let mut scopes: HashMap<String, (Arc<Scope>, usize)> = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line_error = |reason| TokenFileError::Line {
                line: index + 1,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, token, scope) = parse_line(line).map_err(line_error)?;
            let scope = match scopes.get(&name) {
                Some((kept, _)) if **kept == scope => kept.clone(),
                Some((_, first)) => {
                    return Err(line_error(format!(
                        "identity `{name}` is on line {first} with other fields; give every token of one identity the same services=, addresses= and max="
                    )));
                }
                None => {
                    let scope = Arc::new(scope);
                    scopes.insert(name.clone(), (scope.clone(), index + 1));
                    scope
                }
            };
            if identities
                .insert(digest(token), Identity { name, scope })
                .is_some()
            {
                return Err(line_error("this token is listed twice".into()));
            }
        }
        if identities.is_empty() {
            return Err(TokenFileError::Empty);
        }
        Ok(Self { identities })
    }

    /// Tokens given in code: `(identity, token)` pairs, unscoped (tests and embedding).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            identities: pairs
                .into_iter()
                .map(|(identity, token)| (digest(token), Identity::unscoped(identity)))
                .collect(),
        }
    }

    /// Every identity whose scope leaves a part open, with the token file keys left out,
    /// sorted by identity.
    pub fn open_scopes(&self) -> BTreeMap<&str, Vec<&'static str>> {
        self.identities
            .values()
            .map(|identity| (identity.name.as_str(), identity.scope.open_fields()))
            .filter(|(_, open)| !open.is_empty())
            .collect()
    }

    /// The identity of the token in an `authorization` value.
    pub fn identify(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
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
            Ok(Identity::unscoped("alice"))
        );
        let anonymous = auth
            .identify(Some("bearer fedcba9876543210fedc"))
            .expect("known")
            .name;
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

    #[test]
    fn scope_fields_after_the_token_limit_services_addresses_and_registrations() {
        let auth = TokenAuth::parse(
            "shop-team s3cr3t-token-0123456789 services=shop-*,cart addresses=10.0.0.0/8,fd00::/8 max=50\n\
             dXNlci10b2tlbi0wMTIzNDU2Nzg5== max=0\n",
        )
        .expect("valid");
        let shop = auth
            .identify(Some("Bearer s3cr3t-token-0123456789"))
            .expect("known");
        assert_eq!(shop.name, "shop-team");
        let services: Vec<String> = shop
            .scope
            .services
            .iter()
            .flatten()
            .map(ToString::to_string)
            .collect();
        assert_eq!(services, ["shop-*", "cart"]);
        assert_eq!(
            shop.scope.addresses,
            Some(vec![
                "10.0.0.0/8".parse().expect("net"),
                "fd00::/8".parse().expect("net")
            ])
        );
        assert_eq!(shop.scope.max, Some(50));
        // A token may end in `=` (base64); a field follows a lone token.
        let reader = auth
            .identify(Some("Bearer dXNlci10b2tlbi0wMTIzNDU2Nzg5=="))
            .expect("known");
        assert!(reader.name.starts_with("token-"), "{}", reader.name);
        assert_eq!(reader.scope.max, Some(0));
        assert_eq!(
            auth.open_scopes().get(reader.name.as_str()),
            Some(&vec!["services", "addresses"])
        );
        assert_eq!(auth.open_scopes().get("shop-team"), None);
    }

    #[test]
    fn a_line_without_fields_keeps_its_identity_open_in_every_part() {
        let auth = TokenAuth::parse(FILE).expect("valid");
        assert_eq!(
            auth.open_scopes().get("alice"),
            Some(&vec!["services", "addresses", "max"])
        );
    }

    #[test]
    fn bad_fields_are_refused_naming_the_line_and_the_fix() {
        for (text, expected) in [
            (
                "a 0123456789abcdef0123 service=shop",
                "`service=` is not a field",
            ),
            ("a 0123456789abcdef0123 shop", "`shop` is not a field"),
            (
                "a 0123456789abcdef0123 services=Shop",
                "not a service pattern",
            ),
            (
                "a 0123456789abcdef0123 addresses=10.0.0.0/33",
                "not an address range",
            ),
            ("a 0123456789abcdef0123 max=-1", "max=N"),
            ("a 0123456789abcdef0123 max=1 max=2", "given twice"),
            ("a 0123456789abcdef0123 services=", "empty"),
        ] {
            let error = TokenAuth::parse(&format!("# tokens\n{text}\n")).expect_err(text);
            let message = error.to_string();
            assert!(message.contains("line 2"), "{message}");
            assert!(message.contains(expected), "{text}: {message}");
        }
    }

    #[test]
    fn the_tokens_of_one_identity_must_share_its_scope() {
        TokenAuth::parse("a 0123456789abcdef0123 max=5\na fedcba9876543210fedc max=5\n")
            .expect("the same scope on both lines");
        let error =
            TokenAuth::parse("a 0123456789abcdef0123 max=5\na fedcba9876543210fedc max=6\n")
                .expect_err("two scopes");
        assert!(error.to_string().contains("line 2"), "{error}");
        assert!(error.to_string().contains("on line 1"), "{error}");
    }
}
