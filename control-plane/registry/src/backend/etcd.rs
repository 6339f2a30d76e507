//! The etcd backend: registrations as keys under a prefix, one etcd lease each.
//!
//! - **Keys**: `{prefix}{id}` holds a JSON [`StoredRecord`] (the instance spec, the owner's
//!   identity, the first registration time), attached to a lease of the registration's TTL
//!   (rounded up to whole seconds, and at least etcd's own minimum of 1.5 election timeouts).
//! - **Writes** are transactions conditioned on the key's `mod_revision` read just before
//!   (or its absence), so the owner check and the write are atomic across replicas; a lost
//!   race is retried. Re-registering grants a new lease, puts, then revokes the old lease.
//!   A write whose answer is lost may have committed: its lease is revoked only after the
//!   key is read again and only if nothing live can hang on it ([`commit`]).
//!   A heartbeat is one keep-alive of the registration's lease; etcd itself deletes the key
//!   when the lease runs out, and every replica sees the delete.
//! - **Reads** come from the shared [`View`], which a watcher keeps current: it loads the
//!   prefix at a revision (in pages of 500 keys, so a registry of any size fits
//!   the client's 4 MiB answers), watches from the next one, and on any break (a member died, the
//!   revision was compacted) loads again and applies the difference. While etcd has no
//!   quorum, writes fail with [`BackendError::Unavailable`] and the view keeps the last
//!   state it saw, so discovery and the endpoint source keep serving.
//! - **Re-admission**: whatever wrote a key (this replica, one allowing more addresses
//!   during a rolling change of `--registry-allow-addresses`, anyone with write access to
//!   etcd), a record reaches the view only if this replica would admit its address too: the
//!   [`AddressPolicy`] given to [`EtcdBackend::connect`] checks every record loaded or
//!   watched, so Envoy is never sent to a loopback, link-local or cloud metadata address
//!   this replica refuses. A refused record ([`RecordRefusal`]: also one that does not
//!   decode, does not validate or is not under its id's key) is kept out of the view, or
//!   removed from it when an update turns it bad, and logged and counted (by reason, in
//!   `fulcrum_registry_etcd_records_refused_total`) once per key and revision: reloads read
//!   it again without reporting it again. Writes read their key whatever its address, so
//!   its owner can still replace, heartbeat or deregister such a record.
//!
//! **Deadlines and the write queue**: a write (register, heartbeat, deregister) has one
//! deadline, `request_timeout` after it arrived, for everything it does: its wait in the
//! queue and every etcd call. At most `max_writes_in_flight` writes go to etcd at once, at
//! most `max_queued_writes` more wait their turn, and a write finding the queue full is
//! refused at once. So during an outage every caller gets [`BackendError::Unavailable`]
//! within the deadline, and the queue cannot grow without bound.
//!
//! **TLS** ([`EtcdTls`]): `https://` endpoints are verified against a CA file, or the
//! system's roots without one; a client certificate answers members started with
//! `--client-cert-auth`. Files are read and checked before any connection, and a failed
//! handshake is reported as such (with what to check), not as an unavailable cluster.

pub mod commit;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Semaphore, SemaphorePermit},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

use self::commit::{DirectTxn, Etcd, Guard, LeaseFate, TxnSender};
use super::{BackendError, BackendFuture, RegistryBackend};
use crate::{
    admission::{AddressClass, AddressPolicy, Refusal},
    metrics::RefusedRecordLabels,
    model::{FieldErrors, InstanceSpec, Registration},
    unix_ms,
    view::{Record, View},
};

/// How often a lost write race is retried before giving up.
const MAX_ATTEMPTS: usize = 5;
/// Default of [`EtcdConfig::max_writes_in_flight`]. etcd refuses requests ("too many
/// requests") once its applied index lags the committed one by 5,000 entries, which 10,000
/// simultaneous registrations reach without a bound.
pub const MAX_WRITES_IN_FLIGHT: usize = 128;
/// Default of [`EtcdConfig::max_queued_writes`]: a burst of every registration the registry
/// holds by default ([`crate::admission::DEFAULT_MAX_INSTANCES`]) fits.
pub const MAX_QUEUED_WRITES: usize = 10_000;

/// Where and how to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of the registrations. Default `/fulcrum/registry/instances/`.
    pub prefix: String,
    /// Deadline of each request: of a whole write (its wait in the queue included), and of
    /// each read of the watcher. Default 3 s.
    pub request_timeout: Duration,
    /// Writes sent to etcd at once. Default [`MAX_WRITES_IN_FLIGHT`].
    pub max_writes_in_flight: usize,
    /// Writes waiting for their turn at most; a write beyond is refused at once. Default
    /// [`MAX_QUEUED_WRITES`].
    pub max_queued_writes: usize,
    /// Deadline to open a connection. Default 2 s.
    pub connect_timeout: Duration,
    /// TLS settings; every endpoint must then be `https://`. `None` with `https://`
    /// endpoints means TLS verified against the system's roots, without a client
    /// certificate (what `etcdctl` does without `--cacert`). Default `None`.
    pub tls: Option<EtcdTls>,
}

/// TLS to the etcd members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM bundle of the CAs that signed the members' serving certificates (what the members
    /// were started with as `--trusted-ca-file`, in most clusters). `None` trusts the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
    /// The client certificate, for members started with `--client-cert-auth`.
    pub client_cert: Option<ClientCertFiles>,
    /// The name the members' certificates must be valid for, instead of each endpoint's
    /// host: for endpoints given as addresses whose certificates only name a DNS name.
    pub server_name: Option<String>,
}

