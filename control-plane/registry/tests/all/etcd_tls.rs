//! The etcd backend over TLS and mutual TLS, on a real single-member etcd started with
//! certificates made here: a throwaway CA, a serving certificate for `127.0.0.1` and
//! `localhost`, a client certificate, and a second CA that signed none of them. What an
//! operator sees when a setting is wrong is asserted on the error messages.

use std::{path::PathBuf, process::Command, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use fulcrum_registry::{
    EtcdConfig, Identity, InstanceSpec, Registry,
    backend::etcd::{ClientCertFiles, EtcdConfigError, EtcdConnectError, EtcdTls},
};
use fulcrum_test_support::{Process, eventually};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::support::{discovered_ids, loopback};

/// How long etcd may take to serve.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// The certificates, as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ca.pem` (the CA the member trusts), `server.pem` + `server-key.pem` (for
    /// `127.0.0.1` and `localhost`) and `client.pem` + `client-key.pem` signed by it;
    /// `other-ca.pem`, a CA the member does not trust, and `untrusted-client.pem` +
    /// `untrusted-client-key.pem` signed by that one.
    fn generate() -> Result<Self> {
        let pki = Self {
            dir: tempfile::tempdir()?,
        };
        let ca = certificate_authority("fulcrum test CA")?;
        std::fs::write(pki.path("ca.pem"), ca.pem())?;
        let other_ca = certificate_authority("another CA")?;
        std::fs::write(pki.path("other-ca.pem"), other_ca.pem())?;
        let (cert, key) = leaf(
            &ca,
            "etcd",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        std::fs::write(pki.path("server.pem"), cert)?;
        std::fs::write(pki.path("server-key.pem"), key)?;
        let (cert, key) = leaf(
            &ca,
            "fulcrum-control-plane",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        std::fs::write(pki.path("client.pem"), cert)?;
        std::fs::write(pki.path("client-key.pem"), key)?;
        let (cert, key) = leaf(
            &other_ca,
            "fulcrum-control-plane",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        std::fs::write(pki.path("untrusted-client.pem"), cert)?;
        std::fs::write(pki.path("untrusted-client-key.pem"), key)?;
        Ok(pki)
    }

    /// TLS settings trusting `ca`, with the client certificate when `client` is set.
    fn tls(&self, ca: &str, client: bool) -> EtcdTls {
        EtcdTls {
            ca_file: Some(self.path(ca)),
            client_cert: client.then(|| ClientCertFiles {
                cert_file: self.path("client.pem"),
                key_file: self.path("client-key.pem"),
            }),
            server_name: None,
        }
    }
}

fn certificate_authority(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// A certificate for `names` signed by `ca`, and its key, both PEM.
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Result<(String, String)> {
    let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// etcd cannot bind port 0 and report it: ports reserved outside the kernel's ephemeral range
/// (see [`fulcrum_test_support::reserve_port`]), so no other socket takes one first.
fn reserved_port() -> Result<u16> {
    Ok(fulcrum_test_support::reserve_port()?)
}

/// One etcd member serving clients over TLS only, requiring client certificates signed by
/// the test CA; its health on a plain-HTTP metrics port. Killed on drop.
struct TlsEtcd {
    _process: Process,
    client_port: u16,
    _data: tempfile::TempDir,
}

impl TlsEtcd {
    async fn start(pki: &Pki) -> Result<Self> {
        let data = tempfile::tempdir()?;
        let client_port = reserved_port()?;
        let peer = format!("http://127.0.0.1:{}", reserved_port()?);
        let metrics_port = reserved_port()?;
        let client = format!("https://127.0.0.1:{client_port}");
        let mut command = Command::new("etcd");
        command
            .args(["--name", "tls0"])
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("tls0={peer}")])
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{metrics_port}"),
            ])
            .arg("--cert-file")
            .arg(pki.path("server.pem"))
            .arg("--key-file")
            .arg(pki.path("server-key.pem"))
            .arg("--trusted-ca-file")
            .arg(pki.path("ca.pem"))
            .arg("--client-cert-auth")
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"]);
        let mut process = Process::spawn("etcd", &mut command, &data.path().join("etcd.log"))
            .context(
                "starting `etcd` (install it: apt-get install etcd-server, or cargo xtask setup)",
            )?;
        let health = format!("http://127.0.0.1:{metrics_port}/health");
        process
            .wait_until_serving(&health, "true", READY_WITHIN)
            .await?;
        Ok(Self {
            _process: process,
            client_port,
            _data: data,
        })
    }

    fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }
}

