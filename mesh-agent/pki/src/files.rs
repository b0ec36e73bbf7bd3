//! Certificates and keys on disk: PEM files read with errors that name the
//! file and say what is wrong with it, and written atomically (a reader
//! never sees half a file; keys are never readable by others).

use std::{
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::SystemTime,
};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer,
    pem::{PemObject as _, SectionKind},
};

use super::cert::{CertError, CertInfo, rfc3339};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: cannot read: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot write: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a PEM file (expected {expected})", .path.display())]
    NotPem {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{}: malformed PEM: {message}", .path.display())]
    BadPem { path: PathBuf, message: String },
    #[error("{}: no certificate in it (it holds: {found})", .path.display())]
    NoCertificate { path: PathBuf, found: String },
    #[error("{}: certificate {index}: {source}", .path.display())]
    BadCertificate {
        path: PathBuf,
        /// 1-based position in the file.
        index: usize,
        source: CertError,
    },
    #[error("{}: no private key in it (it holds: {found})", .path.display())]
    NoKey { path: PathBuf, found: String },
    #[error(
        "{}: unsupported key type {found}: expected an ECDSA P-256 private key in PKCS#8 PEM \
         (-----BEGIN PRIVATE KEY-----){hint}", .path.display()
    )]
    UnsupportedKey {
        path: PathBuf,
        found: String,
        hint: &'static str,
    },
    #[error("{}: certificate {index} expired at {not_after}", .path.display())]
    Expired {
        path: PathBuf,
        index: usize,
        not_after: String,
    },
    #[error("{}: certificate {index} is not valid yet: only from {not_before}", .path.display())]
    NotYetValid {
        path: PathBuf,
        index: usize,
        not_before: String,
    },
    #[error(
        "{}: this key does not match the certificate in {} (another key's certificate?)",
        .key.display(), .cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----";
const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----";

/// Every PEM section of a file, with its kind.
fn read_sections(
    path: &Path,
    expected: &'static str,
) -> Result<Vec<(SectionKind, Vec<u8>)>, FileError> {
    let bytes = std::fs::read(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let sections: Vec<(SectionKind, Vec<u8>)> = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| FileError::BadPem {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if sections.is_empty() && !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(FileError::NotPem {
            path: path.to_owned(),
            expected,
        });
    }
    Ok(sections)
}

fn kinds(sections: &[(SectionKind, Vec<u8>)]) -> String {
    if sections.is_empty() {
        return "nothing the mesh knows".into();
    }
    let names: Vec<&str> = sections.iter().map(|(k, _)| kind_name(*k)).collect();
    names.join(", ")
}

fn kind_name(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "CERTIFICATE",
        SectionKind::PublicKey => "PUBLIC KEY",
        SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
        SectionKind::PrivateKey => "PRIVATE KEY",
        SectionKind::EcPrivateKey => "EC PRIVATE KEY",
        SectionKind::Crl => "X509 CRL",
        SectionKind::Csr => "CERTIFICATE REQUEST",
        SectionKind::EchConfigList => "ECHCONFIG",
        _ => "another PEM section",
    }
}

/// The certificates of a PEM file, in file order; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let certs = read_certs_or_none(path)?;
    if certs.is_empty() {
        let found = kinds(&read_sections(path, CERT_PEM)?);
        return Err(FileError::NoCertificate {
            path: path.to_owned(),
            found,
        });
    }
    Ok(certs)
}