/// A client certificate and its private key, both PEM files (as a `kubernetes.io/tls`
/// Secret's `tls.crt` and `tls.key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFiles {
    /// The certificate, then any intermediates.
    pub cert_file: PathBuf,
    /// The certificate's private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key_file: PathBuf,
}

/// Why an [`EtcdConfig`] cannot work. Found before any connection is tried.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConfigError {
    /// A TLS file cannot be read.
    #[error(
        "cannot read the etcd {role} {}: {source}; check the path, and that the control plane may read it (a mounted Secret needs that key)",
        path.display()
    )]
    Unreadable {
        /// `CA file`, `client certificate file` or `client key file`.
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file holds no usable PEM block of the expected kind.
    #[error("the etcd {role} {} is not {expected}: {reason}", path.display())]
    NotPem {
        /// `CA file`, `client certificate file` or `client key file`.
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// What the file must hold.
        expected: &'static str,
        /// What is wrong, and how to convert when that is the likely cause.
        reason: String,
    },
    /// TLS settings are given but an endpoint is plain `http://`.
    #[error(
        "the etcd endpoint `{endpoint}` is http:// but TLS settings are given; write it https://, or drop the TLS settings if the cluster serves plain HTTP"
    )]
    TlsOverHttp {
        /// The endpoint.
        endpoint: String,
    },
    /// Some endpoints are `http://`, others `https://`.
    #[error(
        "the etcd endpoints mix http:// (`{http}`) and https:// (`{https}`); one cluster serves clients with one scheme: use it for every endpoint"
    )]
    MixedSchemes {
        /// One `http://` endpoint.
        http: String,
        /// One `https://` endpoint.
        https: String,
    },
    /// TLS without a CA file, and the system trusts no root.
    #[error(
        "no CA file is given for etcd over TLS and this system has no trusted root certificates; give the CA file that signed the etcd members' certificates"
    )]
    NoSystemRoots,
    /// The client refused the settings (e.g. a key that is not the certificate's, an
    /// endpoint that is not a URL).
    #[error(
        "the etcd client refused its settings: {reason}; check that the endpoints are URLs (https://HOST:PORT) and that the client key is the client certificate's key"
    )]
    Rejected {
        /// The client's reason.
        reason: String,
    },
}

/// Why [`EtcdBackend::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConnectError {
    /// The configuration cannot work; nothing was tried.
    #[error(transparent)]
    Config(#[from] EtcdConfigError),
    /// A TLS handshake with the members failed.
    #[error("the TLS handshake with etcd at {endpoints} failed ({cause}); {fix}")]
    Handshake {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What the TLS library reported.
        cause: String,
        /// What to check.
        fix: &'static str,
    },
    /// No member answered in time.
    #[error(transparent)]
    Unavailable(#[from] BackendError),
}

impl EtcdConfig {
    /// Defaults for `endpoints`.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: "/fulcrum/registry/instances/".to_owned(),
            request_timeout: Duration::from_secs(3),
            max_writes_in_flight: MAX_WRITES_IN_FLIGHT,
            max_queued_writes: MAX_QUEUED_WRITES,
            connect_timeout: Duration::from_secs(2),
            tls: None,
        }
    }

    /// The TLS settings in force: the configured ones, or system roots for `https://`
    /// endpoints without any; `None` for plain HTTP. Schemes must agree with each other
    /// and with the settings.
    fn effective_tls(&self) -> Result<Option<EtcdTls>, EtcdConfigError> {
        let http = self.endpoints.iter().find(|e| e.starts_with("http://"));
        let https = self.endpoints.iter().find(|e| e.starts_with("https://"));
        match (http, https, &self.tls) {
            (Some(http), Some(https), _) => Err(EtcdConfigError::MixedSchemes {
                http: http.clone(),
                https: https.clone(),
            }),
            (Some(endpoint), None, Some(_)) => Err(EtcdConfigError::TlsOverHttp {
                endpoint: endpoint.clone(),
            }),
            (_, _, Some(tls)) => Ok(Some(tls.clone())),
            (None, Some(_), None) => Ok(Some(EtcdTls::default())),
            (_, None, None) => Ok(None),
        }
    }
}

impl EtcdTls {
    /// The client's TLS options, every file read and checked to hold what it should.
    fn client_options(&self) -> Result<TlsOptions, EtcdConfigError> {
        let mut options = TlsOptions::new();
        match &self.ca_file {
            Some(path) => {
                options = options
                    .ca_certificate(Certificate::from_pem(read_certificates("CA file", path)?));
            }
            None => {
                if rustls_native_certs::load_native_certs().certs.is_empty() {
                    return Err(EtcdConfigError::NoSystemRoots);
                }
                options = options.with_native_roots();
            }
        }
        if let Some(client) = &self.client_cert {
            let cert = read_certificates("client certificate file", &client.cert_file)?;
            let key = read_private_key(&client.key_file)?;
            options = options.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            options = options.domain_name(name.clone());
        }
        Ok(options)
    }
}

fn read_tls_file(role: &'static str, path: &Path) -> Result<Vec<u8>, EtcdConfigError> {
    std::fs::read(path).map_err(|source| EtcdConfigError::Unreadable {
        role,
        path: path.to_owned(),
        source,
    })
}

