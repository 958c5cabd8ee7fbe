//! TLS on the gRPC API: clients that trust the server's CA connect, plaintext clients do not,
//! and a server that verifies clients admits only those with a certificate its CA signed.

use std::path::{Path, PathBuf};

use campaign_stats::server::{ServerConfig, TlsSettings};
use campaign_stats::storage::PoolOptions;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::common::{TestDb, TestServer};

crate::on_both_backends!(
    clients_that_trust_the_ca_connect_and_plaintext_ones_do_not,
    a_server_that_verifies_clients_admits_only_signed_ones,
    the_cli_speaks_tls,
);

/// A test CA and PEM files it signed, in a directory of their own.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "campaign-stats test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        Self { dir, ca }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `usage`, valid for localhost and 127.0.0.1: its and its key's paths.
    fn issue(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let (cert_path, key_path) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    async fn start_server(&self, db: &TestDb, verify_clients: bool) -> TestServer {
        let (cert, key) = self.issue("server", ExtendedKeyUsagePurpose::ServerAuth);
        let config = ServerConfig {
            tls: Some(TlsSettings {
                cert,
                key,
                client_ca: verify_clients.then(|| self.ca()),
            }),
            ..TestServer::config()
        };
        db.start_server_configured(&db.url, &PoolOptions::default(), config)
            .await
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read a PEM file")
}

/// A health check over TLS to `server`, trusting `ca` and presenting `identity`.
async fn check_over_tls(
    server: &TestServer,
    ca: &Path,
    identity: Option<(PathBuf, PathBuf)>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(&cert), read(&key)));
    }
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", server.addr.port()))
        .expect("URI")
        .tls_config(tls)
        .expect("TLS settings")
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(drop)
        .map_err(|status| format!("{status:?}"))
}

async fn clients_that_trust_the_ca_connect_and_plaintext_ones_do_not(db: TestDb) {
    let pki = Pki::new();
    let server = pki.start_server(&db, false).await;
    check_over_tls(&server, &pki.ca(), None)
        .await
        .expect("a client trusting the CA");
    let plaintext = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest::default())
        .await;
    assert!(
        plaintext.is_err(),
        "a plaintext call was answered: {plaintext:?}"
    );
    let stranger = Pki::new();
    let untrusted = check_over_tls(&server, &stranger.ca(), None).await;
    assert!(untrusted.is_err(), "a client trusting another CA connected");
    server.stop().await;
}

async fn a_server_that_verifies_clients_admits_only_signed_ones(db: TestDb) {
    let pki = Pki::new();
    let server = pki.start_server(&db, true).await;
    let without = check_over_tls(&server, &pki.ca(), None).await;
    assert!(
        without.is_err(),
        "a client without a certificate was admitted"
    );
    let stranger = Pki::new();
    let foreign = stranger.issue("mallory", ExtendedKeyUsagePurpose::ClientAuth);
    let foreign = check_over_tls(&server, &pki.ca(), Some(foreign)).await;
    assert!(foreign.is_err(), "a client another CA signed was admitted");
    let client = pki.issue("client", ExtendedKeyUsagePurpose::ClientAuth);
    check_over_tls(&server, &pki.ca(), Some(client))
        .await
        .expect("a client the CA signed");
    server.stop().await;
}

async fn the_cli_speaks_tls(db: TestDb) {
    let pki = Pki::new();
    let server = pki.start_server(&db, true).await;
    let (cert, key) = pki.issue("operator", ExtendedKeyUsagePurpose::ClientAuth);
    let target = format!("127.0.0.1:{}", server.addr.port());
    let path = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
    let (ca, cert, key) = (path(&pki.ca()), path(&cert), path(&key));
    let (ok, stdout, stderr) = crate::cli::cli(&[
        "migration",
        "status",
        "--server",
        &target,
        "--tls-ca",
        &ca,
        "--tls-client-cert",
        &cert,
        "--tls-client-key",
        &key,
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("LEGACY_ONLY"), "{stdout}");
    let (ok, _, _) = crate::cli::cli(&["migration", "status", "--server", &target]).await;
    assert!(!ok, "a plaintext CLI reached a TLS server");
    server.stop().await;
}
