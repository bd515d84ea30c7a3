//! Policy reloads from the file: the watched file and SIGHUP swap in a new revision, an
//! invalid edit is refused while the old policy keeps serving, and answers report the
//! revision they used.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Calls `simple` until the answer reports `want` (bounded: 20s).
async fn wait_for_revision(client: &mut Client, want: u64) {
    for _ in 0..400 {
        let resp = client.model_infer(simple_request()).await.unwrap();
        if revision(&resp) == want {
            return;
        }
        assert!(revision(&resp) < want, "revision went past {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("revision {want} was not applied within 20s");
}

fn policy(version: &str, timeout: &str) -> String {
    format!("policy_version = \"{version}\"\n[defaults]\ntimeout = \"{timeout}\"\n")
}

#[tokio::test]
async fn editing_the_watched_file_swaps_the_policy_and_a_bad_edit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, policy("v1", "30s")).unwrap();
    let keel = Keel::start(keel::Options {
        config: Some(file.clone()),
        ..Default::default()
    })
    .await;
    let mut client = keel.client().await;
    let first = client.model_infer(simple_request()).await.unwrap();
    assert_eq!(revision(&first), 1);

    // An editor-style replace: write a new file and rename it over the old one.
    let tmp = dir.path().join(".policy.toml.swp");
    std::fs::write(&tmp, policy("v2", "20s")).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    wait_for_revision(&mut client, 2).await;

    // An invalid edit is refused; revision 2 keeps serving, and the audit says why.
    std::fs::write(
        &file,
        "policy_version = \"v3\"\n[defaults]\ntimout = \"1s\"\n",
    )
    .unwrap();
    let audit = dir.path().join("policy.toml.audit.jsonl");
    let rejected = poll_audit(&audit, |lines| {
        lines.iter().any(|l| l["outcome"] == "rejected")
    })
    .await;
    let reasons = rejected
        .iter()
        .find(|l| l["outcome"] == "rejected")
        .unwrap()["reasons"]
        .clone();
    assert_eq!(
        reasons[0],
        "defaults.timout: unknown key, did you mean timeout?"
    );
    let resp = client.model_infer(simple_request()).await.unwrap();
    assert_eq!(revision(&resp), 2, "the old policy keeps serving");

    // Fixing the file applies it as the next revision.
    std::fs::write(&file, policy("v3", "10s")).unwrap();
    wait_for_revision(&mut client, 3).await;
    let lines = poll_audit(&audit, |lines| lines.len() >= 4).await;
    let outcomes: Vec<&str> = lines
        .iter()
        .map(|l| l["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["accepted", "accepted", "rejected", "accepted"]);
    assert!(lines[1]["source"].as_str().unwrap().starts_with("file:"));
    keel.stop().await.unwrap();
}

/// Reads the audit log until `done` holds (bounded: 20s).
async fn poll_audit(
    path: &Path,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    for _ in 0..400 {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if done(&lines) {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the audit log at {} did not reach the expected state",
        path.display()
    );
}

#[tokio::test]
async fn sighup_rereads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    // No file watch: only the signal can reload it.
    let text = |v: &str, t: &str| format!("{}[server]\nwatch = false\n", policy(v, t));
    std::fs::write(&file, text("v1", "30s")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let result = async {
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split([' ', ',']).next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .parse()
            .unwrap();
        let mut client = connect(addr).await;
        let first = client.model_infer(simple_request()).await.unwrap();
        assert_eq!(revision(&first), 1);
        std::fs::write(&file, text("v2", "15s")).unwrap();
        let hup = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        assert!(hup.success());
        wait_for_revision(&mut client, 2).await;

        // An invalid file is refused on SIGHUP too: revision 2 keeps serving.
        std::fs::write(&file, "[defaults]\ntimeout = \"-1s\"\n").unwrap();
        let hup = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        assert!(hup.success());
        let audit = dir.path().join("policy.toml.audit.jsonl");
        let lines = poll_audit(&audit, |lines| {
            lines.iter().any(|l| l["outcome"] == "rejected")
        })
        .await;
        let rejected = lines.iter().find(|l| l["outcome"] == "rejected").unwrap();
        assert!(
            rejected["source"].as_str().unwrap().starts_with("sighup:"),
            "{rejected}"
        );
        assert!(
            rejected["reasons"][0]
                .as_str()
                .unwrap()
                .starts_with("defaults.timeout: "),
            "{rejected}"
        );
        let resp = client.model_infer(simple_request()).await.unwrap();
        assert_eq!(revision(&resp), 2);
    };
    // Stop the process whatever happened.
    let outcome = tokio::time::timeout(Duration::from_secs(60), result).await;
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let mut status = None;
    for _ in 0..300 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if status.is_none() {
        let _ = child.kill();
    }
    outcome.expect("the SIGHUP test finished within 60s");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "keel exits 0 on SIGTERM"
    );
}
