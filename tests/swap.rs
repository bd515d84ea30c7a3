//! Swap under load: while many calls run against the embedded backend, the policy is
//! swapped more than a hundred times through the admin API and the watched file. No call
//! fails, each answer reports exactly one revision, one that was current while the call
//! ran, and everything observable of the answer was decided by that revision alone.
//!
//! Every document `n` differs from the one before in two per-call settings that each answer
//! shows: its retry attempts (`keel-primary-attempts` is `1 + n % 3`, every attempt being
//! aborted by an injected fault) and its fallback answer (`OUTPUT0` is `[n]`). A call that
//! took its retry settings from one snapshot and its ladder or revision from another cannot
//! tell one story.

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

/// Policy document `n`, served as revision `n + 1`.
fn policy(n: u64) -> String {
    // Every document differs, so every swap is a new revision; what differs is seen in
    // each answer (module docs).
    format!(
        "policy_version = \"load.{n}\"\n\
         [defaults]\ntimeout = \"{}ms\"\n\
         [defaults.retry]\nmax_attempts = {}\ninitial_backoff = \"1ms\"\nmax_backoff = \"1ms\"\n\
         [defaults.retry.budget]\nratio = 1.0\nmin_per_sec = 100000\n\
         [defaults.breaker]\nenabled = false\n\
         [models.simple]\nbackend = \"embedded\"\n\
         fallback = [{{ static = [{{ name = \"OUTPUT0\", datatype = \"INT32\", shape = [1], data = [{n}] }}] }}]\n\
         [models.simple.fault.abort]\npercent = 100\ncode = \"UNAVAILABLE\"\n",
        30_000 + n,
        attempts(n),
    )
}

/// The attempts document `n` gives a call.
fn attempts(n: u64) -> u64 {
    1 + n % 3
}

/// Checks that everything `resp` shows comes from the one revision it reports, and returns
/// that revision.
fn one_revision(resp: tonic::Response<keel::pb::inference::ModelInferResponse>) -> u64 {
    let rev = revision(&resp);
    let n = rev - 1;
    assert_eq!(
        number(&resp, "keel-primary-attempts"),
        attempts(n),
        "revision {rev}'s retry settings"
    );
    let answer = i32s(&resp.into_inner().raw_output_contents[0]);
    assert_eq!(answer, [n as i32], "revision {rev}'s fallback answer");
    rev
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
                let lo = revisions.applied.load(Ordering::SeqCst);
                let resp = client
                    .model_infer(simple_request())
                    .await
                    .unwrap_or_else(|s| panic!("worker {w} call {i} failed: {s:?}"));
                let hi = revisions.applying.load(Ordering::SeqCst);
                let rev = one_revision(resp);
                assert!(
                    lo <= rev && rev <= hi,
                    "revision {rev} outside [{lo}, {hi}]"
                );
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
        // Each probe is a call, so the loop is paced by the calls and bounded by the time.
        let reached = tokio::time::timeout(Duration::from_secs(10), async {
            while one_revision(probe.model_infer(simple_request()).await.unwrap()) != want {}
        })
        .await;
        assert!(
            reached.is_ok(),
            "file swap {n} reached revision {want} within 10s"
        );
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
