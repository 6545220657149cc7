//! Optional TLS (rustls, ring provider) on a node's one port and on every
//! connection a node or the CLI opens, so the cluster secret, the prompts and
//! the images never cross a network in clear text.
//!
//! A node given `--tls-cert`/`--tls-key` serves only TLS and reaches its peers
//! over `https`. With `--tls-ca` it also requires every connection (peers and
//! clients alike) to present a certificate signed by that CA, and trusts only
//! that CA for its own outgoing connections: a machine without such a
//! certificate can neither join nor send a Raft RPC, whatever secret it holds.
//! Without `--tls-ca` the port is server-authenticated only, and outgoing
//! connections trust the system's root store (`SSL_CERT_FILE` is honoured).
//! A node always offers its own certificate as its client identity, so the
//! same files serve both directions.
//!
//! The serving loop ([`serve`]) replaces `axum::serve` when TLS is on: one task
//! per connection does the handshake (bounded by `handshake_timeout_ms`; a
//! failed one is logged at debug and costs nothing else), then serves HTTP/1.1
//! on it; the shutdown future stops the accepting and lets open connections
//! finish their requests, as `axum::serve`'s graceful shutdown does.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::RootCertStore;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// Largest PEM file read (certificate chains and CA bundles are a few KiB;
/// a system bundle is about 200 KiB).
const MAX_PEM_BYTES: u64 = 4 << 20;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM file given by `flag`; every error names the flag and the file.
fn read_pem(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let what = || format!("{flag} {}", path.display());
    let len = std::fs::metadata(path).with_context(|| format!("{}: cannot read", what()))?.len();
    if len > MAX_PEM_BYTES {
        bail!("{}: {len} bytes, more than the {MAX_PEM_BYTES} a PEM file may have", what());
    }
    std::fs::read(path).with_context(|| format!("{}: cannot read", what()))
}

/// Every certificate in a PEM file (a chain, leaf first, or a CA bundle).
fn load_certs(flag: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{flag} {}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{flag} {}: no PEM certificate (\"BEGIN CERTIFICATE\") in the file", path.display());
    }
    Ok(certs)
}

fn load_key(flag: &str, path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = read_pem(flag, path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| anyhow!("{flag} {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file: {e}", path.display()))
}

fn load_roots(flag: &str, path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(flag, path)? {
        roots.add(cert).map_err(|e| anyhow!("{flag} {}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The platform's trusted roots, for `https` without `--tls-ca`.
fn system_roots() -> anyhow::Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        bail!("no trusted CA certificate on this system: give --tls-ca");
    }
    Ok(roots)
}

/// Explains rustls' refusal of a certificate and key pair.
fn identity_error(e: rustls::Error, cert: &Path, key: &Path) -> anyhow::Error {
    match e {
        rustls::Error::InconsistentKeys(_) => {
            anyhow!("--tls-key {} does not belong to the certificate in --tls-cert {}", key.display(), cert.display())
        }
        e => anyhow!("--tls-cert {} with --tls-key {}: {e}", cert.display(), key.display()),
    }
}

/// A rustls client configuration trusting `ca` (or the system roots) and
/// presenting `identity` when a server asks for a client certificate.
fn client_config(ca: Option<&Path>, identity: Option<(&Path, &Path)>, ca_flag: &str) -> anyhow::Result<ClientConfig> {
    let roots = match ca {
        Some(path) => load_roots(ca_flag, path)?,
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs("--tls-cert", cert)?, load_key("--tls-key", key)?)
            .map_err(|e| identity_error(e, cert, key))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A node's TLS: the server side of its port and the client side of every
/// connection it opens (Raft RPCs, forwarded writes, proxied requests, joins).
#[derive(Clone)]
pub struct NodeTls {
    server: Arc<ServerConfig>,
    client: ClientConfig,
    /// Longest a connection may take to complete its handshake.
    pub handshake_timeout_ms: u64,
}

impl NodeTls {
    /// Loads and checks the files now, so a bad one stops the node at start-up
    /// with one line naming it.
    pub fn load(cert: &Path, key: &Path, ca: Option<&Path>, handshake_timeout_ms: u64) -> anyhow::Result<Self> {
        let chain = load_certs("--tls-cert", cert)?;
        let private_key = load_key("--tls-key", key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match ca {
            Some(path) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots("--tls-ca", path)?), provider())
                        .build()
                        .map_err(|e| anyhow!("--tls-ca {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_single_cert(chain, private_key).map_err(|e| identity_error(e, cert, key))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = client_config(ca, Some((cert, key)), "--tls-ca")?;
        Ok(NodeTls { server: Arc::new(server), client, handshake_timeout_ms })
    }

    /// `builder` speaking only `https`, with this node's trust and identity.
    pub fn client(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        builder.use_preconfigured_tls(self.client.clone()).https_only(true)
    }
}

/// A CLI client's TLS flags, for servers at `https://` URLs.
#[derive(clap::Args, Clone, Default)]
pub struct ClientTls {
    /// Trust this CA (PEM) for https servers (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for nodes that require one (started with --tls-ca).
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

impl ClientTls {
    fn is_set(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some()
    }

    /// `builder` with these settings for a server at `server` (a URL): plain
    /// HTTP stays as it is unless a TLS flag was given.
    pub fn apply(&self, builder: reqwest::ClientBuilder, server: &str) -> anyhow::Result<reqwest::ClientBuilder> {
        if !self.is_set() && !server.starts_with("https://") {
            return Ok(builder);
        }
        let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        Ok(builder.use_preconfigured_tls(client_config(self.tls_ca.as_deref(), identity, "--tls-ca")?))
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` completes, then
/// waits for the open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    tls: &NodeTls,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls.server.clone());
    let handshake_timeout = Duration::from_millis(tls.handshake_timeout_ms);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let conn = connection(acceptor.clone(), tcp, peer, router.clone(), handshake_timeout, stop_rx.clone());
        connections.spawn(conn);
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// As `axum::serve`: a connection that failed before we took it is nothing;
/// anything else (out of file descriptors) is logged and waited out.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!("accepting a connection: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Resolves once the server is stopping.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// One connection: the handshake, then HTTP/1.1 until the peer closes it or
/// the server stops (which lets a request in progress finish).
async fn connection(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    router: axum::Router,
    handshake_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let stream = tokio::select! {
        done = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)) => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return tracing::debug!("TLS handshake with {peer}: {e}"),
            Err(_) => {
                return tracing::debug!("TLS handshake with {peer}: none within {} ms", handshake_timeout.as_millis())
            }
        },
        _ = stopped(&mut stop) => return,
    };
    let service = hyper_util::service::TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    let done = tokio::select! {
        done = conn.as_mut() => done,
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = done {
        tracing::debug!("connection from {peer}: {e}");
    }
}
