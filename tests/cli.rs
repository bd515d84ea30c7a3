//! The `keel` binary: `validate` checks files without opening sockets, `--version` answers,
//! and `serve` prints where it listens and stops cleanly on SIGTERM.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

fn keel(args: &[&str]) -> std::process::Output {
    Command::new(KEEL).args(args).output().unwrap()
}

#[test]
fn every_example_config_validates() {
    for entry in std::fs::read_dir("deploy/examples").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = keel(&["validate", path.to_str().unwrap()]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains("valid"), "{stdout}");
        }
    }
}

#[test]
fn validate_summarises_a_valid_policy_with_effective_settings() {
    let out = keel(&["validate", "deploy/examples/policy.toml"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expect = [
        "deploy/examples/policy.toml: valid (policy_version 2026-11-28.1)",
        "listen 127.0.0.1:8001, admin 127.0.0.1:8002",
        "  triton           127.0.0.1:9001",
        "  simple           95% triton v1, 5% triton v2 canary",
        "infer timeout 5s, 2 attempts",
        "  simple_string    100% triton, 0% embedded (off: simple_string_color=green)",
        "  ModelInfer       timeout 10s (max 300s); retry 3 attempts on transient|overloaded|attempt_timeout",
        "  ModelMetadata    timeout 2s",
    ];
    for e in expect {
        assert!(stdout.contains(e), "missing {e:?} in:\n{stdout}");
    }
    assert!(stdout.lines().count() <= 24, "one screen:\n{stdout}");
}

#[test]
fn validate_names_every_error_by_its_path_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[server]\ndrain_timeout = \"forever\"\n[upstreams.a]\nendpoints = [\"nohost\"]\n[models.resnet]\nbackend = \"b\"\n",
    )
    .unwrap();
    let out = keel(&["validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.drain_timeout: "), "{stderr}");
    assert!(stderr.contains("upstreams.a.endpoints[0]: "), "{stderr}");
    assert!(
        stderr.contains("models.resnet.backend: unknown backend \"b\""),
        "{stderr}"
    );

    std::fs::write(&file, "[models.resnet]\nbackend = \"embedded\"\n").unwrap();
    let out = keel(&["validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("models.resnet.backend: there is no embedded model named \"resnet\""),
        "{stderr}"
    );

    let out = keel(&[
        "validate",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// Runs `keel hash-key` with `stdin`.
fn hash_key(stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new(KEEL)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn hash_key_prints_the_sha256_of_the_key_without_its_line_end() {
    let want = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\n";
    for input in ["foo", "foo\n", "foo\r\n"] {
        let out = hash_key(input);
        assert!(out.status.success(), "{input:?}");
        assert_eq!(String::from_utf8(out.stdout).unwrap(), want, "{input:?}");
    }
    let empty = hash_key("");
    assert_eq!(empty.status.code(), Some(1));
    assert!(
        String::from_utf8(empty.stderr)
            .unwrap()
            .contains("no key on stdin")
    );
    assert_eq!(hash_key(" foo ").status.code(), Some(1));
}

#[test]
fn version_is_printed() {
    let out = keel(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("keel {}", env!("CARGO_PKG_VERSION"))
    );
}

/// What `keel <args>` printed before and after SIGTERM.
struct Served {
    /// The first line of stdout (the startup line), if it came within 30s.
    line: Option<String>,
    status: std::process::ExitStatus,
    /// Every line of stderr (the logs).
    logs: Vec<String>,
}

/// Runs `keel <args> serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0`, waits for its
/// startup line, sends SIGTERM and collects what it wrote; stdout and stderr are pipes.
fn serve_until_sigterm(args: &[&str]) -> Served {
    let mut child = Command::new(KEEL)
        .args(args)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let logs = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).ok();
    let pid = child.id().to_string();
    // Stop it whatever happened above.
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = wait_bounded(&mut child, Duration::from_secs(15));
    assert!(killed.success());
    Served {
        line,
        status,
        logs: logs.join().unwrap(),
    }
}

#[test]
fn serve_prints_its_address_and_models_logs_json_and_exits_0_on_sigterm() {
    let served = serve_until_sigterm(&["--log-format", "json"]);
    let line = served.line.expect("keel printed its startup line");
    assert!(line.contains("listening on 127.0.0.1:"), "{line}");
    assert!(
        line.contains(" (gRPC, OIP v2), admin on 127.0.0.1:"),
        "{line}"
    );
    assert!(
        line.trim_end().ends_with(
            "serving models: identity, iris, simple, simple_identity, simple_int8, simple_string"
        ),
        "{line}"
    );
    assert_eq!(served.status.code(), Some(0));

    let logs = served.logs;
    let events: Vec<serde_json::Value> = logs
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let messages: Vec<&str> = events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(messages.contains(&"serving"), "{messages:?}");
    assert!(messages.contains(&"received SIGTERM"), "{messages:?}");
    assert!(messages.contains(&"shutdown: drained"), "{messages:?}");
    assert!(events.iter().all(|e| e["level"].is_string()), "{logs:?}");
}

#[test]
fn text_logs_to_a_pipe_carry_no_colour_codes() {
    // stderr is a pipe here, as in `keel serve 2> keel.log` or `keel serve 2>&1 | tee`.
    let served = serve_until_sigterm(&[]);
    assert!(served.line.is_some(), "keel started: {:?}", served.logs);
    assert_eq!(served.status.code(), Some(0));
    let logs = served.logs.join("\n");
    assert!(logs.contains("serving"), "{logs}");
    assert!(logs.contains("shutdown: drained"), "{logs}");
    assert!(!logs.contains('\x1b'), "ANSI escape codes in: {logs:?}");
    assert!(
        logs.contains(" INFO "),
        "text lines name their level: {logs}"
    );
}

#[test]
fn serve_with_an_invalid_config_exits_1_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[server]\nlisten = \"nowhere\"\n").unwrap();
    let out = keel(&["serve", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen: "));
}

#[test]
fn serve_refuses_to_start_when_the_admin_token_variable_is_unset() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    let var = "KEEL_CLI_TEST_UNSET_ADMIN_TOKEN";
    std::fs::write(&file, format!("[server]\nadmin_token_env = \"{var}\"\n")).unwrap();
    let args = [
        "--config",
        file.to_str().unwrap(),
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let out = serve_bounded(&args, |c| {
        c.env_remove(var);
    });
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(var), "{stderr}");
    assert!(stderr.contains("is not set"), "{stderr}");
    assert!(out.stdout.is_empty(), "no startup line: {out:?}");
}

#[test]
fn serve_exits_1_when_the_admin_address_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = serve_bounded(&["--admin-listen", &addr], |_| {});
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (admin")),
        "{stderr}"
    );
}

/// Runs `keel serve --listen 127.0.0.1:0 <args>`, expecting it to exit by itself (killed
/// after 15s).
fn serve_bounded(args: &[&str], env: impl FnOnce(&mut Command)) -> std::process::Output {
    let mut cmd = Command::new(KEEL);
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    env(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    wait_bounded(&mut child, Duration::from_secs(15));
    child.wait_with_output().unwrap()
}

fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let step = Duration::from_millis(20);
    let mut waited = Duration::ZERO;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if waited >= limit {
            let _ = child.kill();
            panic!("keel did not exit within {limit:?}");
        }
        std::thread::sleep(step);
        waited += step;
    }
}

#[test]
fn validate_can_leave_the_certificate_files_to_where_keel_runs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tls.toml");
    std::fs::write(
        &file,
        "[server.tls]\ncert = \"/run/secrets/keel/cert.pem\"\nkey = \"/run/secrets/keel/key.pem\"\n\
         [defaults.breaker]\nslow_call_duration = \"2s\"\n",
    )
    .unwrap();
    let out = keel(&["validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "the files are read by default");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server.tls.cert: cannot read /run/secrets/keel/cert.pem"),
        "{stderr}"
    );

    let out = keel(&["validate", "--skip-files", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("not read (--skip-files)"), "{stdout}");
    assert!(
        stdout.contains("breaker opens at 50% failures or 50% slower than 2s of >= 20 calls"),
        "{stdout}"
    );

    // Every other rule still holds.
    std::fs::write(&file, "[server.tls]\ncert = \"c.pem\"\n").unwrap();
    let out = keel(&["validate", "--skip-files", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.tls.key: is required"), "{stderr}");
}
