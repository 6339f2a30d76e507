//! The built `fulcrum-control-plane` binary: serves Envoy from a file and exits cleanly on
//! SIGTERM even with an ADS stream open; with `--registry etcd` and no file, serves gRPC
//! registrations to Envoy and keeps them across a restart (on a real one-member etcd).

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fulcrum_envoy_harness::{AdsApi, AdsBootstrap, Envoy, eventually, free_port};

use crate::support::{PATIENCE, addresses, endpoint, endpoints_file, http_client, wait_for_hosts};

/// Kills the process on drop unless it already exited.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_envoy_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("endpoints.yaml");
    std::fs::write(
        &file,
        endpoints_file(&[("checkout", vec![endpoint("127.0.0.1:19001", "")])]),
    )
    .expect("write");
    let xds = format!("127.0.0.1:{}", free_port().expect("port"));
    let http = format!("127.0.0.1:{}", free_port().expect("port"));
    let log = std::fs::File::create(dir.path().join("control-plane.log")).expect("log file");
    let mut process = Running(
        Command::new(env!("CARGO_BIN_EXE_fulcrum-control-plane"))
            .args(["--static-file", file.to_str().expect("utf-8 path")])
            .args(["--xds-addr", &xds, "--http-addr", &http])
            .args(["--debounce-ms", "10", "--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the binary"),
    );
    let client = http_client();
    let ready = eventually(PATIENCE, || async {
        let response = client
            .get(format!("http://{http}/readyz"))
            .send()
            .await
            .ok()?;
        response.status().is_success().then_some(())
    })
    .await;
    assert!(ready.is_some(), "the binary becomes ready");

    let bootstrap = AdsBootstrap::new("binary", xds.parse().expect("address"), AdsApi::Sotw);
    let envoy = Envoy::start(&bootstrap.render())
        .await
        .expect("Envoy starts");
    let hosts = wait_for_hosts(&envoy, "checkout", "its endpoint", |hosts| hosts.len() == 1).await;
    assert_eq!(addresses(&hosts), ["127.0.0.1:19001"]);

    let pid = process.0.id().to_string();
    let signalled = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(signalled.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = process.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the binary did not exit within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log = std::fs::read_to_string(dir.path().join("control-plane.log")).unwrap_or_default();
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("shutting down"), "{log}");
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
}

const REGISTRY_TOKEN: &str = "binary-registry-token-0123456789";

/// A one-member etcd on loopback, killed on drop.
struct Etcd {
    _process: Running,
    url: String,
}

impl Etcd {
    async fn start(dir: &std::path::Path) -> Self {
        let client = format!("http://127.0.0.1:{}", free_port().expect("port"));
        let peer = format!("http://127.0.0.1:{}", free_port().expect("port"));
        let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd log");
        let process = Running(
            Command::new("etcd")
                .args(["--name", "solo"])
                .arg("--data-dir")
                .arg(dir.join("etcd-data"))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("solo={peer}")])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start etcd (apt-get install etcd-server, or cargo xtask setup)"),
        );
        let http = http_client();
        let healthy = eventually(PATIENCE, || async {
            let body = http
                .get(format!("{client}/health"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            body.contains("true").then_some(())
        })
        .await;
        assert!(healthy.is_some(), "etcd becomes healthy");
        Self {
            _process: process,
            url: client,
        }
    }
}

/// Sends SIGTERM and waits (bounded) for a successful exit.
async fn terminate(process: &mut Running) {
    let signalled = Command::new("kill")
        .args(["-TERM", &process.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(signalled.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = process.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the binary did not exit within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_with_etcd_registry_serves_grpc_registrations_to_envoy_across_a_restart() {
    use fulcrum_proto::registry::v1 as pb;

    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(dir.path()).await;
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("orders-team {REGISTRY_TOKEN}\n")).expect("tokens");
    let xds = format!("127.0.0.1:{}", free_port().expect("port"));
    let http = format!("127.0.0.1:{}", free_port().expect("port"));
    let grpc = format!("127.0.0.1:{}", free_port().expect("port"));
    let client = http_client();
    // No --static-file: the registry is the only endpoint source.
    let start = |run: &str| {
        let log = std::fs::File::create(dir.path().join(format!("control-plane-{run}.log")))
            .expect("log file");
        Running(
            Command::new(env!("CARGO_BIN_EXE_fulcrum-control-plane"))
                .args(["--registry", "etcd", "--etcd-endpoints", &etcd.url])
                .args(["--etcd-prefix", "/binary-test/instances"])
                .arg("--registry-token-file")
                .arg(&tokens)
                .args(["--registry-addr", &grpc])
                .args(["--xds-addr", &xds, "--http-addr", &http])
                .args(["--debounce-ms", "10", "--log-level", "info"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start the binary"),
        )
    };
    let discover = || async {
        let response = client
            .get(format!(
                "http://{http}/v1/registry/services/orders/instances"
            ))
            .bearer_auth(REGISTRY_TOKEN)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body: serde_json::Value = response.json().await.ok()?;
        Some(
            body["registrations"]
                .as_array()?
                .iter()
                .filter_map(|r| r["instance"]["id"].as_str().map(str::to_owned))
                .collect::<Vec<_>>(),
        )
    };

    let mut process = start("first");
    let bootstrap = AdsBootstrap::new(
        "binary-registry",
        xds.parse().expect("address"),
        AdsApi::Sotw,
    );
    let envoy = Envoy::start(&bootstrap.render())
        .await
        .expect("Envoy starts");
    let mut registry = eventually(PATIENCE, || async {
        pb::registry_client::RegistryClient::connect(format!("http://{grpc}"))
            .await
            .ok()
    })
    .await
    .expect("the registry's gRPC API answers");
    let mut request = tonic::Request::new(pb::RegisterRequest {
        instance: Some(pb::Instance {
            name: "orders".into(),
            id: "orders-1".into(),
            address: "127.0.0.1".into(),
            port: 19601,
            ..pb::Instance::default()
        }),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {REGISTRY_TOKEN}").parse().expect("ascii"),
    );
    let registered = registry
        .register(request)
        .await
        .expect("gRPC register")
        .into_inner();
    assert_eq!(
        registered.registration.expect("registration").owner,
        "orders-team"
    );
    let hosts = wait_for_hosts(&envoy, "orders", "the registered instance", |hosts| {
        hosts.len() == 1
    })
    .await;
    assert_eq!(addresses(&hosts), ["127.0.0.1:19601"]);

    // The registration lives in etcd: a restarted control plane still has it.
    terminate(&mut process).await;
    let mut process = start("second");
    let ids = eventually(PATIENCE, || async {
        discover().await.filter(|ids| !ids.is_empty())
    })
    .await;
    assert_eq!(ids, Some(vec!["orders-1".to_owned()]));

    let deregistered = client
        .delete(format!("http://{http}/v1/registry/instances/orders-1"))
        .bearer_auth(REGISTRY_TOKEN)
        .send()
        .await
        .expect("deregister");
    assert_eq!(deregistered.status(), reqwest::StatusCode::NO_CONTENT);
    wait_for_hosts(&envoy, "orders", "no host", <[_]>::is_empty).await;
    terminate(&mut process).await;
}