/// What a PEM file that holds none of the expected blocks probably is.
fn not_pem_reason(pem: &[u8], wanted: &str) -> String {
    if pem.starts_with(&[0x30, 0x82]) || pem.starts_with(&[0x30, 0x81]) {
        format!(
            "it looks like DER; convert it with `openssl {} -inform der -in FILE -out FILE.pem`",
            if wanted == "CERTIFICATE" {
                "x509"
            } else {
                "pkey"
            }
        )
    } else {
        format!("it has no `-----BEGIN {wanted}-----` block")
    }
}

/// Reads a PEM file of one or more certificates; returns its bytes.
fn read_certificates(role: &'static str, path: &Path) -> Result<Vec<u8>, EtcdConfigError> {
    let pem = read_tls_file(role, path)?;
    let not_pem = |reason| EtcdConfigError::NotPem {
        role,
        path: path.to_owned(),
        expected: "PEM certificates",
        reason,
    };
    let mut found = 0_usize;
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        certificate.map_err(|error| not_pem(error.to_string()))?;
        found += 1;
    }
    if found == 0 {
        return Err(not_pem(not_pem_reason(&pem, "CERTIFICATE")));
    }
    Ok(pem)
}

/// Reads a PEM private key file; returns its bytes.
fn read_private_key(path: &Path) -> Result<Vec<u8>, EtcdConfigError> {
    let role = "client key file";
    let pem = read_tls_file(role, path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(_) => Ok(pem),
        Err(error) => Err(EtcdConfigError::NotPem {
            role,
            path: path.to_owned(),
            expected: "a PEM private key",
            reason: match error {
                rustls_pki_types::pem::Error::NoItemsFound => not_pem_reason(&pem, "PRIVATE KEY"),
                other => other.to_string(),
            },
        }),
    }
}

/// The value stored under a registration's key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredRecord {
    /// What was registered, defaults written out.
    pub instance: InstanceSpec,
    /// The registering token's identity.
    pub owner: String,
    /// First registration time, ms since the Unix epoch.
    pub registered_at_unix_ms: u64,
}

/// See the module docs.
pub struct EtcdBackend {
    etcd: Etcd,
    view: Arc<View>,
    watcher: JoinHandle<()>,
    /// Turns to send a write to etcd: `max_writes_in_flight` permits.
    in_flight: Semaphore,
    /// Places of writes sent or waiting: `max_writes_in_flight + max_queued_writes` permits.
    places: Semaphore,
    /// Failed reloads of the watcher.
    reload_failures: Counter,
    /// Records kept out of the view, by reason (see [`Intake`]).
    records_refused: Family<RefusedRecordLabels, Counter>,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("config", &self.etcd.config)
            .field("registrations", &self.view.len())
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

fn unavailable(config: &EtcdConfig, what: &str, error: etcd_client::Error) -> BackendError {
    BackendError::Unavailable {
        backend: "etcd",
        reason: format!(
            "{what} failed ({error}); check that a majority of the etcd members at {} are up",
            config.endpoints.join(",")
        ),
        source: Some(Box::new(error)),
    }
}

fn queue_full(config: &EtcdConfig) -> BackendError {
    BackendError::Unavailable {
        backend: "etcd",
        reason: format!(
            "{} writes are already waiting for etcd at {} (it is slow or unreachable); retry later",
            config.max_queued_writes,
            config.endpoints.join(",")
        ),
        source: None,
    }
}

fn timed_out(config: &EtcdConfig, what: &str) -> BackendError {
    BackendError::Unavailable {
        backend: "etcd",
        reason: format!(
            "{what} got no answer within {:?}; check that a majority of the etcd members at {} are up",
            config.request_timeout,
            config.endpoints.join(",")
        ),
        source: None,
    }
}

/// The deadline of a request starting now.
fn deadline(config: &EtcdConfig) -> Instant {
    Instant::now() + config.request_timeout
}

/// Runs one etcd call until `deadline`, mapping failures to `Unavailable`.
async fn call<T>(
    config: &EtcdConfig,
    deadline: Instant,
    what: &str,
    future: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout_at(deadline, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(unavailable(config, what, error)),
        Err(_) => Err(timed_out(config, what)),
    }
}

/// Pause between attempts of [`call_failing_over`].
const FAILOVER_BACKOFF: Duration = Duration::from_millis(50);

/// Runs an etcd call like [`call`], but tries again (until the same deadline) while etcd
/// answers `Unavailable`: the client's channel spreads requests over every member and may pick
/// one that is down (connection refused) or has no leader yet, so one member going away must
/// not fail a registration. Only for calls that are safe to repeat: reads, and writes guarded
/// by a revision compare (a repeat after an applied write fails its guard and is re-read).
async fn call_failing_over<T, F, Fut>(
    config: &EtcdConfig,
    deadline: Instant,
    what: &str,
    mut attempt: F,
) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    loop {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(etcd_client::Error::GRpcStatus(status)))
                if status.code() == tonic::Code::Unavailable
                    && Instant::now() + FAILOVER_BACKOFF < deadline =>
            {
                debug!(what, %status, "etcd member unavailable; trying again");
                tokio::time::sleep(FAILOVER_BACKOFF).await;
            }
            Ok(Err(error)) => return Err(unavailable(config, what, error)),
            Err(_) => return Err(timed_out(config, what)),
        }
    }
}

