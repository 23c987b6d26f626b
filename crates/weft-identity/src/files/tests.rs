use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{CertificateParams, KeyPair, SanType};
use time::OffsetDateTime;

use super::*;
use crate::test_ca::TestCa;

impl TestCa {
    /// A certificate for `sa` and its key, as PEM.
    fn issue(&self, sa: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id(sa).to_string().try_into().unwrap())];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

struct Dir {
    dir: tempfile::TempDir,
    files: CertificateFiles,
}

impl Dir {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = CertificateFiles {
            cert_file: dir.path().join("cert-chain.pem"),
            key_file: dir.path().join("key.pem"),
            roots_file: dir.path().join("root-cert.pem"),
        };
        Self { dir, files }
    }

    /// Writes the three files the way a Secret volume changes: each file replaced whole.
    fn write(&self, cert: &str, key: &str, roots: &str) {
        for (path, text) in [
            (&self.files.cert_file, cert),
            (&self.files.key_file, key),
            (&self.files.roots_file, roots),
        ] {
            let next = self.dir.path().join(".next");
            std::fs::write(&next, text).unwrap();
            std::fs::rename(&next, path).unwrap();
        }
    }
}

#[test]
fn certificate_files_make_the_workloads_tls_material() {
    let ca = TestCa::new();
    let dir = Dir::new();
    let (cert, key) = ca.issue("reviews");
    dir.write(&cert, &key, &ca.root_pem);
    let material = dir.files.load(&id("reviews")).unwrap();
    assert_eq!(material.credentials.id, id("reviews"));
    assert_eq!(material.roots_pem(), ca.root_pem);

    // A chain file that carries its root too (istio-csr's cert-chain.pem) is the same chain.
    dir.write(&format!("{cert}{}", ca.root_pem), &key, &ca.root_pem);
    let with_root = dir.files.load(&id("reviews")).unwrap();
    assert_eq!(with_root.credentials.serial, material.credentials.serial);
    assert_eq!(
        with_root.summaries().0.len(),
        1,
        "the root is not sent as part of the chain"
    );

    // Every root in the roots file is trusted (a root rotation in progress).
    let other = TestCa::new();
    dir.write(&cert, &key, &format!("{}{}", other.root_pem, ca.root_pem));
    let both = dir.files.load(&id("reviews")).unwrap();
    assert_eq!(both.root_fingerprints().len(), 2);
}

#[test]
fn certificate_files_that_do_not_make_a_usable_certificate_are_refused_naming_file_and_problem() {
    let ca = TestCa::new();
    let dir = Dir::new();
    let (cert, key) = ca.issue("reviews");
    let (_, other_key) = ca.issue("reviews");
    let (ratings, ratings_key) = ca.issue("ratings");
    let stranger = TestCa::new();
    let paths = |f: &CertificateFiles| {
        (
            f.cert_file.display().to_string(),
            f.key_file.display().to_string(),
            f.roots_file.display().to_string(),
        )
    };
    let (cert_path, key_path, roots_path) = paths(&dir.files);

    let refused = |cert: &str, key: &str, roots: &str| {
        dir.write(cert, key, roots);
        match dir.files.load(&id("reviews")) {
            Ok(_) => panic!("accepted"),
            Err(reason) => reason,
        }
    };
    let reason = refused(&cert, &other_key, &ca.root_pem);
    assert!(reason.starts_with(&key_path), "{reason}");
    let reason = refused(&cert, &key, &stranger.root_pem);
    assert!(
        reason.starts_with(&format!("{cert_path} against {roots_path}")) && reason.contains("trusted root"),
        "{reason}"
    );
    let reason = refused(&ratings, &ratings_key, &ca.root_pem);
    assert!(
        reason.starts_with(&cert_path)
            && reason.contains("ns/default/sa/ratings")
            && reason.contains("sa/reviews"),
        "{reason}"
    );
    let reason = refused("not a certificate", &key, &ca.root_pem);
    assert!(
        reason.starts_with(&cert_path) && reason.contains("no PEM certificate"),
        "{reason}"
    );
    let reason = refused(&cert, &key, "");
    assert!(reason.starts_with(&roots_path), "{reason}");
    std::fs::remove_file(&dir.files.key_file).unwrap();
    let reason = dir.files.load(&id("reviews")).err().unwrap();
    assert!(reason.starts_with(&key_path), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_files_replace_the_certificate_and_a_bad_change_keeps_the_one_in_use() {
    let ca = TestCa::new();
    let dir = Dir::new();
    let renewed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (r, f) = (renewed.clone(), failed.clone());
    let events = StoreEvents {
        renewed: Box::new(move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        }),
        failed: Box::new(move |_| {
            f.fetch_add(1, Ordering::SeqCst);
        }),
    };
    let stop = CancellationToken::new();
    // Started before the files exist, as when the agent writing them has not yet.
    let mut rx = watch_files(id("reviews"), dir.files.clone(), events, stop.clone());
    let serial = async |rx: &mut watch::Receiver<Option<TlsMaterial>>| {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap()
            .unwrap();
        rx.borrow().as_ref().unwrap().credentials.serial.clone()
    };

    // Missing for three polls: reported once, not once a second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(failed.load(Ordering::SeqCst), 1);
    assert!(rx.borrow().is_none());

    let (cert, key) = ca.issue("reviews");
    dir.write(&cert, &key, &ca.root_pem);
    let first = serial(&mut rx).await;

    let (next_cert, next_key) = ca.issue("reviews");
    dir.write(&next_cert, &next_key, &ca.root_pem);
    let second = serial(&mut rx).await;
    assert_ne!(first, second);
    assert_eq!(renewed.load(Ordering::SeqCst), 2);

    // A key that is not the certificate's: reported, and the certificate in use stays.
    let before = failed.load(Ordering::SeqCst);
    dir.write(&cert, &next_key, &ca.root_pem);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while failed.load(Ordering::SeqCst) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the bad change was not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rx.borrow().as_ref().unwrap().credentials.serial, second);
    assert!(!rx.has_changed().unwrap());
    stop.cancel();
}
