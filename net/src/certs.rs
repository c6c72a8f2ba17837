//! The cluster's own certificate authority: one CA, and one certificate per
//! node or client, each valid for both ends of a mutual-TLS QUIC connection.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};

const CA_COMMON_NAME: &str = "Borealis cluster CA";

/// File names of one identity's certificate and key inside a certificate directory.
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

pub fn identity_files(dir: &Path, name: &str) -> IdentityFiles {
    IdentityFiles { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).with_context(|| format!("create {}", path.display()))?;
    f.write_all(contents.as_bytes()).with_context(|| format!("write {}", path.display()))
}

/// Creates `dir/ca.pem` + `dir/ca.key` unless they exist (then the existing CA
/// signs), and `dir/NAME.pem` + `dir/NAME.key` for each name. Certificates name
/// `localhost`, `127.0.0.1`, `::1` and NAME, and serve as client and server.
pub fn generate(dir: &Path, names: &[String]) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create certificate directory {}", dir.display()))?;
    let ca_key_path = dir.join("ca.key");
    let ca_key = if ca_key_path.exists() {
        let pem = fs::read_to_string(&ca_key_path).with_context(|| format!("read {}", ca_key_path.display()))?;
        KeyPair::from_pem(&pem).with_context(|| format!("parse CA key {}", ca_key_path.display()))?
    } else {
        let key = KeyPair::generate().context("generate CA key")?;
        let cert = ca_params().self_signed(&key).context("self-sign CA")?;
        fs::write(ca_cert_path(dir), cert.pem()).context("write ca.pem")?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        key
    };
    let issuer = Issuer::new(ca_params(), ca_key);
    for name in names {
        if name.is_empty() || name == "ca" || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
            bail!("invalid certificate name {name:?}: use letters, digits, '-', '_', '.'; 'ca' is reserved");
        }
        let mut p = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into(), "::1".into(), name.clone()])
            .with_context(|| format!("certificate parameters for {name}"))?;
        p.distinguished_name.push(DnType::CommonName, name.as_str());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().context("generate key")?;
        let cert = p.signed_by(&key, &issuer).with_context(|| format!("sign certificate for {name}"))?;
        let files = identity_files(dir, name);
        fs::write(&files.cert, cert.pem()).with_context(|| format!("write {}", files.cert.display()))?;
        write_private(&files.key, &key.serialize_pem())?;
    }
    Ok(())
}
