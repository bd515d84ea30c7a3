//! `keel policy diff`, run as the binary: exit 0 when two policies decide alike, 1 with the
//! decisions that differ, 2 with path-named errors when either is invalid.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/examples")
        .join(name)
}

fn diff(args: &[&Path], json: bool) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(["policy", "diff"]).args(args);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn equal_different_and_invalid_policies_exit_0_1_and_2() {
    let dir = tempfile::tempdir().unwrap();
    let policy = example("policy.toml");
    let text = std::fs::read_to_string(&policy).unwrap();
    assert!(
        text.contains("max_attempts = 3"),
        "the example sets max_attempts"
    );
    let changed = dir.path().join("changed.toml");
    std::fs::write(
        &changed,
        text.replace("max_attempts = 3", "max_attempts = 4"),
    )
    .unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[defaults]\ntimeout = \"soon\"\n").unwrap();

    let (code, out, _) = diff(&[&policy, &policy], false);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no difference"), "{out}");

    let (code, out, _) = diff(&[&policy, &changed], false);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("models.iris.ModelInfer.retry.max_attempts: 3 -> 4"),
        "{out}"
    );
    // `simple` sets its own retry (`[models.simple.retry]`), so the change to the
    // defaults does not reach it: the diff is of effective settings, not of text.
    assert!(!out.contains("models.simple."), "{out}");

    let (code, out, _) = diff(&[&policy, &changed], true);
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["equal"], false);
    let changes = json["changes"].as_array().unwrap();
    assert!(
        changes.iter().all(
            |c| c["path"].as_str().unwrap().ends_with("retry.max_attempts")
                && c["old"] == "3"
                && c["new"] == "4"
        ),
        "only the attempts differ: {out}"
    );

    let (code, _, err) = diff(&[&bad, &policy], false);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("defaults.timeout"),
        "{err}"
    );
}
