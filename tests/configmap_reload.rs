//! A policy mounted from a Kubernetes ConfigMap reloads without a restart: the kubelet
//! updates such a volume by writing a new timestamped directory and atomically swapping the
//! `..data` symlink to it, and Keel's watch of the file's directory must see that swap.
//!
//! The test builds the kubelet's layout in a temporary directory:
//!
//! ```text
//! ..2026_11_28_12_00_00.000000001/policy.toml
//! ..data -> ..2026_11_28_12_00_00.000000001
//! policy.toml -> ..data/policy.toml
//! ```
//!
//! and swaps it the way the kubelet's atomic writer does: a new `..<timestamp>` directory, a
//! `..data_tmp` symlink to it renamed over `..data`, then the old directory removed.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use common::*;
use keel::pb::keel_admin as admin;

fn policy(version: &str, timeout: &str) -> String {
    format!("policy_version = \"{version}\"\n[defaults]\ntimeout = \"{timeout}\"\n")
}

/// Writes `text` as `policy.toml` in a new `..<stamp>` directory and points `..data` at it
/// with an atomic rename, then removes the directory `..data` pointed at before.
fn kubelet_update(dir: &Path, stamp: &str, text: &str) {
    let old = std::fs::read_link(dir.join("..data")).ok();
    let data = dir.join(stamp);
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("policy.toml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    symlink(stamp, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// Polls the admin API until the current policy has `version` (bounded: 20s), and returns it.
async fn wait_for_version(client: &mut AdminClient, version: &str) -> admin::PolicyInfo {
    let mut last = None;
    for _ in 0..400 {
        let info = client
            .get_policy(admin::GetPolicyRequest {})
            .await
            .unwrap()
            .into_inner();
        if info.policy_version.as_deref() == Some(version) {
            return info;
        }
        last = Some(info);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("policy_version {version} was not applied within 20s; last seen: {last:?}");
}

#[tokio::test]
async fn a_configmap_style_symlink_swap_reloads_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    kubelet_update(
        dir.path(),
        "..2026_11_28_12_00_00.000000001",
        &policy("v1", "30s"),
    );
    symlink("..data/policy.toml", dir.path().join("policy.toml")).unwrap();

    let keel = Keel::start_with_admin(keel::Options {
        config: Some(dir.path().join("policy.toml")),
        ..Default::default()
    })
    .await;
    let mut client = keel.admin_client().await;
    let mut traffic = keel.client().await;
    let first = wait_for_version(&mut client, "v1").await;
    assert_eq!(first.revision, 1);

    // The kubelet's update: only `..data` changes; `policy.toml` itself is never written.
    kubelet_update(
        dir.path(),
        "..2026_11_28_12_01_00.000000002",
        &policy("v2", "20s"),
    );
    let second = wait_for_version(&mut client, "v2").await;
    assert_eq!(second.revision, 2);
    assert!(second.source.starts_with("file:"), "{second:?}");
    assert_ne!(second.hash, first.hash);
    let resp = traffic.model_infer(simple_request()).await.unwrap();
    assert_eq!(revision(&resp), 2, "traffic is served by the new revision");

    // The old timestamped directory is gone; a second update is seen all the same.
    kubelet_update(
        dir.path(),
        "..2026_11_28_12_02_00.000000003",
        &policy("v3", "10s"),
    );
    let third = wait_for_version(&mut client, "v3").await;
    assert_eq!(third.revision, 3);
    keel.stop().await.unwrap();
}
