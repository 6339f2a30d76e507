//! TLS on every listener: with a certificate configured, the HTTP API, the admin API and xDS
//! complete a rustls handshake (ALPN by what they serve) and answer over it, plain-text clients
//! get nothing, a stalled handshake holds nothing past its deadline, and a rotated
//! certificate is served without a restart.

use std::{sync::Arc, time::Duration};

use fulcrum_control_plane::{Config, ControlPlane, Tls, TlsFiles, TlsMetrics};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::support::{endpoint, endpoints_file, loopback_config};

/// A self-signed certificate for `127.0.0.1`, written as `cert.pem` and `key.pem`; its PEM.
fn certificate(dir: &std::path::Path, name: &str) -> (TlsFiles, String) {
    let generated =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), name.to_owned()])
            .expect("a certificate");
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    let pem = generated.cert.pem();
    std::fs::write(&files.cert, &pem).expect("write cert");
    std::fs::write(&files.key, generated.signing_key.serialize_pem()).expect("write key");
    (files, pem)
}

/// A client trusting only `ca_pem`, offering `alpn`.
fn connector(ca_pem: &str, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("PEM")).expect("a root");
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn connect(
    connector: &TlsConnector,
    address: std::net::SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(address).await?;
    connector
        .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
        .await
}

/// `GET path` over HTTP/1.1 on `stream`; the whole answer.
async fn get(stream: &mut TlsStream<TcpStream>, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nhost: fulcrum\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn every_listener_serves_tls_with_the_configured_certificate_and_plain_text_gets_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, ca) = certificate(dir.path(), "fulcrum-control-plane");
    let static_file = dir.path().join("endpoints.yaml");
    std::fs::write(
        &static_file,
        endpoints_file(&[("web", vec![endpoint("127.0.0.1:9001", "")])]),
    )
    .expect("write endpoints");
    let control_plane = ControlPlane::start(Config {
        tls: Some(files),
        ..loopback_config(Some(static_file))
    })
    .await
    .expect("starts with TLS");

    let http = connector(&ca, &[b"http/1.1"]);
    let mut snapshot = String::new();
    for _ in 0..100 {
        let mut stream = connect(&http, control_plane.http_address())
            .await
            .expect("TLS to the HTTP API");
        snapshot = get(&mut stream, "/v1/snapshot").await;
        if snapshot.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(snapshot.starts_with("HTTP/1.1 200"), "{snapshot}");
    assert!(snapshot.contains("127.0.0.1:9001"), "{snapshot}");

    let mut admin = connect(&http, control_plane.admin_address())
        .await
        .expect("TLS to the admin API");
    assert!(
        get(&mut admin, "/v1/policy/history")
            .await
            .starts_with("HTTP/1.1 200")
    );

    let grpc = connector(&ca, &[b"h2"]);
    let xds = connect(&grpc, control_plane.xds_address())
        .await
        .expect("TLS to xDS");
    assert_eq!(xds.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // A client that does not trust the certificate is refused.
    let (_, other_ca) = certificate(tempfile::tempdir().expect("tempdir").path(), "other");
    let untrusting = connector(&other_ca, &[b"http/1.1"]);
    assert!(
        connect(&untrusting, control_plane.http_address())
            .await
            .is_err()
    );

    // Plain text gets no HTTP answer.
    let mut plain = TcpStream::connect(control_plane.http_address())
        .await
        .expect("connect");
    plain
        .write_all(b"GET /v1/snapshot HTTP/1.1\r\nhost: fulcrum\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/1.1"),
        "plain text answered: {answer:?}"
    );
    control_plane.shutdown().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart_and_a_bad_one_keeps_the_last() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, first_ca) = certificate(dir.path(), "first");
    let metrics = TlsMetrics::default();
    let tls =
        Tls::start(files.clone(), Duration::from_millis(100), metrics.clone()).expect("loads");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let mut accepted = tls.accept(listener, &[b"http/1.1"]);
    tokio::spawn(async move { while accepted.next().await.is_some() {} });

    assert!(connect(&connector(&first_ca, &[]), address).await.is_ok());
    let (_, second_ca) = certificate(dir.path(), "second");
    let second = connector(&second_ca, &[]);
    let mut rotated = false;
    for _ in 0..50 {
        if connect(&second, address).await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the rotated certificate is served");

    std::fs::write(&files.key, "not a key").expect("break the key");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(metrics.reload_failures.get() > 0);
    assert!(
        connect(&second, address).await.is_ok(),
        "the last good certificate stays"
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_blocks_no_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, ca) = certificate(dir.path(), "fulcrum");
    let tls = Tls::start(files, Duration::from_secs(60), TlsMetrics::default()).expect("loads");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let mut accepted = tls.accept(listener, &[]);
    tokio::spawn(async move { while accepted.next().await.is_some() {} });
    let mut stalled = Vec::new();
    for _ in 0..20 {
        stalled.push(TcpStream::connect(address).await.expect("connect"));
    }
    let handshake = tokio::time::timeout(
        Duration::from_secs(2),
        connect(&connector(&ca, &[]), address),
    )
    .await;
    assert!(
        matches!(handshake, Ok(Ok(_))),
        "a handshake completes while 20 clients stall: {handshake:?}"
    );
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused_naming_both_files() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, _) = certificate(dir.path(), "one");
    let other = tempfile::tempdir().expect("tempdir");
    let (other_files, _) = certificate(other.path(), "two");
    let mismatched = TlsFiles {
        cert: files.cert.clone(),
        key: other_files.key,
    };
    let problem = runtime
        .block_on(async { Tls::start(mismatched, Duration::from_secs(60), TlsMetrics::default()) })
        .expect_err("mismatched");
    let message = format!("{problem:#}");
    assert!(message.contains("does not match"), "{message}");
    assert!(message.contains("cert.pem"), "{message}");
}
