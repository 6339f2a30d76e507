//! The registry's two faces: REST/JSON ([`rest`], axum) and gRPC ([`grpc`], tonic), with the
//! same operations, names, authentication and error kinds.
//!
//! Both authenticate every call with a bearer token ([`crate::auth`]) before anything else,
//! so an unauthenticated call changes nothing. Errors map one to one:
//!
//! | error | HTTP | gRPC |
//! | --- | --- | --- |
//! | no / unknown token | 401 | `UNAUTHENTICATED` |
//! | bad field, refused address class | 400 | `INVALID_ARGUMENT` |
//! | not the registering token, outside the token's scope | 403 | `PERMISSION_DENIED` |
//! | no such instance | 404 | `NOT_FOUND` |
//! | address held by another instance | 409 | `ALREADY_EXISTS` |
//! | the token's quota or the registry's cap is full | 429 | `RESOURCE_EXHAUSTED` |
//! | backend cannot write (etcd without quorum) | 503 | `UNAVAILABLE` |

pub mod grpc;
pub mod rest;

use std::sync::Arc;

use crate::{Registry, TokenAuth};

/// What both faces serve from.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The registry.
    pub registry: Arc<Registry>,
    /// The accepted tokens.
    pub auth: Arc<TokenAuth>,
}

/// Longest a watch long-poll or stream round waits for a change.
pub const MAX_WATCH_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
