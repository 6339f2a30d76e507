//! [`PolicyFile`]: a policy file polled for changes.
//!
//! Polled rather than watched with inotify, like the static endpoints file: read and hashed
//! every interval (500 ms by default), which works on every filesystem and with editors and
//! ConfigMap volume mounts that replace the file instead of writing it. Each distinct content
//! is offered once, so a bad edit is reported once and a rollback holds until the file changes.

use std::{path::PathBuf, time::Duration};

use sha2::{Digest, Sha256};
use tracing::error;

use crate::{OfferError, PolicyFormat, PolicyStore};

/// A policy file polled for changes. Format: JSON for `*.json`, YAML otherwise.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    path: PathBuf,
    format: PolicyFormat,
    interval: Duration,
}

impl PolicyFile {
    /// Polls `path` every 500 ms.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let format = PolicyFormat::from_name(&path.to_string_lossy());
        Self {
            path,
            format,
            interval: Duration::from_millis(500),
        }
    }

    /// Polls every `interval` instead.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    fn origin(&self) -> String {
        format!("file:{}", self.path.display())
    }

    /// Offers the file's content to `store` now and after every change, until dropped.
    pub async fn run(self, store: PolicyStore) {
        let origin = self.origin();
        let mut last_seen: Option<Result<[u8; 32], String>> = None;
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let seen = match tokio::fs::read_to_string(&self.path).await {
                Ok(text) => Ok((Sha256::digest(text.as_bytes()).into(), text)),
                Err(problem) => Err(problem.to_string()),
            };
            let fingerprint = seen.as_ref().map(|(hash, _)| *hash).map_err(Clone::clone);
            if last_seen.as_ref() == Some(&fingerprint) {
                continue;
            }
            last_seen = Some(fingerprint);
            match seen {
                Ok((_, text)) => {
                    // Rejections are logged and counted by the store; a text that could not
                    // be recorded is offered again at the next tick.
                    if let Err(OfferError::NotRecorded(_)) =
                        store.offer(&text, self.format, &origin).await
                    {
                        last_seen = None;
                    }
                }
                Err(problem) => error!(
                    origin = %origin,
                    error = %problem,
                    "cannot read the policy file; keeping the current policy"
                ),
            }
        }
    }
}