/// `error` and its sources, `: `-separated.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Fix-its of [`EtcdConnectError::Handshake`].
const FIX_CA: &str = "the members' certificates are not signed by a CA in the CA file: give the CA that signed them (most clusters use the members' --trusted-ca-file), or no CA file when a CA the system trusts signed them";
const FIX_NAME: &str = "the members' certificates are not valid for the name checked (the endpoint's host, or the server name when one is set): set the server name to a name the certificates hold, or write the endpoints with one";
const FIX_VALIDITY: &str =
    "a certificate has expired or is not valid yet: renew it, and check this host's clock";
const FIX_CLIENT_CERT_MISSING: &str = "the members most likely require a client certificate (etcd --client-cert-auth): give a client certificate and key signed by a CA the members trust";
const FIX_CLIENT_CERT_REFUSED: &str = "the members most likely refused the client certificate: check that a CA the members trust (their --trusted-ca-file) signed it and that it has not expired";
const FIX_NOT_TLS: &str = "the member does not speak TLS on that port: write the endpoint http:// if it serves plain HTTP";
const FIX_OTHER: &str = "check the CA file, the client certificate and key, and the server name";

/// `error` and its causes, including those inside IO errors (whose `source()` skips the
/// error they wrap).
fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Vec<&'a (dyn std::error::Error + 'static)> {
    let mut causes = Vec::new();
    let mut next = Some(error);
    while let Some(current) = next {
        causes.push(current);
        next = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    causes
}

/// `error` as a handshake failure when TLS is in use and the handshake failed, with what
/// to check; otherwise unchanged. A member that refuses the client certificate under TLS
/// 1.3 does so after the client's side of the handshake completed: the client reads its
/// alert (as text only), or, when the member closed the connection first, only sees the
/// request cancelled or its connection broken. Each is reported as a refused (or missing)
/// client certificate.
fn handshake_error(config: &EtcdConfig, tls: bool, error: BackendError) -> EtcdConnectError {
    let status = match &error {
        BackendError::Unavailable {
            source: Some(source),
            ..
        } if tls => match source.downcast_ref::<etcd_client::Error>() {
            Some(etcd_client::Error::GRpcStatus(status)) => status,
            _ => return error.into(),
        },
        _ => return error.into(),
    };
    let client_cert_fix = if client_cert_given(config) {
        FIX_CLIENT_CERT_REFUSED
    } else {
        FIX_CLIENT_CERT_MISSING
    };
    let causes = causes(status);
    let typed = causes
        .iter()
        .find_map(|cause| cause.downcast_ref::<rustls::Error>());
    // An alert read after the handshake reaches here as text only.
    let alert = causes
        .iter()
        .map(ToString::to_string)
        .find(|text| text.starts_with("received fatal alert"));
    let (cause, fix) = match (typed, alert) {
        (Some(tls_error), _) => {
            let fix = match tls_error {
                rustls::Error::InvalidCertificate(certificate) => match certificate {
                    rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. } => FIX_NAME,
                    rustls::CertificateError::Expired
                    | rustls::CertificateError::ExpiredContext { .. }
                    | rustls::CertificateError::NotValidYet
                    | rustls::CertificateError::NotValidYetContext { .. } => FIX_VALIDITY,
                    _ => FIX_CA,
                },
                rustls::Error::AlertReceived(_) => client_cert_fix,
                rustls::Error::InvalidMessage(_) => FIX_NOT_TLS,
                _ => FIX_OTHER,
            };
            (tls_error.to_string(), fix)
        }
        (None, Some(alert)) => (alert, client_cert_fix),
        (None, None) if closed_by_peer(status, &causes) => (
            "the member closed the connection right after the TLS handshake".to_owned(),
            client_cert_fix,
        ),
        (None, None) => return error.into(),
    };
    warn!(%cause, fix, "TLS handshake with etcd failed");
    EtcdConnectError::Handshake {
        endpoints: config.endpoints.join(","),
        cause,
        fix,
    }
}

/// Whether the member closed the connection under the request: cancelled (the connection
/// was gone before the request was sent), or a pipe broken or reset while sending it.
fn closed_by_peer(status: &tonic::Status, causes: &[&(dyn std::error::Error + 'static)]) -> bool {
    status.code() == tonic::Code::Cancelled
        || causes.iter().any(|cause| {
            cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::UnexpectedEof
                )
            })
        })
}

fn client_cert_given(config: &EtcdConfig) -> bool {
    config
        .tls
        .as_ref()
        .is_some_and(|tls| tls.client_cert.is_some())
}

/// The lease TTL etcd gets for `ttl`: whole seconds, rounded up.
pub fn lease_seconds(ttl: Duration) -> i64 {
    let millis = ttl.as_millis();
    i64::try_from(millis.div_ceil(1000))
        .unwrap_or(i64::MAX)
        .max(1)
}

/// Why a key under the prefix is kept out of the view; its [`reason`](Self::reason) labels
/// `fulcrum_registry_etcd_records_refused_total`. See the module docs.
#[derive(Debug, thiserror::Error)]
pub enum RecordRefusal {
    /// The value is not the JSON of a [`StoredRecord`].
    #[error("the value is not a stored registration: {0}")]
    Malformed(serde_json::Error),
    /// A stored registration whose instance does not validate.
    #[error("the stored instance is invalid: {0}")]
    Invalid(FieldErrors),
    /// A valid registration stored under another id's key.
    #[error("the stored instance's id `{id}` is not the one its key names")]
    IdMismatch {
        /// The stored instance's id.
        id: String,
    },
    /// A registration whose address this replica's [`AddressPolicy`] refuses.
    #[error("{refusal}")]
    AddressClass {
        /// The registered address.
        address: SocketAddr,
        /// The policy's refusal.
        refusal: Refusal,
    },
}

