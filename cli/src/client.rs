//! The control plane's APIs as the CLI calls them: the read-only HTTP API (`--server`) and
//! the authenticated admin API (`--admin`, `--token`).
//!
//! Blocking `reqwest`: a command makes one or two calls and waits for each, so there is no
//! runtime to manage in the commands. Every failure says what to fix: the server down or
//! mistyped (`--server`), the token missing or wrong (`--token` / `FULCRUM_ADMIN_TOKEN`), a
//! version not kept (the versions that are). The response types are the control plane's own
//! (`fulcrum_core::Snapshot`, `fulcrum_policy::AppliedPolicy`), so the two cannot disagree on
//! the wire format.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use fulcrum_core::Snapshot;
use fulcrum_policy::AppliedPolicy;
use reqwest::{
    StatusCode,
    blocking::{Client, RequestBuilder, Response},
};
use serde::de::DeserializeOwned;

/// Where the control plane answers, and how to authenticate to its admin API.
#[derive(Debug, Clone, Args)]
pub struct Endpoints {
    /// The control plane's HTTP API (read-only: snapshot, status).
    #[arg(
        long,
        global = true,
        env = "FULCRUM_SERVER",
        value_name = "URL",
        default_value = "http://127.0.0.1:18080"
    )]
    pub server: String,
    /// The control plane's admin API (policy history and rollback).
    #[arg(
        long,
        global = true,
        env = "FULCRUM_ADMIN",
        value_name = "URL",
        default_value = "http://127.0.0.1:18081"
    )]
    pub admin: String,
    /// Bearer token for the admin API, one of its `--admin-token-file` tokens. Prefer the
    /// environment variable: a command-line argument is visible to every user of the host.
    #[arg(
        long,
        global = true,
        env = "FULCRUM_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Give up on a call to the control plane after this many seconds.
    #[arg(
        long,
        global = true,
        value_name = "SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub timeout: u64,
}

/// A connection to one control plane.
#[derive(Debug)]
pub struct ControlPlane {
    client: Client,
    server: String,
    admin: String,
    token: Option<String>,
}

impl ControlPlane {
    /// A client for `endpoints`; fails only when the HTTP client cannot be built.
    pub fn new(endpoints: &Endpoints) -> Result<Self> {
        let client = Client::builder()
            .timeout(Duration::from_secs(endpoints.timeout))
            .user_agent(concat!("fulcrum-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            client,
            server: endpoints.server.trim_end_matches('/').to_owned(),
            admin: endpoints.admin.trim_end_matches('/').to_owned(),
            token: endpoints.token.clone(),
        })
    }

    /// The snapshot the control plane serves the filters (`GET /v1/snapshot`).
    pub fn snapshot(&self) -> Result<Snapshot> {
        let url = format!("{}/v1/snapshot", self.server);
        let response = send(self.client.get(&url), &url, "--server")?;
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            bail!(
                "the control plane at {} has no snapshot yet (no endpoints or no valid policy \
                 accepted so far); see its log or GET /v1/status",
                self.server
            );
        }
        json(response, &url)
    }

    /// The proxies whose filters poll the control plane (`GET /v1/proxies[?state=S]`).
    pub fn proxies(&self, state: Option<&str>) -> Result<crate::proxies::Proxies> {
        let url = match state {
            Some(state) => format!("{}/v1/proxies?state={state}", self.server),
            None => format!("{}/v1/proxies", self.server),
        };
        let response = send(self.client.get(&url), &url, "--server")?;
        if response.status() == StatusCode::NOT_FOUND {
            bail!(
                "the control plane at {} has no /v1/proxies: it predates proxy status; upgrade it",
                self.server
            );
        }
        json(response, &url)
    }

    /// What proxy `node` believes about each endpoint of `service`
    /// (`GET /v1/proxies/{node}/endpoints`), waiting up to `wait` for its report.
    pub fn endpoints(
        &self,
        node: &str,
        service: &str,
        wait: Duration,
    ) -> Result<fulcrum_core::diagnostics::EndpointsView> {
        let mut url = reqwest::Url::parse(&format!("{}/v1/proxies", self.server))
            .with_context(|| format!("--server {} is not a URL", self.server))?;
        url.path_segments_mut()
            .map_err(|()| anyhow!("--server {} cannot take a path", self.server))?
            .push(node)
            .push("endpoints");
        url.query_pairs_mut()
            .append_pair("service", service)
            .append_pair("wait", &wait.as_secs().to_string());
        let shown = url.to_string();
        // The control plane holds the request for up to `wait`.
        let request = self.client.get(url).timeout(wait + Duration::from_secs(5));
        let response = send(request, &shown, "--server")?;
        match response.status() {
            StatusCode::NOT_FOUND => {
                let body = response.text().unwrap_or_default();
                if body.trim().is_empty() {
                    bail!(
                        "the control plane at {} has no endpoint diagnostics: it predates them; upgrade it",
                        self.server
                    );
                }
                bail!("{}", body.trim());
            }
            StatusCode::GATEWAY_TIMEOUT => {
                let body = response.text().unwrap_or_default();
                bail!("{}", body.trim());
            }
            _ => json(response, &shown),
        }
    }

    /// The kept policy versions, oldest first, the last current (`GET /v1/policy/history`
    /// on the admin API).
    pub fn policy_history(&self) -> Result<Vec<AppliedPolicy>> {
        let url = format!("{}/v1/policy/history", self.admin);
        let response = send(self.authorized(self.client.get(&url)), &url, "--admin")?;
        json(self.admitted(response, &url)?, &url)
    }

    /// Makes kept version `version` current again, as a new version
    /// (`POST /v1/policy/rollback?version=N` on the admin API); the new version.
    pub fn rollback(&self, version: u64) -> Result<AppliedPolicy> {
        let url = format!("{}/v1/policy/rollback?version={version}", self.admin);
        let response = send(self.authorized(self.client.post(&url)), &url, "--admin")?;
        json(self.admitted(response, &url)?, &url)
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// `response` unless the admin API refused the token.
    fn admitted(&self, response: Response, url: &str) -> Result<Response> {
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let reason = response.text().unwrap_or_default();
        let advice = if self.token.is_some() {
            "the token given is not one of its --admin-token-file tokens"
        } else {
            "it requires a token: set FULCRUM_ADMIN_TOKEN (or --token)"
        };
        bail!(
            "the admin API at {url} refused the request ({}): {advice}",
            reason.trim()
        )
    }
}

/// Sends `request`, turning transport failures into advice naming `flag`.
fn send(request: RequestBuilder, url: &str, flag: &str) -> Result<Response> {
    if !url.starts_with("http://") {
        bail!(
            "cannot call {url}: this fulcrum speaks plain http:// only, no TLS yet; give {flag} \
             as http://HOST:PORT"
        );
    }
    request.send().map_err(|error| {
        let what = if error.is_timeout() {
            "did not answer in time"
        } else if error.is_connect() {
            "cannot be reached"
        } else {
            "failed"
        };
        anyhow!(error).context(format!(
            "the control plane at {url} {what}: is it running and is {flag} right?"
        ))
    })
}

/// The JSON body of a successful `response`, or its status and text as the error.
fn json<T: DeserializeOwned>(response: Response, url: &str) -> Result<T> {
    let status = response.status();
    if !status.is_success() {
        let body = response.text().unwrap_or_default();
        bail!("{url} answered {status}: {}", body.trim());
    }
    response
        .json()
        .with_context(|| format!("{url} answered with JSON this fulcrum cannot read (is the control plane a different version?)"))
}
