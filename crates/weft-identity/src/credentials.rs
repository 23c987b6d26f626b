//! A workload's certificate chain and key, checked on arrival: the chain parses, the leaf names exactly
//! the identity asked for, and it is valid now.

use std::time::{Duration, SystemTime};

use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use crate::SpiffeId;

#[derive(Debug, Clone)]
pub struct Credentials {
    pub id: SpiffeId,
    /// PEM certificates, leaf first.
    pub chain_pem: Vec<String>,
    pub key_pem: String,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When the store will ask for the next certificate (set by the store when it publishes this one).
    pub renew_at: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("the CA returned {0} certificate(s); a chain needs the workload certificate and its root")]
    ShortChain(usize),
    #[error("certificate {index} of the chain does not parse: {reason}")]
    Unparsable { index: usize, reason: String },
    #[error("the certificate is for {presented:?}, not {expected}")]
    WrongIdentity {
        expected: SpiffeId,
        presented: Vec<String>,
    },
    #[error("the certificate is not valid now (valid {not_before:?} to {not_after:?})")]
    NotValidNow {
        not_before: SystemTime,
        not_after: SystemTime,
    },
}

impl Credentials {
    pub fn new(id: SpiffeId, chain_pem: Vec<String>, key_pem: String) -> Result<Self, CredentialsError> {
        if chain_pem.len() < 2 {
            return Err(CredentialsError::ShortChain(chain_pem.len()));
        }
        let leaf = parse(&chain_pem[0], 0)?;
        for (index, pem) in chain_pem.iter().enumerate().skip(1) {
            parse(pem, index)?;
        }
        let x509 = leaf.parse_x509().map_err(|e| CredentialsError::Unparsable {
            index: 0,
            reason: e.to_string(),
        })?;
        let presented: Vec<String> = x509
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .map(|n| match n {
                        GeneralName::URI(uri) => (*uri).to_owned(),
                        other => format!("{other}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if presented != [id.to_string()] {
            return Err(CredentialsError::WrongIdentity {
                expected: id,
                presented,
            });
        }
        let to_system = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        let not_before = to_system(x509.validity().not_before);
        let not_after = to_system(x509.validity().not_after);
        let now = SystemTime::now();
        // A second of slack for clocks that round differently.
        if now + Duration::from_secs(1) < not_before || now >= not_after {
            return Err(CredentialsError::NotValidNow {
                not_before,
                not_after,
            });
        }
        let serial = x509.raw_serial_as_string();
        Ok(Self {
            id,
            chain_pem,
            key_pem,
            serial,
            not_before,
            not_after,
            renew_at: None,
        })
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }

    /// Time left before expiry (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    pub fn is_expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }

    /// The root the chain ends in.
    pub fn root_pem(&self) -> &str {
        self.chain_pem.last().map(String::as_str).unwrap_or_default()
    }
}

fn parse(pem: &str, index: usize) -> Result<Pem, CredentialsError> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| CredentialsError::Unparsable {
            index,
            reason: e.to_string(),
        })?;
    Ok(pem)
}