impl RecordRefusal {
    /// Every [`reason`](Self::reason) label.
    pub const REASONS: [&'static str; 4] = ["malformed", "invalid", "id_mismatch", "address_class"];

    /// The `reason` label: one of [`Self::REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Invalid(_) => "invalid",
            Self::IdMismatch { .. } => "id_mismatch",
            Self::AddressClass { .. } => "address_class",
        }
    }
}

/// Decodes the value of `id`'s key into a record, whatever its address.
fn decode(id: &str, kv: &KeyValue) -> Result<Record, RecordRefusal> {
    let stored: StoredRecord =
        serde_json::from_slice(kv.value()).map_err(RecordRefusal::Malformed)?;
    let registration = stored.instance.validate().map_err(RecordRefusal::Invalid)?;
    if *registration.id != *id {
        return Err(RecordRefusal::IdMismatch {
            id: registration.id.to_string(),
        });
    }
    Ok(Record {
        registration,
        owner: stored.owner.into(),
        registered_at_unix_ms: stored.registered_at_unix_ms,
        lease: kv.lease(),
        mod_revision: kv.mod_revision(),
    })
}

/// What the watcher takes from etcd into the view: the records this replica admits (see
/// the module docs). Owned by the watcher task.
struct Intake {
    prefix: String,
    addresses: AddressPolicy,
    /// `fulcrum_registry_etcd_records_refused_total{reason}`, every reason present from 0.
    refused: Family<RefusedRecordLabels, Counter>,
    /// Refused keys, each with the revision it was reported at. Invariant: only keys whose
    /// last value read was refused (an admitted value or a delete forgets its key, a load
    /// keeps only the keys it refused), so it holds at most the keys under the prefix.
    reported: HashMap<Vec<u8>, i64>,
}

impl Intake {
    fn new(prefix: String, addresses: AddressPolicy) -> Self {
        let refused = Family::default();
        for reason in RecordRefusal::REASONS {
            let _ = refused.get_or_create(&RefusedRecordLabels { reason });
        }
        Self {
            prefix,
            addresses,
            refused,
            reported: HashMap::new(),
        }
    }

    /// The instance id `key` names (every key read is under the prefix). A key that is not
    /// UTF-8, read lossily, names no valid id.
    fn id<'a>(&self, key: &'a str) -> &'a str {
        key.strip_prefix(self.prefix.as_str()).unwrap_or(key)
    }

    /// The record `kv` holds when this replica admits it. Otherwise `None`, and the refusal
    /// is reported unless it was at this revision already.
    fn admit(&mut self, kv: &KeyValue) -> Option<Record> {
        let key = String::from_utf8_lossy(kv.key());
        let refusal = match decode(self.id(&key), kv) {
            Ok(record) => {
                let address = record.registration.address();
                match self.addresses.check(address.ip()) {
                    Ok(()) => {
                        self.reported.remove(kv.key());
                        return Some(record);
                    }
                    Err(refusal) => RecordRefusal::AddressClass { address, refusal },
                }
            }
            Err(refusal) => refusal,
        };
        self.report(kv, &refusal);
        None
    }

    /// Logs and counts `refusal` of `kv`, once per key and revision.
    fn report(&mut self, kv: &KeyValue, refusal: &RecordRefusal) {
        let revision = kv.mod_revision();
        if self.reported.insert(kv.key().to_vec(), revision) == Some(revision) {
            return;
        }
        let reason = refusal.reason();
        self.refused
            .get_or_create(&RefusedRecordLabels { reason })
            .inc();
        let key = String::from_utf8_lossy(kv.key());
        match refusal {
            RecordRefusal::AddressClass { address, refusal } => warn!(
                %key,
                revision,
                %address,
                class = refusal.address_class().map_or("", AddressClass::as_str),
                reason,
                "skipping an etcd registration whose address this replica refuses (written by another replica allowing it with --registry-allow-addresses, or by another etcd client); allow its range here too if it is intended"
            ),
            other => {
                warn!(%key, revision, reason, error = %other, "skipping an etcd registration that is not a valid one")
            }
        }
    }

    /// Forgets `key`, deleted from etcd.
    fn forget(&mut self, key: &[u8]) {
        self.reported.remove(key);
    }

    /// Forgets every reported key but `refused`, the keys a whole load refused.
    fn keep_reported(&mut self, refused: &HashSet<Vec<u8>>) {
        self.reported.retain(|key, _| refused.contains(key));
    }
}

impl EtcdBackend {
    /// Connects, loads the current registrations `addresses` admits into `view` (see the
    /// module docs), and starts the watcher. `addresses` is the policy this replica's
    /// registry admits registrations with ([`crate::Limits::addresses`];
    /// [`Registry::on_etcd`](crate::Registry::on_etcd) passes it). Fails when the
    /// configuration cannot work (before connecting), when a TLS handshake fails, or when no
    /// member answers within the deadlines.
    pub async fn connect(
        config: EtcdConfig,
        view: Arc<View>,
        addresses: AddressPolicy,
    ) -> Result<Arc<Self>, EtcdConnectError> {
        Self::connect_with(config, view, addresses, Arc::new(DirectTxn)).await
    }

