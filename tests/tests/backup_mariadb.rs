//! MariaDB backups end to end: the agent's own S3 client against a real S3 server that
//! verifies signatures behind TLS (`dbvm_e2e::s3`), and (below) streamed mariabackup
//! backups, binlog upload and point-in-time restore through signed commands, with MariaDB
//! and mariabackup in the database image on a real Docker engine.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_agent::backup::s3::{S3Error, PART_SIZE, S3};
use dbvm_agent::backup::storage::Storage;
use dbvm_e2e::s3::S3Server;
use dbvm_e2e::Fleet;
use dbvm_protocol::seal::Secret;
use std::time::Duration;

fn storage(s3: &S3Server, bucket: &str, secret: &str, ca: &std::path::Path) -> Storage {
    Storage {
        host: s3.endpoint_host.clone(),
        port: s3.port,
        bucket: bucket.into(),
        region: s3.region.clone(),
        prefix: "p1".into(),
        ca_pem: Some(std::fs::read_to_string(ca).unwrap()),
        access_key_id: Secret::new(s3.access_key.clone()),
        secret_access_key: Secret::new(secret),
    }
}

/// Deterministic, poorly compressible bytes.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_s3_client_puts_uploads_in_parts_lists_downloads_checked_and_explains_refusals() {
    let fleet = Fleet::new();
    let s3 = S3Server::start(&fleet.path("s3"));
    s3.create_bucket("mtb");
    let io = Duration::from_secs(5);
    let c = S3::new(&storage(&s3, "mtb", &s3.secret_key, &s3.ca_pem_path), io).unwrap();

    let small = c.put("a/small", b"hello".to_vec()).await.unwrap();
    assert_eq!(small.size, 5);
    assert_eq!(c.get("a/small").await.unwrap().unwrap(), b"hello");
    assert_eq!(c.get("a/none").await.unwrap(), None);

    // Two and a half parts, through a pipe: a multipart upload.
    let data = noise(PART_SIZE * 5 / 2);
    let (mut w, mut r) = tokio::io::duplex(64 * 1024);
    let feed = data.clone();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        w.write_all(&feed).await.unwrap();
    });
    let big = c.upload("a/big", &mut r).await.unwrap();
    writer.await.unwrap();
    assert_eq!(big.size, data.len() as u64);
    let on_disk = std::fs::read(s3.root.join("mtb/p1/a/big")).unwrap();
    assert!(on_disk == data, "the stored object is the stream");
    let mut back = Vec::new();
    let got = c
        .download("a/big", &mut back, Some(&big.sha256))
        .await
        .unwrap();
    assert_eq!(got, big);
    assert!(back == data);

    let mut names: Vec<_> = c
        .list("a/")
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.name, l.size))
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            ("a/big".to_string(), data.len() as u64),
            ("a/small".to_string(), 5)
        ]
    );

    // A damaged object is found while it streams.
    let mut damaged = on_disk.clone();
    damaged[PART_SIZE + 7] ^= 0xff;
    std::fs::write(s3.root.join("mtb/p1/a/big"), &damaged).unwrap();
    let e = c
        .download("a/big", &mut Vec::new(), Some(&big.sha256))
        .await
        .unwrap_err();
    assert!(matches!(e, S3Error::Mismatch { .. }), "{e}");
    assert!(e.to_string().contains("is damaged"), "{e}");

    c.delete("a/small").await.unwrap();
    assert_eq!(c.get("a/small").await.unwrap(), None);
    c.prove("agent-1").await.unwrap();
    assert!(!s3.root.join("mtb/p1/dbvm-check-agent-1").exists());

    // Refusals, each explained and without the secret.
    let wrong = S3::new(
        &storage(&s3, "mtb", "not-the-secret-0123456789", &s3.ca_pem_path),
        io,
    )
    .unwrap();
    let e = wrong.prove("x").await.unwrap_err().to_string();
    assert!(e.contains("refused the credentials"), "{e}");
    assert!(
        !e.contains(&s3.secret_key) && !e.contains("not-the-secret"),
        "{e}"
    );
    let nobucket = S3::new(
        &storage(&s3, "nobucket", &s3.secret_key, &s3.ca_pem_path),
        io,
    )
    .unwrap();
    let e = nobucket.prove("x").await.unwrap_err().to_string();
    assert!(e.contains("bucket does not exist"), "{e}");
    let other = S3::new(&storage(&s3, "mtb", &s3.secret_key, &s3.other_ca_pem()), io).unwrap();
    let e = other.prove("x").await.unwrap_err().to_string();
    assert!(e.contains("TLS certificate was not accepted"), "{e}");
    s3.stop_s3();
    let e = c.prove("x").await.unwrap_err().to_string();
    assert!(
        e.contains("could not be reached") || e.contains("answered with an error"),
        "{e}"
    );
    s3.start_s3();
    c.prove("x").await.unwrap();
}
