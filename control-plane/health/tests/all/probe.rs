//! One HTTP probe against a target that answers with a redirect: the probe judges the
//! redirect's own status, as Envoy's HTTP health checker does, and never follows it, so a
//! registered endpoint cannot point the control plane's prober at another address (SSRF).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Result;
use fulcrum_core::policy::{HealthCheck, Probe};
use fulcrum_health::{ProbeError, Prober};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// A server that answers every request with `response` and counts the connections it got.
async fn answering(response: String) -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let response = response.clone();
            tokio::spawn(async move {
                let mut request = [0_u8; 4096];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok((address, connections))
}

fn http_check(expected_statuses: Vec<u16>) -> HealthCheck {
    HealthCheck::new(Probe::Http {
        path: "/healthz".to_owned(),
        expected_statuses,
        port: None,
    })
}

#[tokio::test]
async fn an_http_probe_judges_a_redirect_by_its_status_and_never_follows_it() -> Result<()> {
    let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned();
    let (elsewhere, elsewhere_connections) = answering(ok).await?;
    let redirect = format!(
        "HTTP/1.1 302 Found\r\nlocation: http://{elsewhere}/healthz\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    let (target, _) = answering(redirect).await?;

    let check = http_check(Vec::new());
    let outcome = Prober::new(&check, target).probe(&check, target).await;
    assert!(
        matches!(&outcome, Err(ProbeError::Unexpected(answer)) if answer == "HTTP status 302"),
        "{outcome:?}"
    );
    // An operator who lists 302 as passing gets it passing, still without following it.
    let check = http_check(vec![302]);
    let outcome = Prober::new(&check, target).probe(&check, target).await;
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(elsewhere_connections.load(Ordering::SeqCst), 0);
    Ok(())
}