    /// [`connect`](Self::connect), sending every write transaction through `txns` (see
    /// [`commit`]).
    pub async fn connect_with(
        config: EtcdConfig,
        view: Arc<View>,
        addresses: AddressPolicy,
        txns: Arc<dyn TxnSender>,
    ) -> Result<Arc<Self>, EtcdConnectError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let tls = config.effective_tls()?;
        if let Some(tls) = &tls {
            options = options.with_tls(tls.client_options()?);
        }
        let tls = tls.is_some();
        // The client connects lazily: an error here is about the settings (the TLS
        // library refused them, or an endpoint is not a URL), not about the members.
        let connecting = Client::connect(config.endpoints.clone(), Some(options));
        let client = match tokio::time::timeout(config.request_timeout, connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                // etcd_client's errors do not chain to the error they wrap.
                let reason = match &error {
                    etcd_client::Error::TransportError(transport) => error_chain(transport),
                    other => other.to_string(),
                };
                return Err(EtcdConfigError::Rejected { reason }.into());
            }
            Err(_) => return Err(timed_out(&config, "connecting to etcd").into()),
        };
        let mut intake = Intake::new(config.prefix.clone(), addresses);
        let revision = load(&client, &config, &mut intake, &view)
            .await
            .map_err(|error| handshake_error(&config, tls, error))?;
        let reload_failures = Counter::default();
        let records_refused = intake.refused.clone();
        let watcher = tokio::spawn(watch_loop(
            client.clone(),
            config.clone(),
            intake,
            Arc::downgrade(&view),
            revision,
            reload_failures.clone(),
        ));
        info!(endpoints = %config.endpoints.join(","), tls, prefix = %config.prefix, registrations = view.len(), "etcd registry backend connected");
        Ok(Arc::new(Self {
            view,
            watcher,
            in_flight: Semaphore::new(config.max_writes_in_flight),
            places: Semaphore::new(config.max_writes_in_flight + config.max_queued_writes),
            reload_failures,
            records_refused,
            etcd: Etcd {
                client,
                config,
                txns,
            },
        }))
    }

    /// A write's turn to go to etcd, waited for until `deadline`; refused at once when the
    /// queue is full.
    async fn turn(&self, deadline: Instant) -> Result<[SemaphorePermit<'_>; 2], BackendError> {
        let config = &self.etcd.config;
        let place = self.places.try_acquire().map_err(|_| queue_full(config))?;
        match tokio::time::timeout_at(deadline, self.in_flight.acquire()).await {
            Ok(Ok(turn)) => Ok([place, turn]),
            // The semaphores are never closed.
            Ok(Err(_)) | Err(_) => Err(timed_out(config, "waiting for a turn to write")),
        }
    }

    async fn register_now(
        &self,
        registration: Registration,
        owner: &str,
        deadline: Instant,
    ) -> Result<Arc<Record>, BackendError> {
        let etcd = &self.etcd;
        let id = registration.id.to_string();
        let ttl = registration.ttl();
        let key = etcd.key(&id);
        for _ in 0..MAX_ATTEMPTS {
            let current = etcd.fetch(&id, deadline).await?;
            let (guard, registered_at_unix_ms, old_lease) = match &current {
                Some(current) if *current.owner != *owner => {
                    return Err(BackendError::NotOwner { id });
                }
                Some(current) => (
                    Guard::At(current.mod_revision),
                    current.registered_at_unix_ms,
                    current.lease,
                ),
                None => (Guard::Absent, unix_ms(), 0),
            };
            let stored = StoredRecord {
                instance: registration.to_spec(),
                owner: owner.to_owned(),
                registered_at_unix_ms,
            };
            let value = serde_json::to_vec(&stored).unwrap_or_default();
            let leases = etcd.client.lease_client();
            let seconds = lease_seconds(registration.ttl());
            let lease = call_failing_over(&etcd.config, deadline, "granting a lease", || {
                let mut leases = leases.clone();
                async move { leases.grant(seconds, None).await }
            })
            .await?
            .id();
            let compare = match guard {
                Guard::At(revision) => {
                    Compare::mod_revision(key.clone(), CompareOp::Equal, revision)
                }
                Guard::Absent => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            };
            let txn = Txn::new().when([compare]).and_then([TxnOp::put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
            // A write whose answer is lost may have committed: the lease is settled (revoked
            // or kept) only after the key is read again; see `commit`.
            let settle_later = || etcd.settle_later(id.clone(), guard, lease, old_lease, ttl);
            let response = match etcd.txn(txn, "writing a registration", deadline).await {
                Ok(response) => response,
                Err(error) => {
                    settle_later();
                    return Err(error);
                }
            };
            if !response.succeeded() {
                // Another write changed the key since it was read, or an attempt of this
                // very transaction, whose answer was lost, applied it.
                let stored = match etcd.fetch(&id, deadline).await {
                    Ok(stored) => stored,
                    Err(error) => {
                        settle_later();
                        return Err(error);
                    }
                };
                let fate = etcd.settle(stored.as_ref(), guard, lease, old_lease);
                if let (LeaseFate::Attached, Some(record)) = (fate, stored) {
                    self.view.upsert(record.clone());
                    return Ok(Arc::new(record));
                }
                debug!(instance = %id, "lost a registration race; retrying");
                continue;
            }
            // Committed: the stored registration holds the new lease, not the replaced one.
            if old_lease != lease {
                etcd.revoke(old_lease);
            }
            let mod_revision = response.header().map_or(0, |header| header.revision());
            let record = Record {
                registration,
                owner: owner.into(),
                registered_at_unix_ms,
                lease,
                mod_revision,
            };
            // Read your writes: the watch will bring the same record a moment later.
            self.view.upsert(record.clone());
            return Ok(Arc::new(record));
        }
        Err(BackendError::Unavailable {
            backend: "etcd",
            reason: format!(
                "instance `{id}` changed concurrently {MAX_ATTEMPTS} times in a row; retry"
            ),
            source: None,
        })
    }

    async fn heartbeat_now(
        &self,
        id: &str,
        owner: &str,
        deadline: Instant,
    ) -> Result<Duration, BackendError> {
        let etcd = &self.etcd;
        let record = etcd
            .fetch(id, deadline)
            .await?
            .ok_or_else(|| BackendError::NotFound { id: id.to_owned() })?;
        if *record.owner != *owner {
            return Err(BackendError::NotOwner { id: id.to_owned() });
        }
        // `keep_alive` sends one renewal and reads its answer; a lease that is gone (it
        // expired between the read and now) is reported as not found. A renewal is safe to
        // repeat, so a member that is down is failed over like a read.
        let lease = record.lease;
        let renewed = call_failing_over(&etcd.config, deadline, "renewing a lease", || {
            let mut leases = etcd.client.lease_client();
            async move {
                match leases.keep_alive(lease).await {
                    Ok(_) => Ok(true),
                    Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
                    Err(error) => Err(error),
                }
            }
        })
        .await?;
        if !renewed {
            return Err(BackendError::NotFound { id: id.to_owned() });
        }
        Ok(Duration::from_secs(
            lease_seconds(record.registration.ttl()).unsigned_abs(),
        ))
    }

    async fn deregister_now(
        &self,
        id: &str,
        owner: &str,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let etcd = &self.etcd;
        let key = etcd.key(id);
        for _ in 0..MAX_ATTEMPTS {
            let record = etcd
                .fetch(id, deadline)
                .await?
                .ok_or_else(|| BackendError::NotFound { id: id.to_owned() })?;
            if *record.owner != *owner {
                return Err(BackendError::NotOwner { id: id.to_owned() });
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    record.mod_revision,
                )])
                .and_then([TxnOp::delete(key.clone(), None)]);
            let response = etcd.txn(txn, "deleting a registration", deadline).await?;
            if response.succeeded() {
                // The key it held is gone: nothing can hang on the lease any more.
                etcd.revoke(record.lease);
                let revision = response.header().map_or(0, |header| header.revision());
                self.view.remove(id, Some(revision));
                return Ok(());
            }
        }
        Err(BackendError::Unavailable {
            backend: "etcd",
            reason: format!(
                "instance `{id}` changed concurrently {MAX_ATTEMPTS} times in a row; retry"
            ),
            source: None,
        })
    }
}

