//! The built `fulcrum-control-plane` binary: serves Envoy from a file and exits cleanly on
//! SIGTERM even with an ADS stream open.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fulcrum_envoy_harness::{AdsApi, AdsBootstrap, Envoy, eventually, free_port};

use crate::support::{PATIENCE, addresses, endpoint, endpoints_file, wait_for_hosts};

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
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
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