fn config(etcd: &TlsEtcd, tls: EtcdTls) -> EtcdConfig {
    let mut config = EtcdConfig::new(vec![etcd.endpoint()]);
    config.request_timeout = Duration::from_secs(2);
    config.tls = Some(tls);
    config
}

async fn replica(config: EtcdConfig) -> Result<Arc<Registry>, EtcdConnectError> {
    Registry::on_etcd(config, loopback()).await
}

/// The connection error for `config`; fails the test when it connects.
async fn connect_error(config: EtcdConfig) -> EtcdConnectError {
    match tokio::time::timeout(Duration::from_secs(10), replica(config)).await {
        Ok(Ok(_)) => panic!("connected, but it must not"),
        Ok(Err(error)) => error,
        Err(_) => panic!("no answer within 10 s"),
    }
}

fn spec(id: &str, port: u16) -> InstanceSpec {
    InstanceSpec {
        name: "svc".into(),
        id: id.into(),
        address: "127.0.0.1".into(),
        port: u32::from(port),
        ttl_ms: 10_000,
        ..InstanceSpec::default()
    }
}

#[tokio::test]
async fn registrations_heartbeats_and_discovery_work_over_mutual_tls() -> Result<()> {
    let pki = Pki::generate()?;
    let etcd = TlsEtcd::start(&pki).await?;
    let a = replica(config(&etcd, pki.tls("ca.pem", true))).await?;
    // The second replica verifies the member's certificate by its DNS name.
    let b = replica(config(
        &etcd,
        EtcdTls {
            server_name: Some("localhost".into()),
            ..pki.tls("ca.pem", true)
        },
    ))
    .await?;
    a.register(&spec("t-1", 1), &Identity::unscoped("alice"))
        .await?;
    b.register(&spec("t-2", 2), &Identity::unscoped("bob"))
        .await?;
    a.heartbeat("t-1", "alice").await?;
    b.heartbeat("t-2", "bob").await?;
    eventually(
        Duration::from_secs(5),
        "both replicas see both, through their watches",
        || async { discovered_ids(&a) == ["t-1", "t-2"] && discovered_ids(&b) == ["t-1", "t-2"] },
    )
    .await?;
    b.deregister("t-1", "alice").await?;
    eventually(Duration::from_secs(5), "the removal reaches a", || async {
        discovered_ids(&a) == ["t-2"]
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn without_a_client_certificate_the_handshake_fails_naming_the_client_certificate()
-> Result<()> {
    let pki = Pki::generate()?;
    let etcd = TlsEtcd::start(&pki).await?;
    let error = connect_error(config(&etcd, pki.tls("ca.pem", false))).await;
    let message = error.to_string();
    assert!(
        matches!(error, EtcdConnectError::Handshake { .. }),
        "{message}"
    );
    assert!(message.contains(&etcd.endpoint()), "{message}");
    assert!(message.contains("client certificate"), "{message}");
    Ok(())
}

#[tokio::test]
async fn a_client_certificate_the_member_does_not_trust_fails_naming_the_client_certificate()
-> Result<()> {
    let pki = Pki::generate()?;
    let etcd = TlsEtcd::start(&pki).await?;
    let tls = EtcdTls {
        client_cert: Some(ClientCertFiles {
            cert_file: pki.path("untrusted-client.pem"),
            key_file: pki.path("untrusted-client-key.pem"),
        }),
        ..pki.tls("ca.pem", false)
    };
    let error = connect_error(config(&etcd, tls)).await;
    let message = error.to_string();
    assert!(
        matches!(error, EtcdConnectError::Handshake { .. }),
        "{message}"
    );
    assert!(
        message.contains("refused the client certificate"),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn a_ca_that_did_not_sign_the_members_certificate_fails_naming_the_ca() -> Result<()> {
    let pki = Pki::generate()?;
    let etcd = TlsEtcd::start(&pki).await?;
    let error = connect_error(config(&etcd, pki.tls("other-ca.pem", true))).await;
    let message = error.to_string();
    assert!(
        matches!(error, EtcdConnectError::Handshake { .. }),
        "{message}"
    );
    assert!(message.contains("CA file"), "{message}");
    Ok(())
}

#[tokio::test]
async fn a_server_name_the_members_certificate_does_not_hold_fails_naming_the_server_name()
-> Result<()> {
    let pki = Pki::generate()?;
    let etcd = TlsEtcd::start(&pki).await?;
    let tls = EtcdTls {
        server_name: Some("etcd.example".into()),
        ..pki.tls("ca.pem", true)
    };
    let error = connect_error(config(&etcd, tls)).await;
    let message = error.to_string();
    assert!(
        matches!(error, EtcdConnectError::Handshake { .. }),
        "{message}"
    );
    assert!(message.contains("server name"), "{message}");
    Ok(())
}

/// `https://` endpoints without TLS settings use TLS on the system's roots, which do not
/// hold the test CA: the member's certificate is refused, pointing at the CA file.
#[tokio::test]
async fn https_endpoints_without_tls_settings_verify_against_the_system_roots() -> Result<()> {
    let pki = Pki::generate()?;
    let etcd = TlsEtcd::start(&pki).await?;
    let mut config = config(&etcd, EtcdTls::default());
    config.tls = None;
    let error = connect_error(config).await;
    let message = error.to_string();
    assert!(
        matches!(error, EtcdConnectError::Handshake { .. }),
        "{message}"
    );
    assert!(
        message.contains("UnknownIssuer") && message.contains("CA file"),
        "{message}"
    );
    Ok(())
}

/// Settings that cannot work fail before any connection, naming the file or endpoint.
#[tokio::test]
async fn unusable_tls_settings_fail_before_connecting_naming_the_file_or_endpoint() -> Result<()> {
    let pki = Pki::generate()?;
    // No etcd listens here: each error must come from the settings alone.
    let endpoint = format!("https://127.0.0.1:{}", reserved_port()?);
    let with = |tls: EtcdTls| {
        let mut config = EtcdConfig::new(vec![endpoint.clone()]);
        config.tls = Some(tls);
        config
    };

    let missing = pki.path("missing-ca.pem");
    let error = connect_error(with(pki.tls("missing-ca.pem", true))).await;
    let message = error.to_string();
    assert!(
        matches!(
            error,
            EtcdConnectError::Config(EtcdConfigError::Unreadable { .. })
        ),
        "{message}"
    );
    assert!(
        message.contains("CA file") && message.contains(&missing.display().to_string()),
        "{message}"
    );

    // A key where the certificate belongs, and a certificate where the key belongs.
    let swapped = EtcdTls {
        client_cert: Some(ClientCertFiles {
            cert_file: pki.path("client-key.pem"),
            key_file: pki.path("client.pem"),
        }),
        ..pki.tls("ca.pem", false)
    };
    let message = connect_error(with(swapped)).await.to_string();
    assert!(
        message.contains("client certificate file")
            && message.contains("client-key.pem")
            && message.contains("-----BEGIN CERTIFICATE-----"),
        "{message}"
    );
    let key_not_pem = EtcdTls {
        client_cert: Some(ClientCertFiles {
            cert_file: pki.path("client.pem"),
            key_file: pki.path("client.pem"),
        }),
        ..pki.tls("ca.pem", false)
    };
    let message = connect_error(with(key_not_pem)).await.to_string();
    assert!(
        message.contains("client key file") && message.contains("PRIVATE KEY"),
        "{message}"
    );

    // A key that is not the certificate's.
    let mismatched = EtcdTls {
        client_cert: Some(ClientCertFiles {
            cert_file: pki.path("client.pem"),
            key_file: pki.path("server-key.pem"),
        }),
        ..pki.tls("ca.pem", false)
    };
    let error = connect_error(with(mismatched)).await;
    let message = error.to_string();
    assert!(
        matches!(
            error,
            EtcdConnectError::Config(EtcdConfigError::Rejected { .. })
        ),
        "{message}"
    );
    assert!(message.contains("client key"), "{message}");

    // TLS settings with a plain-HTTP endpoint, and mixed schemes.
    let mut plain = with(pki.tls("ca.pem", true));
    plain.endpoints = vec![endpoint.replace("https://", "http://")];
    let message = connect_error(plain).await.to_string();
    assert!(
        message.contains("is http:// but TLS settings are given"),
        "{message}"
    );
    let mut mixed = EtcdConfig::new(vec![
        endpoint.clone(),
        endpoint.replace("https://", "http://"),
    ]);
    mixed.tls = None;
    let message = connect_error(mixed).await.to_string();
    assert!(message.contains("mix http:// "), "{message}");
    Ok(())
}