/// Keys read per page by [`load`]. etcd's client refuses an answer over 4 MiB (its default
/// maximum decoding size), and a registration the registry wrote takes at most about 3.5 KiB
/// as JSON (its published attributes are capped at [`crate::model::MAX_ENDPOINT_BYTES`], its
/// name, id, health check and owner are short), so a page of 500 stays under 2 MiB with room
/// for key names and framing, while a registry of 10,000 registrations loads in 20 requests.
const LOAD_PAGE: i64 = 500;

/// The end of the key range of every key starting with `prefix` (etcd's `--prefix`): the
/// prefix with its last byte below 0xff incremented and what follows dropped; `\0` (every
/// key) when it is all 0xff bytes.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Loads every registration `intake` admits into the view (applying only differences);
/// returns the revision the load was at. The prefix is read in pages of [`LOAD_PAGE`] keys,
/// every page at the revision of the first, so the view gets one consistent state however
/// large the registry is. Any page failing (each has its own deadline) fails the whole load
/// and the view keeps what it had.
async fn load(
    client: &Client,
    config: &EtcdConfig,
    intake: &mut Intake,
    view: &View,
) -> Result<i64, BackendError> {
    let mut kv = client.kv_client();
    let end = prefix_end(config.prefix.as_bytes());
    let mut from = config.prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut records = Vec::new();
    let mut refused = HashSet::new();
    let mut page = LOAD_PAGE;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let what = "loading the registrations";
        let answer = tokio::time::timeout_at(deadline(config), kv.get(from.clone(), Some(options)));
        let response = match answer.await {
            Ok(Ok(response)) => response,
            // An answer over the client's 4 MiB: values larger than this registry writes
            // (another writer's under the prefix). Halve the page; one value (etcd takes at
            // most 1.5 MiB by default) always fits.
            Ok(Err(etcd_client::Error::GRpcStatus(status)))
                if status.code() == tonic::Code::OutOfRange && page > 1 =>
            {
                page = (page / 2).max(1);
                warn!(%status, page, "an etcd answer was too large; reading fewer keys at a time");
                continue;
            }
            Ok(Err(error)) => return Err(unavailable(config, what, error)),
            Err(_) => return Err(timed_out(config, what)),
        };
        if revision == 0 {
            revision = response.header().map_or(0, |header| header.revision());
        }
        for kv in response.kvs() {
            match intake.admit(kv) {
                Some(record) => records.push(record),
                None => {
                    refused.insert(kv.key().to_vec());
                }
            }
        }
        match response.kvs().last() {
            Some(last) if response.more() => {
                // The next page starts just after the last key read.
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    intake.keep_reported(&refused);
    view.replace_all(records);
    Ok(revision)
}

/// Keeps the view current with what `intake` admits until it is dropped: watch from
/// `revision + 1`; on a break, reload and watch again, with a backoff of up to 2 s while etcd
/// is unreachable, counting each failed reload in `reload_failures`.
async fn watch_loop(
    client: Client,
    config: EtcdConfig,
    mut intake: Intake,
    view: Weak<View>,
    mut revision: i64,
    reload_failures: Counter,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match watch_once(&client, &config, &mut intake, &view, revision).await {
            WatchEnd::ViewDropped => return,
            WatchEnd::Broken(reason) => {
                warn!(%reason, "etcd watch ended; reloading the registrations");
            }
        }
        loop {
            let Some(strong) = view.upgrade() else { return };
            match load(&client, &config, &mut intake, &strong).await {
                Ok(loaded) => {
                    revision = loaded;
                    backoff = Duration::from_millis(100);
                    info!(
                        revision,
                        registrations = strong.len(),
                        "reloaded the registrations from etcd"
                    );
                    break;
                }
                Err(error) => {
                    reload_failures.inc();
                    warn!(%error, retry_in = ?backoff, "cannot reload from etcd; serving the last known registrations");
                    drop(strong);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

enum WatchEnd {
    ViewDropped,
    Broken(String),
}

async fn watch_once(
    client: &Client,
    config: &EtcdConfig,
    intake: &mut Intake,
    view: &Weak<View>,
    revision: i64,
) -> WatchEnd {
    let mut watches = client.watch_client();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = match call(
        config,
        deadline(config),
        "starting the watch",
        watches.watch(config.prefix.clone(), Some(options)),
    )
    .await
    {
        Ok(stream) => stream,
        Err(error) => return WatchEnd::Broken(error.to_string()),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return WatchEnd::Broken("the watch stream closed".into()),
            Err(error) => return WatchEnd::Broken(error.to_string()),
        };
        if response.compact_revision() > 0 {
            return WatchEnd::Broken(format!(
                "revision {} was compacted (now {})",
                revision + 1,
                response.compact_revision()
            ));
        }
        if response.canceled() {
            return WatchEnd::Broken(format!("canceled: {}", response.cancel_reason()));
        }
        let Some(view) = view.upgrade() else {
            return WatchEnd::ViewDropped;
        };
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key());
            let id = intake.id(&key);
            match event.event_type() {
                EventType::Put => match intake.admit(kv) {
                    Some(record) => view.upsert(record),
                    // What the view held under this key is no longer what etcd holds.
                    None => {
                        if view.remove(id, Some(kv.mod_revision())) {
                            info!(instance = %id, "registration removed: etcd now holds a value this replica refuses");
                        }
                    }
                },
                EventType::Delete => {
                    intake.forget(kv.key());
                    if view.remove(id, Some(kv.mod_revision())) {
                        info!(instance = %id, "registration removed in etcd (deregistered or lease expired)");
                    }
                }
            }
        }
    }
}

impl RegistryBackend for EtcdBackend {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn reload_failures(&self) -> Option<Counter> {
        Some(self.reload_failures.clone())
    }

    fn records_refused(&self) -> Option<Family<RefusedRecordLabels, Counter>> {
        Some(self.records_refused.clone())
    }

    fn register<'a>(
        &'a self,
        registration: Registration,
        owner: &'a str,
    ) -> BackendFuture<'a, Arc<Record>> {
        Box::pin(async move {
            let deadline = deadline(&self.etcd.config);
            let _turn = self.turn(deadline).await?;
            self.register_now(registration, owner, deadline).await
        })
    }

    fn heartbeat<'a>(&'a self, id: &'a str, owner: &'a str) -> BackendFuture<'a, Duration> {
        Box::pin(async move {
            let deadline = deadline(&self.etcd.config);
            let _turn = self.turn(deadline).await?;
            self.heartbeat_now(id, owner, deadline).await
        })
    }

    fn deregister<'a>(&'a self, id: &'a str, owner: &'a str) -> BackendFuture<'a, ()> {
        Box::pin(async move {
            let deadline = deadline(&self.etcd.config);
            let _turn = self.turn(deadline).await?;
            self.deregister_now(id, owner, deadline).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ttls_round_up_to_whole_seconds() {
        assert_eq!(lease_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(lease_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(lease_seconds(Duration::from_millis(30_000)), 30);
    }

    #[test]
    fn every_record_refusal_has_a_listed_reason() {
        let loopback: SocketAddr = "127.0.0.1:80".parse().expect("address");
        let refusals = [
            RecordRefusal::Malformed(
                serde_json::from_slice::<StoredRecord>(b"x").expect_err("not JSON"),
            ),
            RecordRefusal::Invalid(FieldErrors(Vec::new())),
            RecordRefusal::IdMismatch { id: "a".into() },
            RecordRefusal::AddressClass {
                address: loopback,
                refusal: AddressPolicy::default()
                    .check(loopback.ip())
                    .expect_err("loopback"),
            },
        ];
        let reasons: Vec<&str> = refusals.iter().map(RecordRefusal::reason).collect();
        assert_eq!(reasons, RecordRefusal::REASONS);
    }

    #[test]
    fn the_prefix_range_ends_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }
}
