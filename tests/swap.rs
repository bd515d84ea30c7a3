//! Swap under load: while many calls run against the embedded backend, the policy is
//! swapped more than a hundred times through the admin API and the watched file. No call
//! fails, and each answer reports exactly one revision, one that was current while the call
//! ran.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use keel::pb::keel_admin as admin;

const WORKERS: usize = 16;
const ADMIN_SWAPS: u64 = 100;
const FILE_SWAPS: u64 = 10;

fn policy(n: u64) -> String {
    // Every document differs, so every swap is a new revision.
    format!(
        "policy_version = \"load.{n}\"\n[defaults]\ntimeout = \"{}ms\"\n",
        30_000 + n
    )
}

/// Revisions known to have been current: `applied` is the newest confirmed, `applying` the
/// newest that may already be. A call that starts after `applied` was read and ends before
/// `applying` is read can only have used a revision between the two.
#[derive(Default)]
struct Revisions {
    applied: AtomicU64,
    applying: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_the_policy_under_load_drops_no_call_and_mixes_no_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, policy(0)).unwrap();
    let keel = Keel::start_with_admin(keel::Options {
        config: Some(file.clone()),
        ..Default::default()
    })
    .await;
    let revisions = Arc::new(Revisions::default());
    revisions.applied.store(1, Ordering::SeqCst);
    revisions.applying.store(1, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));

    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let mut client = keel.client().await;
        let (revisions, stop) = (revisions.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut i = 0i32;
            while !stop.load(Ordering::SeqCst) {
                let mut req = simple_request();
                req.raw_input_contents[1] = i32_bytes(&[i; 16]);
                let lo = revisions.applied.load(Ordering::SeqCst);
                let resp = client
                    .model_infer(req)
                    .await
                    .unwrap_or_else(|s| panic!("worker {w} call {i} failed: {s:?}"));
                let hi = revisions.applying.load(Ordering::SeqCst);
                let rev = revision(&resp);
                assert!(
                    lo <= rev && rev <= hi,
                    "revision {rev} outside [{lo}, {hi}]"
                );
                let sum = i32s(&resp.into_inner().raw_output_contents[0]);
                assert_eq!(sum[3], 3 + i, "a correct answer");
                seen.push(rev);
                i += 1;
            }
            seen
        }));
    }

    // 100 swaps through the admin API, each checked against the revision it replaces.
    let mut admin = keel.admin_client().await;
    for n in 1..=ADMIN_SWAPS {
        let expected = revisions.applied.load(Ordering::SeqCst);
        revisions.applying.store(expected + 1, Ordering::SeqCst);
        let resp = admin
            .apply_policy(admin::ApplyPolicyRequest {
                toml: policy(n),
                expected_revision: Some(expected),
            })
            .await
            .unwrap()
            .into_inner();
        let now = resp.policy.unwrap().revision;
        assert_eq!(now, expected + 1);
        revisions.applied.store(now, Ordering::SeqCst);
    }

    // Then swaps through the watched file: the file's content changed, so it wins.
    let mut probe = keel.client().await;
    for n in 1..=FILE_SWAPS {
        let want = revisions.applied.load(Ordering::SeqCst) + 1;
        revisions.applying.store(want, Ordering::SeqCst);
        std::fs::write(&file, policy(ADMIN_SWAPS + n)).unwrap();
        let mut reached = false;
        for _ in 0..400 {
            let resp = probe.model_infer(simple_request()).await.unwrap();
            if revision(&resp) == want {
                reached = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(reached, "file swap {n} reached revision {want} within 10s");
        revisions.applied.store(want, Ordering::SeqCst);
    }

    stop.store(true, Ordering::SeqCst);
    let mut calls = 0;
    let mut distinct = std::collections::BTreeSet::new();
    for w in workers {
        let seen = w.await.expect("no worker failed");
        calls += seen.len();
        distinct.extend(seen);
    }
    let last = 1 + ADMIN_SWAPS + FILE_SWAPS;
    assert_eq!(revisions.applied.load(Ordering::SeqCst), last);
    assert!(calls >= WORKERS, "every worker made calls ({calls} in all)");
    assert!(distinct.len() >= 2, "calls ran across swaps: {distinct:?}");
    let info = admin
        .get_policy(admin::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.revision, last);
    assert_eq!(
        info.policy_version.as_deref(),
        Some(format!("load.{}", ADMIN_SWAPS + FILE_SWAPS).as_str())
    );
    keel.stop().await.unwrap();
}
