//! Where registrations and their leases live: one small trait, two implementations.
//!
//! A backend stores registrations with a lease each and keeps the shared [`View`] current:
//! [`memory::MemoryBackend`] (the default, one process) updates it in the same step as its
//! write; [`etcd::EtcdBackend`] writes to etcd and updates it from a watch, so every
//! control-plane replica on one etcd converges on the same registry. Ownership (only the
//! registering identity may change a registration) is enforced here, atomically with the
//! write.
//!
//! [`View`]: crate::view::View

pub mod etcd;
pub mod memory;

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use prometheus_client::metrics::{counter::Counter, family::Family};

use crate::{metrics::RefusedRecordLabels, model::Registration, view::Record};

/// A boxed future a backend call returns.
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// Storage for registrations with leases. See the module docs.
pub trait RegistryBackend: Send + Sync + std::fmt::Debug + 'static {
    /// `memory` or `etcd`, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// The count of failed reloads of every registration after the backend's watch broke
    /// (while it grows, the view serves the last state it loaded); `None` for a backend that
    /// never reloads.
    fn reload_failures(&self) -> Option<Counter> {
        None
    }

    /// The count of records read from the store that the view does not take, by reason
    /// (etcd: [`etcd::RecordRefusal`]); `None` for a backend whose view holds only its own,
    /// admitted, writes.
    fn records_refused(&self) -> Option<Family<RefusedRecordLabels, Counter>> {
        None
    }

    /// Creates or replaces the registration `registration.id` for `owner` and (re)starts
    /// its lease of `registration.ttl()`. Replacing keeps the first registration time.
    /// Fails with [`BackendError::NotOwner`] when another identity holds the id.
    fn register<'a>(
        &'a self,
        registration: Registration,
        owner: &'a str,
    ) -> BackendFuture<'a, Arc<Record>>;

    /// Renews the lease of `id` for another TTL, which it returns.
    fn heartbeat<'a>(&'a self, id: &'a str, owner: &'a str) -> BackendFuture<'a, Duration>;

    /// Removes `id` and ends its lease.
    fn deregister<'a>(&'a self, id: &'a str, owner: &'a str) -> BackendFuture<'a, ()>;
}

/// Why a backend refused or failed a write.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No registration has this id (never registered, deregistered, or expired).
    #[error(
        "instance `{id}` is not registered (it may have expired: heartbeat within its TTL, or register it again)"
    )]
    NotFound {
        /// The id.
        id: String,
    },
    /// Another identity registered this id.
    #[error(
        "instance `{id}` was registered with another token; only the token that registered it can change it"
    )]
    NotOwner {
        /// The id.
        id: String,
    },
    /// The store cannot take writes now.
    #[error(
        "the {backend} registry backend cannot take writes now: {reason}; reads keep serving the last known state"
    )]
    Unavailable {
        /// `etcd`.
        backend: &'static str,
        /// What failed, and what to check.
        reason: String,
        /// The client error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}