/// Like [`read_certs`], but an empty file (a root CA's `chain.pem`) is an
/// empty list.
pub fn read_certs_or_none(path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let bytes = std::fs::read(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let mut certs = Vec::new();
    for (kind, der) in read_sections(path, CERT_PEM)? {
        if kind != SectionKind::Certificate {
            continue;
        }
        CertInfo::parse(&der).map_err(|source| FileError::BadCertificate {
            path: path.to_owned(),
            index: certs.len() + 1,
            source,
        })?;
        certs.push(CertificateDer::from(der));
    }
    Ok(certs)
}

/// The ECDSA P-256 private key of a PEM file (PKCS#8), refusing any other
/// kind of key with what it is and what is expected.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, FileError> {
    let sections = read_sections(path, KEY_PEM)?;
    let unsupported = |found: &str, hint: &'static str| FileError::UnsupportedKey {
        path: path.to_owned(),
        found: found.to_owned(),
        hint,
    };
    for (kind, der) in &sections {
        match kind {
            SectionKind::PrivateKey => {
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.clone()));
                return match KeyPair::try_from(&key) {
                    Ok(pair) if pair.algorithm() == &PKCS_ECDSA_P256_SHA256 => Ok(key),
                    Ok(pair) => Err(unsupported(algorithm_name(&pair), "")),
                    Err(_) => Err(unsupported("(an unrecognised PKCS#8 key)", "")),
                };
            }
            SectionKind::EcPrivateKey => {
                return Err(unsupported(
                    "EC PRIVATE KEY (SEC1)",
                    "; if it is a P-256 key, convert it with \
                     `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`",
                ));
            }
            SectionKind::RsaPrivateKey => return Err(unsupported("RSA (PKCS#1)", "")),
            _ => {}
        }
    }
    Err(FileError::NoKey {
        path: path.to_owned(),
        found: kinds(&sections),
    })
}

fn algorithm_name(pair: &KeyPair) -> &'static str {
    let alg = pair.algorithm();
    if alg == &PKCS_ECDSA_P384_SHA384 {
        "ECDSA P-384"
    } else if alg == &PKCS_ED25519 {
        "Ed25519"
    } else {
        "RSA"
    }
}

/// The signing key of a PEM file, for rcgen (the CA's own key).
pub fn read_key_pair(path: &Path) -> Result<KeyPair, FileError> {
    let key = read_key(path)?;
    KeyPair::try_from(&key).map_err(|_| FileError::UnsupportedKey {
        path: path.to_owned(),
        found: "(an unrecognised PKCS#8 key)".into(),
        hint: "",
    })
}

/// Refuses a file whose certificates are not all valid at `now`.
pub fn check_validity(
    path: &Path,
    certs: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<(), FileError> {
    for (i, cert) in certs.iter().enumerate() {
        let info = CertInfo::parse(cert).map_err(|source| FileError::BadCertificate {
            path: path.to_owned(),
            index: i + 1,
            source,
        })?;
        if now > info.not_after {
            return Err(FileError::Expired {
                path: path.to_owned(),
                index: i + 1,
                not_after: rfc3339(info.not_after),
            });
        }
        if now < info.not_before {
            return Err(FileError::NotYetValid {
                path: path.to_owned(),
                index: i + 1,
                not_before: rfc3339(info.not_before),
            });
        }
    }
    Ok(())
}

/// A certificate chain (leaf first) and its key, checked: all valid at
/// `now`, ECDSA P-256, and the key is the leaf's.
pub fn read_credentials(
    cert_path: &Path,
    key_path: &Path,
    now: SystemTime,
) -> Result<(Vec<CertificateDer<'static>>, KeyPair), FileError> {
    let certs = read_certs(cert_path)?;
    let key = read_key_pair(key_path)?;
    check_validity(cert_path, &certs, now)?;
    let leaf = CertInfo::parse(&certs[0]).map_err(|source| FileError::BadCertificate {
        path: cert_path.to_owned(),
        index: 1,
        source,
    })?;
    if leaf.spki != rcgen::PublicKeyData::subject_public_key_info(&key) {
        return Err(FileError::KeyMismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
        });
    }
    Ok((certs, key))
}

/// PEM text of certificates, in order.
pub fn certs_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| pem_encode("CERTIFICATE", c)).collect()
}

/// One PEM section.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Who may read a written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 0644: certificates, bundles, state.
    Public,
    /// 0600: private keys.
    Private,
}

