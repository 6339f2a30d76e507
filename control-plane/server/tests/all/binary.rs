//! The built `fulcrum-control-plane` binary: serves Envoy from a file and exits cleanly on
//! SIGTERM even with an ADS stream open; with `--registry etcd` and no file, serves gRPC
//! registrations to Envoy and keeps them across a restart (on a real one-member etcd).

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use fulcrum_test_support::{AdsApi, Bootstrap, Envoy, Process, eventually, reserve_port};

use crate::support::{PATIENCE, addresses, endpoint, endpoints_file, http_client, wait_for_hosts};

/// The addresses the binary reports in its `--address-file`.
struct Bound {
    xds: SocketAddr,
    http: SocketAddr,
}

/// Waits (bounded) for the binary to write its `--address-file`, failing with its log tail
/// if it exits first.
async fn bound_addresses(process: &mut Process, file: &Path) -> Bound {
    let text = process
        .wait_for(PATIENCE, "the binary writes its address file", || {
            let text = std::fs::read_to_string(file).ok();
            async move { text }
        })
        .await
        .unwrap_or_else(|error| panic!("the binary exited or wrote no address file: {error}"));
    let json: serde_json::Value = serde_json::from_str(&text).expect("the address file is JSON");
    let address = |key: &str| {
        json[key]
            .as_str()
            .and_then(|text| text.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("no {key} address in {text}"))
    };
    Bound {
        xds: address("xds"),
        http: address("http"),
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
    let address_file = dir.path().join("addresses.json");
    // Port 0 everywhere: the kernel picks, the binary reports; nothing to race for.
    let mut process = Process::spawn(
        "control-plane",
        Command::new(env!("CARGO_BIN_EXE_fulcrum-control-plane"))
            .args(["--static-file", file.to_str().expect("utf-8 path")])
            .args(["--xds-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .arg("--address-file")
            .arg(&address_file)
            .args(["--debounce-ms", "10", "--log-level", "info"]),
        &dir.path().join("control-plane.log"),
    )
    .expect("the binary starts");
    let Bound { xds, http } = bound_addresses(&mut process, &address_file).await;
    let ready = process
        .wait_until_serving(&format!("http://{http}/readyz"), "", PATIENCE)
        .await;
    assert!(ready.is_ok(), "the binary becomes ready: {ready:?}");

    let bootstrap = Bootstrap::ads("binary", xds, AdsApi::Sotw);
    let envoy = Envoy::start(&bootstrap).await.expect("Envoy starts");
    let hosts = wait_for_hosts(&envoy, "checkout", "its endpoint", |hosts| hosts.len() == 1).await;
    assert_eq!(addresses(&hosts), ["127.0.0.1:19001"]);

    let started = Instant::now();
    terminate(&mut process).await;
    let log = process.log();
    assert!(log.contains("shutting down"), "{log}");
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
}

const REGISTRY_TOKEN: &str = "binary-registry-token-0123456789";

/// A one-member etcd on loopback, killed on drop.
struct Etcd {
    _process: Process,
    url: String,
}

impl Etcd {
    async fn start(dir: &std::path::Path) -> Self {
        // etcd cannot report a port it chose: reserved ports, outside the ephemeral range.
        let client = format!("http://127.0.0.1:{}", reserve_port().expect("port"));
        let peer = format!("http://127.0.0.1:{}", reserve_port().expect("port"));
        let mut process = Process::spawn(
            "etcd",
            Command::new("etcd")
                .args(["--name", "solo"])
                .arg("--data-dir")
                .arg(dir.join("etcd-data"))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("solo={peer}")])
                .args(["--logger", "zap", "--log-level", "warn"]),
            &dir.join("etcd.log"),
        )
        .expect("etcd starts");
        let healthy = process
            .wait_until_serving(&format!("{client}/health"), "true", PATIENCE)
            .await;
        assert!(healthy.is_ok(), "etcd becomes healthy: {healthy:?}");
        Self {
            _process: process,
            url: client,
        }
    }
}

/// Sends SIGTERM and waits (bounded) for a successful exit.
async fn terminate(process: &mut Process) {
    let status = process
        .terminate(Duration::from_secs(10))
        .await
        .unwrap_or_else(|error| panic!("the binary did not exit within 10 s of SIGTERM: {error}"));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        process.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_with_etcd_registry_serves_grpc_registrations_to_envoy_across_a_restart() {
    use fulcrum_proto::registry::v1 as pb;

    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(dir.path()).await;
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("orders-team {REGISTRY_TOKEN} services=orders addresses=127.0.0.0/8 max=10\n"),
    )
    .expect("tokens");
    // The restarted binary must come back on the same addresses (Envoy's bootstrap names the
    // xDS one): reserved ports, outside the range the kernel hands to anyone else.
    let port = || format!("127.0.0.1:{}", reserve_port().expect("port"));
    let (xds, http, grpc) = (port(), port(), port());
    let client = http_client();
    // No --static-file: the registry is the only endpoint source.
    let start = |run: &str| {
        Process::spawn(
            "control-plane",
            Command::new(env!("CARGO_BIN_EXE_fulcrum-control-plane"))
                .args(["--registry", "etcd", "--etcd-endpoints", &etcd.url])
                .args(["--etcd-prefix", "/binary-test/instances"])
                .arg("--registry-token-file")
                .arg(&tokens)
                .args(["--registry-addr", &grpc])
                // The instance lives on this host: an explicit allowance.
                .args(["--registry-allow-addresses", "127.0.0.0/8"])
                .args(["--xds-addr", &xds, "--http-addr", &http])
                .args(["--admin-addr", "127.0.0.1:0"])
                .args(["--debounce-ms", "10", "--log-level", "info"]),
            &dir.path().join(format!("control-plane-{run}.log")),
        )
        .expect("the binary starts")
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
    let bootstrap = Bootstrap::ads(
        "binary-registry",
        xds.parse().expect("address"),
        AdsApi::Sotw,
    );
    let envoy = Envoy::start(&bootstrap).await.expect("Envoy starts");
    let mut registry = eventually(PATIENCE, "the registry's gRPC API answers", || async {
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
    let ids = eventually(
        PATIENCE,
        "the restarted binary discovers a registration",
        || async { discover().await.filter(|ids| !ids.is_empty()) },
    )
    .await;
    assert_eq!(ids.ok(), Some(vec!["orders-1".to_owned()]));

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
