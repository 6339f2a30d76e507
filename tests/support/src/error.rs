//! What can go wrong starting, waiting for or talking to the processes the crate runs: one
//! enum, so a test's `?` or `expect` gets the whole story (which process, its log's tail).

use std::{path::PathBuf, process::ExitStatus, time::Duration};

/// An error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No Envoy binary was given or found.
    #[error(
        "no Envoy binary: FULCRUM_ENVOY is unset and {stamp} does not exist; run cargo xtask setup"
    )]
    EnvoyMissing {
        /// The stamp file looked at.
        stamp: PathBuf,
    },
    /// A file, socket or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// What was awaited did not happen in time.
    #[error("not within {within:?}: {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it was given.
        within: Duration,
    },
    /// A child process exited (or was found dead) when it should have been running.
    #[error("{name} exited with {status}\n--- tail of {} ---\n{tail}", log.display())]
    Exited {
        /// The process's name.
        name: String,
        /// How it exited.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// A child process is running but did not become ready in time.
    #[error("{name} did not become ready: {reason}\n--- tail of {} ---\n{tail}", log.display())]
    NotReady {
        /// The process's name.
        name: String,
        /// What it was awaited for.
        reason: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// An HTTP request (to Envoy's admin API, say) failed.
    #[error("GET {url} failed: {source}")]
    Http {
        /// The URL.
        url: String,
        /// The HTTP error.
        #[source]
        source: reqwest::Error,
    },
    /// An admin response was not the JSON expected.
    #[error("Envoy admin {path} returned invalid JSON: {source}")]
    Json {
        /// The admin path.
        path: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// Envoy has no listener of that name (or reports no socket address for it).
    #[error("Envoy has no listener named {name}; /listeners says {listeners}")]
    NoListener {
        /// The listener asked for.
        name: String,
        /// What Envoy reported.
        listeners: String,
    },
}

/// A closure making an [`Error::Io`] about `what`, for `map_err`.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