/// Writes a file atomically: a temporary file in the same directory,
/// flushed to disk, then renamed over the target.
pub fn write_atomic(path: &Path, contents: &[u8], mode: Mode) -> Result<(), FileError> {
    let write_err = |source| FileError::Write {
        path: path.to_owned(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let bits = match mode {
        Mode::Public => 0o644,
        Mode::Private => 0o600,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(bits)
        .open(&tmp)
        .map_err(write_err)?;
    // An existing temporary file keeps its old mode: set it explicitly.
    file.set_permissions(std::fs::Permissions::from_mode(bits))
        .map_err(write_err)?;
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::{TempDir, self_signed};

    #[test]
    fn base64_matches_rfc4648() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn reads_back_what_it_writes() {
        let dir = TempDir::new("files-roundtrip");
        let now = SystemTime::now();
        let (cert, key) = self_signed(
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        );
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        write_atomic(
            &cert_path,
            certs_pem(std::slice::from_ref(&cert)).as_bytes(),
            Mode::Public,
        )
        .unwrap();
        write_atomic(&key_path, key.serialize_pem().as_bytes(), Mode::Private).unwrap();
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (certs, _) = read_credentials(&cert_path, &key_path, now).unwrap();
        assert_eq!(certs, vec![cert]);
    }

    #[test]
    fn refuses_files_that_are_not_pem_or_hold_no_certificate() {
        let dir = TempDir::new("files-not-pem");
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, "hello\n").unwrap();
        let e = read_certs(&path).unwrap_err().to_string();
        assert!(e.contains("cert.pem: not a PEM file"), "{e}");

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(&path, key.serialize_pem()).unwrap();
        let e = read_certs(&path).unwrap_err().to_string();
        assert!(
            e.contains("cert.pem: no certificate in it (it holds: PRIVATE KEY)"),
            "{e}"
        );

        let e = read_certs(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem: cannot read"), "{e}");
    }

    #[test]
    fn refuses_other_key_types() {
        let dir = TempDir::new("files-key-type");
        let path = dir.path().join("key.pem");
        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        std::fs::write(&path, p384.serialize_pem()).unwrap();
        let e = read_key(&path).unwrap_err().to_string();
        assert!(
            e.contains("key.pem: unsupported key type ECDSA P-384: expected an ECDSA P-256"),
            "{e}"
        );

        std::fs::write(&path, pem_encode("EC PRIVATE KEY", b"\x30\x00")).unwrap();
        let e = read_key(&path).unwrap_err().to_string();
        assert!(
            e.contains("EC PRIVATE KEY (SEC1)") && e.contains("openssl pkcs8"),
            "{e}"
        );

        let (cert, _) = self_signed(SystemTime::now(), SystemTime::now());
        std::fs::write(&path, certs_pem(&[cert])).unwrap();
        let e = read_key(&path).unwrap_err().to_string();
        assert!(
            e.contains("no private key in it (it holds: CERTIFICATE)"),
            "{e}"
        );
    }

    #[test]
    fn refuses_expired_and_not_yet_valid_certificates() {
        let dir = TempDir::new("files-validity");
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let path = dir.path().join("cert.pem");

        let (old, _) = self_signed(now - 3 * day, now - day);
        std::fs::write(&path, certs_pem(&[old])).unwrap();
        let certs = read_certs(&path).unwrap();
        let e = check_validity(&path, &certs, now).unwrap_err().to_string();
        let when = rfc3339(CertInfo::parse(&certs[0]).unwrap().not_after);
        assert!(
            e.contains(&format!("cert.pem: certificate 1 expired at {when}")),
            "{e}"
        );

        let (future, _) = self_signed(now + day, now + 3 * day);
        std::fs::write(&path, certs_pem(&[future])).unwrap();
        let certs = read_certs(&path).unwrap();
        let e = check_validity(&path, &certs, now).unwrap_err().to_string();
        let when = rfc3339(CertInfo::parse(&certs[0]).unwrap().not_before);
        assert!(
            e.contains(&format!("certificate 1 is not valid yet: only from {when}")),
            "{e}"
        );
    }

    #[test]
    fn refuses_a_key_that_is_not_the_certificates() {
        let dir = TempDir::new("files-mismatch");
        let now = SystemTime::now();
        let (cert, _) = self_signed(now - Duration::from_secs(60), now + Duration::from_secs(60));
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, certs_pem(&[cert])).unwrap();
        std::fs::write(&key_path, other.serialize_pem()).unwrap();
        let e = read_credentials(&cert_path, &key_path, now)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key.pem: this key does not match the certificate in")
                && e.contains("cert.pem"),
            "{e}"
        );
    }
}
