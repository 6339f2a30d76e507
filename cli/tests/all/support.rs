//! Shared fixtures: running the built `fulcrum` binary, and a control plane serving a policy
//! file with an admin token, in-process on loopback.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use fulcrum_control_plane::{Config, ControlPlane, OptionalSources, PolicySource};
use fulcrum_core::diagnostics::{
    EndpointDiagnostics, MAX_WORKER_BYTES, compose_report, encode_worker,
};
use fulcrum_test_support::eventually;

/// How long any eventually-consistent expectation may take.
pub const PATIENCE: Duration = Duration::from_secs(15);
/// The admin token the fixture's control plane requires.
pub const ADMIN_TOKEN: &str = "cli-test-admin-token-0123456789";

/// The repository's root.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ is in the repository")
        .to_owned()
}

/// What a run of `fulcrum` did.
#[derive(Debug)]
pub struct Run {
    /// Its exit code.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the built `fulcrum` with `args`, no control-plane settings from the environment, and
/// no proxy (every call is loopback).
pub fn fulcrum(args: &[&str]) -> Run {
    fulcrum_with(args, &[])
}

/// [`fulcrum`] with `env` set as well.
pub fn fulcrum_with(args: &[&str], env: &[(&str, &str)]) -> Run {
    finished(command(args, env).output().expect("fulcrum runs"))
}

/// A `fulcrum` started and not yet waited for.
#[derive(Debug)]
pub struct Background(Child);

impl Background {
    /// Waits for it to exit (it must exit by itself: give it a bound, as `--wait` does).
    pub fn finish(self) -> Run {
        finished(self.0.wait_with_output().expect("fulcrum runs"))
    }
}

fn finished(output: Output) -> Run {
    Run {
        code: output.status.code().expect("fulcrum exits, not killed"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The built `fulcrum` with `args` and `env`, no control-plane settings or proxy from the
/// environment.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fulcrum"));
    command.args(args);
    for name in [
        "FULCRUM_SERVER",
        "FULCRUM_ADMIN",
        "FULCRUM_ADMIN_TOKEN",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command
}

/// A control plane serving one static endpoint and the policy in a file it polls, its admin
/// API requiring [`ADMIN_TOKEN`]; stopped on drop.
pub struct Served {
    control_plane: Option<ControlPlane>,
    runtime: tokio::runtime::Runtime,
    policy_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Served {
    /// Starts serving `policy_yaml` and waits until it is accepted.
    pub fn start(policy_yaml: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoints = dir.path().join("endpoints.yaml");
        std::fs::write(
            &endpoints,
            "services:\n  checkout:\n    endpoints:\n      - { address: \"127.0.0.1:19001\" }\n",
        )
        .expect("write endpoints");
        let tokens = dir.path().join("admin-tokens");
        std::fs::write(&tokens, format!("ops {ADMIN_TOKEN}\n")).expect("write tokens");
        let policy_file = dir.path().join("policy.yaml");
        std::fs::write(&policy_file, policy_yaml).expect("write policy");
        let control_plane = runtime
            .block_on(ControlPlane::start_with(
                Config {
                    static_file: Some(endpoints),
                    poll_interval: Duration::from_millis(50),
                    debounce: Duration::from_millis(10),
                    admin_token_file: Some(tokens),
                    ..Config::default()
                },
                OptionalSources {
                    policy: Some(PolicySource::File(policy_file.clone())),
                    ..OptionalSources::default()
                },
            ))
            .expect("the control plane starts");
        let served = Self {
            control_plane: Some(control_plane),
            runtime,
            policy_file,
            dir,
        };
        served.wait_for_versions(1);
        served
    }

    fn control_plane(&self) -> &ControlPlane {
        self.control_plane.as_ref().expect("running until dropped")
    }

    /// `--server URL --admin URL` of this control plane.
    pub fn urls(&self) -> [String; 4] {
        [
            "--server".to_owned(),
            format!("http://{}", self.control_plane().http_address()),
            "--admin".to_owned(),
            format!("http://{}", self.control_plane().admin_address()),
        ]
    }

    /// Runs `fulcrum` against this control plane with `args`, the token in
    /// `FULCRUM_ADMIN_TOKEN`.
    pub fn fulcrum(&self, args: &[&str]) -> Run {
        let urls = self.urls();
        let mut all: Vec<&str> = urls.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        fulcrum_with(&all, &[("FULCRUM_ADMIN_TOKEN", ADMIN_TOKEN)])
    }

    /// Starts [`Served::fulcrum`] without waiting for it.
    pub fn fulcrum_in_background(&self, args: &[&str]) -> Background {
        let urls = self.urls();
        let mut all: Vec<&str> = urls.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        let child = command(&all, &[("FULCRUM_ADMIN_TOKEN", ADMIN_TOKEN)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("fulcrum starts");
        Background(child)
    }

    /// Writes a file into the fixture's directory; its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("utf-8 path").to_owned()
    }

    /// Replaces the served policy file (write, then rename, as a deploy does) and waits until
    /// the control plane has accepted `versions` versions in all.
    pub fn replace_policy(&self, policy_yaml: &str, versions: u64) {
        let staging = self.policy_file.with_extension("yaml.tmp");
        std::fs::write(&staging, policy_yaml).expect("write staging");
        std::fs::rename(&staging, &self.policy_file).expect("rename into place");
        self.wait_for_versions(versions);
    }

    /// Waits until the current policy version is `version` and the snapshot serves it.
    pub fn wait_for_versions(&self, version: u64) {
        let http = self.control_plane().http_address();
        let current_and_served = || async move {
            let client = reqwest::Client::builder().no_proxy().build().ok()?;
            let get = |path: &str| {
                let request = client.get(format!("http://{http}{path}")).send();
                async move { request.await.ok()?.json::<serde_json::Value>().await.ok() }
            };
            let history = get("/v1/policy/history").await?;
            let current = history.as_array()?.last()?.clone();
            let snapshot = get("/v1/snapshot").await?;
            (current["version"] == version && snapshot["policy"] == current["policy"]).then_some(())
        };
        self.runtime
            .block_on(eventually(
                PATIENCE,
                "the policy version served",
                current_and_served,
            ))
            .unwrap_or_else(|error| panic!("policy version {version} never served: {error}"));
    }

    /// The version of the snapshot served.
    pub fn snapshot_version(&self) -> String {
        self.snapshot()["version"]
            .as_str()
            .expect("a version")
            .to_owned()
    }

    /// Polls the snapshot once as a filter of Envoy node `node_id` at snapshot `version`
    /// does.
    pub fn poll_as(&self, node_id: &str, version: Option<&str>) {
        let url = format!("http://{}/v1/snapshot", self.control_plane().http_address());
        self.runtime
            .block_on(poll(url, node_id.to_owned(), version.map(str::to_owned)));
    }

    /// Polls as [`Served::poll_as`] every 200 ms, as a running filter does, until dropped.
    pub fn keep_polling_as(&self, node_id: &str, version: &str) -> Poller {
        let url = format!("http://{}/v1/snapshot", self.control_plane().http_address());
        let (node_id, version) = (node_id.to_owned(), version.to_owned());
        Poller(self.runtime.spawn(async move {
            loop {
                poll(url.clone(), node_id.clone(), Some(version.clone())).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }))
    }

    /// Polls as [`Served::keep_polling_as`] does and answers every diagnostics request an
    /// answer carries as a filter does: one report of `workers` (slot and endpoints) for the
    /// service asked, built by the core functions the filter uses, posted to
    /// `/v1/diagnostics`. Stops on drop.
    pub fn answer_diagnostics_as(
        &self,
        node_id: &str,
        version: &str,
        workers: Vec<(u32, Vec<EndpointDiagnostics>)>,
    ) -> Poller {
        let base = format!("http://{}", self.control_plane().http_address());
        let (node_id, version) = (node_id.to_owned(), version.to_owned());
        Poller(self.runtime.spawn(async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client");
            loop {
                let answer = client
                    .get(format!("{base}/v1/snapshot"))
                    .header("x-fulcrum-node-id", &node_id)
                    .header("if-none-match", format!("\"{version}\""))
                    .send()
                    .await
                    .expect("request");
                let asked = answer
                    .headers()
                    .get("x-fulcrum-diagnose")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.split_once(' '))
                    .and_then(|(id, service)| Some((id.parse::<u64>().ok()?, service.to_owned())));
                if let Some((id, service)) = asked {
                    let blobs: Vec<Vec<u8>> = workers
                        .iter()
                        .map(|(slot, endpoints)| {
                            encode_worker(*slot, Some(&version), endpoints, MAX_WORKER_BYTES)
                        })
                        .collect();
                    let body = compose_report(&service, id, blobs.iter().map(Vec::as_slice));
                    let status = client
                        .post(format!("{base}/v1/diagnostics"))
                        .header("x-fulcrum-node-id", &node_id)
                        .body(body)
                        .send()
                        .await
                        .expect("report")
                        .status();
                    assert_eq!(status.as_u16(), 204, "the report is kept");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }))
    }

    /// The served snapshot's policy, as JSON.
    pub fn served_policy(&self) -> serde_json::Value {
        self.snapshot()["policy"].clone()
    }

    /// The snapshot served, as JSON.
    fn snapshot(&self) -> serde_json::Value {
        let url = format!("http://{}/v1/snapshot", self.control_plane().http_address());
        self.runtime.block_on(async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client");
            client
                .get(url)
                .send()
                .await
                .expect("request")
                .json()
                .await
                .expect("a snapshot")
        })
    }
}

/// A filter's polls, as [`Served::keep_polling_as`] makes them; they stop on drop.
#[derive(Debug)]
pub struct Poller(tokio::task::JoinHandle<()>);

impl Drop for Poller {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One snapshot poll at `url` naming `node_id` and the `version` it is at.
async fn poll(url: String, node_id: String, version: Option<String>) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let mut request = client.get(url).header("x-fulcrum-node-id", node_id);
    if let Some(version) = version {
        request = request.header("if-none-match", format!("\"{version}\""));
    }
    let status = request.send().await.expect("request").status();
    assert!(status.is_success() || status.as_u16() == 304, "{status}");
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(control_plane) = self.control_plane.take() {
            self.runtime.block_on(control_plane.shutdown());
        }
    }
}
