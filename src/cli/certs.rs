//! `raftgen certs`: a throw-away CA and certificates for trying TLS (see
//! docs/tls.md). Every node certificate carries every `--hosts` name (so any
//! of them can be any node's address) and is good for both ends of a
//! connection (serverAuth and clientAuth), as a node is both; `client.pem` is
//! for the CLI when the nodes require client certificates. Keys are ECDSA
//! P-256, written owner-readable only; nothing is overwritten.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Most node certificates one run writes.
const MAX_NODES: u32 = 100;
/// How long the certificates are valid, from a day ago (clock skew).
const VALIDITY_DAYS: i64 = 365;

#[derive(clap::Args)]
pub struct CertsArgs {
    /// Folder for ca.pem, ca-key.pem, node-K.pem, node-K-key.pem, client.pem
    /// and client-key.pem (created if missing; existing files are not replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Names and IP addresses the nodes are reached at (their --advertise
    /// hosts), comma-separated; each node certificate carries all of them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
    pub hosts: Vec<String>,
    /// Node certificates to write (node-1.pem ... node-N.pem).
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
}

fn san(host: &str) -> anyhow::Result<SanType> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !valid {
        bail!("--hosts: '{host}' is neither an IP address nor a DNS name");
    }
    Ok(SanType::DnsName(host.to_string().try_into().context("--hosts")?))
}

fn params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(VALIDITY_DAYS);
    p
}

/// Writes `text` to `dir/name`, refusing to replace a file; keys get mode 0600.
fn write_new(dir: &Path, name: &str, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

pub fn run(a: CertsArgs) -> anyhow::Result<()> {
    if !(1..=MAX_NODES).contains(&a.nodes) {
        bail!("--nodes must be between 1 and {MAX_NODES}");
    }
    let sans = a.hosts.iter().map(|h| san(h.trim())).collect::<anyhow::Result<Vec<_>>>()?;
    if sans.is_empty() {
        bail!("--hosts: give at least one name or IP address");
    }
    let mut names = vec!["ca.pem".to_string(), "client.pem".into()];
    names.extend((1..=a.nodes).map(|k| format!("node-{k}.pem")));
    for name in names.iter().flat_map(|n| [n.clone(), n.replace(".pem", "-key.pem")]) {
        let path = a.out.join(&name);
        if path.exists() {
            bail!("{} exists: choose another --out (files are never replaced)", path.display());
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;

    let ca_key = KeyPair::generate().context("generating a key")?;
    let mut ca = params("raftgen test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    write_new(&a.out, "ca.pem", &ca_cert.pem(), false)?;
    write_new(&a.out, "ca-key.pem", &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |file: &str, name: &str, sans: Vec<SanType>, usages: Vec<ExtendedKeyUsagePurpose>| {
        let key = KeyPair::generate().context("generating a key")?;
        let mut p = params(name);
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = usages;
        let cert = p.signed_by(&key, &issuer).with_context(|| format!("signing {file}"))?;
        write_new(&a.out, &format!("{file}.pem"), &cert.pem(), false)?;
        write_new(&a.out, &format!("{file}-key.pem"), &key.serialize_pem(), true)
    };
    let both = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    for k in 1..=a.nodes {
        leaf(&format!("node-{k}"), &format!("raftgen node {k}"), sans.clone(), both.clone())?;
    }
    leaf("client", "raftgen client", Vec::new(), vec![ExtendedKeyUsagePurpose::ClientAuth])?;
    println!(
        "wrote ca.pem, node-1.pem .. node-{}.pem and client.pem (with their -key.pem) to {} for {}",
        a.nodes,
        a.out.display(),
        a.hosts.join(", ")
    );
    Ok(())
}
