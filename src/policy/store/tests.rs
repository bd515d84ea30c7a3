//! The store: swaps, history, rollback, flags, staleness and the audit trail.

use std::sync::Arc;

use super::*;
use crate::policy::AuditLog;

const V1: &str = "policy_version = \"v1\"\n[flags]\nshadow = false\n[defaults]\ntimeout = \"5s\"\n";
const V2: &str = "policy_version = \"v2\"\n[flags]\nshadow = false\n[defaults]\ntimeout = \"7s\"\n";

fn store_with(text: &str, audit: AuditLog) -> Store {
    Store::new(
        Some(text.to_string()),
        Source::Startup(None),
        audit,
        Box::new(|_| Ok(())),
        Box::new(|_| {}),
    )
    .unwrap()
}

fn admin() -> Source {
    Source::Admin {
        principal: "alice".into(),
    }
}

#[test]
fn an_accepted_change_is_a_new_revision_and_identical_text_is_not() {
    let store = store_with(V1, AuditLog::disabled());
    assert_eq!(store.current().revision, 1);
    let applied = store.apply(V2, admin(), Some(1)).unwrap();
    let Applied::Swapped(_, change) = applied else {
        panic!("a new revision");
    };
    assert_eq!(change.changed, ["defaults.timeout", "policy_version"]);
    assert_eq!(store.current().revision, 2);
    assert_eq!(store.current().version(), Some("v2"));
    // The same document, laid out differently: no new revision.
    let same = "# comment\npolicy_version = \"v2\"\ndefaults = { timeout = \"7s\" }\n[flags]\nshadow = false\n";
    assert!(matches!(
        store.apply(same, admin(), None).unwrap(),
        Applied::Unchanged(_)
    ));
    assert_eq!(store.current().revision, 2);
}

#[test]
fn the_seed_follows_the_policys_content_not_its_revision() {
    // Two replicas (or one after a restart) reach the same policy at different revisions:
    // they must draw jitter and faults alike.
    let fresh = store_with(V2, AuditLog::disabled());
    let changed = store_with(V1, AuditLog::disabled());
    changed.apply(V2, admin(), None).unwrap();
    let (a, b) = (fresh.current(), changed.current());
    assert_ne!(a.revision, b.revision);
    assert_eq!(a.seed, b.seed);
    assert_eq!(a.seed, u64::from_str_radix(&a.hash[..16], 16).unwrap());
    assert_ne!(a.seed, store_with(V1, AuditLog::disabled()).current().seed);
}

#[test]
fn an_invalid_change_is_refused_audited_and_the_old_snapshot_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let store = store_with(V1, AuditLog::open(Some(&path)));
    let before = store.current();
    let err = store
        .apply("[defaults]\ntimout = \"1s\"\n[models.x]\n", admin(), None)
        .unwrap_err();
    let ApplyError::Invalid(errors) = &err else {
        panic!("{err:?}");
    };
    let msgs: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert!(
        msgs.contains(&"defaults.timout: unknown key, did you mean timeout?".to_string()),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("models.x.backend: is required")),
        "{msgs:?}"
    );
    assert!(
        Arc::ptr_eq(&before, &store.current()),
        "the old snapshot keeps serving"
    );

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "startup and the rejection");
    assert_eq!(lines[0]["outcome"], "accepted");
    assert_eq!(lines[1]["outcome"], "rejected");
    assert_eq!(lines[1]["source"], "admin:alice");
    assert_eq!(lines[1]["revision"], 1);
    assert_eq!(lines[1]["reasons"].as_array().unwrap().len(), 2);
}

#[test]
fn accepted_changes_are_audited_with_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let store = store_with(V1, AuditLog::open(Some(&path)));
    store.apply(V2, admin(), None).unwrap();
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["outcome"], "accepted");
    assert_eq!(last["revision"], 2);
    assert_eq!(last["policy_version"], "v2");
    assert_eq!(last["hash"], store.current().hash.as_str());
    assert_eq!(
        last["changes"]["changed"],
        serde_json::json!(["defaults.timeout", "policy_version"])
    );
}

#[test]
fn a_stale_expected_revision_is_refused() {
    let store = store_with(V1, AuditLog::disabled());
    store.apply(V2, admin(), Some(1)).unwrap();
    let err = store.apply(V1, admin(), Some(1)).unwrap_err();
    assert_eq!(
        err,
        ApplyError::Stale {
            expected: 1,
            current: 2
        }
    );
}

#[test]
fn rollback_restores_the_exact_earlier_document_as_a_new_revision() {
    let store = store_with(V1, AuditLog::disabled());
    let first = store.current();
    store.apply(V2, admin(), None).unwrap();
    let rolled = store.rollback(1, "bob").unwrap();
    let now = rolled.snapshot();
    assert_eq!(now.revision, 3);
    assert_eq!(now.hash, first.hash);
    assert_eq!(now.text, first.text);
    assert_eq!(now.policy, first.policy);
    assert_eq!(
        now.source,
        Source::Rollback {
            principal: "bob".into(),
            to: 1
        }
    );
    assert_eq!(
        store.rollback(99, "bob").unwrap_err(),
        ApplyError::UnknownRevision(99)
    );
}

#[test]
fn history_keeps_the_last_sixteen() {
    let store = store_with(V1, AuditLog::disabled());
    for i in 0..20 {
        store
            .apply(
                &format!("[defaults]\ntimeout = \"{}s\"\n", i + 1),
                admin(),
                None,
            )
            .unwrap();
    }
    let history = store.history();
    assert_eq!(history.len(), HISTORY);
    assert_eq!(history.last().unwrap().revision, 21);
    assert_eq!(history[0].revision, 6);
    assert_eq!(
        store.rollback(2, "x").unwrap_err(),
        ApplyError::UnknownRevision(2)
    );
}

#[test]
fn set_flag_changes_one_flag_and_keeps_the_rest_of_the_text() {
    let text = "# my policy\npolicy_version = \"v1\"\n[flags]\nshadow = false # off for now\n";
    let store = store_with(text, AuditLog::disabled());
    let applied = store
        .set_flag("shadow", Flag::Bool(true), "carol", None)
        .unwrap();
    let now = applied.snapshot();
    assert_eq!(now.revision, 2);
    assert_eq!(now.policy.flags["shadow"], Flag::Bool(true));
    assert!(now.text.starts_with("# my policy\n"), "{}", now.text);
    assert_eq!(
        store
            .set_flag("nope", Flag::Bool(true), "carol", None)
            .unwrap_err(),
        ApplyError::UnknownFlag("nope".into())
    );
    assert_eq!(
        store
            .set_flag("shadow", Flag::Bool(false), "carol", Some(1))
            .unwrap_err(),
        ApplyError::Stale {
            expected: 1,
            current: 2
        }
    );
}

#[test]
fn listener_settings_cannot_change_without_a_restart() {
    let store = store_with(V1, AuditLog::disabled());
    let err = store
        .apply("[server]\nlisten = \"127.0.0.1:9999\"\n", admin(), None)
        .unwrap_err();
    assert_eq!(err, ApplyError::RestartNeeded(vec!["server.listen".into()]));
    assert!(err.to_string().contains("restart"));
    let err = store
        .apply(
            "[server]
handshake_timeout = \"1s\"
max_buffered_per_connection = \"128MiB\"
max_buffered = \"2GiB\"
",
            admin(),
            None,
        )
        .unwrap_err();
    assert_eq!(
        err,
        ApplyError::RestartNeeded(vec![
            "server.handshake_timeout".into(),
            "server.max_buffered_per_connection".into(),
            "server.max_buffered".into(),
        ])
    );
    // drain_timeout is read at shutdown, so it may change.
    assert!(
        store
            .apply("[server]\ndrain_timeout = \"3s\"\n", admin(), None)
            .is_ok()
    );
}

#[test]
fn the_file_wins_only_when_its_content_changed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, V1).unwrap();
    let store = Store::new(
        Some(V1.to_string()),
        Source::Startup(Some(file.clone())),
        AuditLog::disabled(),
        Box::new(|_| Ok(())),
        Box::new(|_| {}),
    )
    .unwrap();
    store.apply(V2, admin(), None).unwrap();
    // An event for a file that did not change does not undo the admin change.
    let r = store
        .reload_file(&file, Source::FileWatch(file.clone()))
        .unwrap();
    assert!(matches!(r, Applied::Unchanged(_)));
    assert_eq!(store.current().version(), Some("v2"));
    // A real edit wins.
    std::fs::write(&file, V1.replace("5s", "9s")).unwrap();
    let r = store
        .reload_file(&file, Source::FileWatch(file.clone()))
        .unwrap();
    assert_eq!(r.snapshot().revision, 3);
    assert_eq!(
        store.current().policy.defaults.timeout,
        Some(std::time::Duration::from_secs(9))
    );
}

#[test]
fn adjustments_apply_to_every_document_and_checks_can_refuse() {
    let store = Store::new(
        None,
        Source::Startup(None),
        AuditLog::disabled(),
        Box::new(|p: &Policy| {
            if p.flags.contains_key("forbidden") {
                Err(PolicyErrors::one("flags.forbidden", "not allowed here"))
            } else {
                Ok(())
            }
        }),
        Box::new(|p: &mut Policy| p.server.listen = "127.0.0.1:7".parse().unwrap()),
    )
    .unwrap();
    assert_eq!(store.current().policy.server.listen.port(), 7);
    // A document without a listen address keeps the adjusted one: no restart needed.
    assert!(store.apply(V1, admin(), None).is_ok());
    let err = store
        .apply("[flags]\nforbidden = true\n", admin(), None)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid policy:\nflags.forbidden: not allowed here"
    );
}

#[test]
fn refused_rollbacks_and_flag_changes_are_audited_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let store = store_with(V1, AuditLog::open(Some(&path)));
    assert!(store.rollback(7, "dave").is_err());
    assert!(
        store
            .set_flag("nope", Flag::Bool(true), "dave", None)
            .is_err()
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "startup and two refusals");
    assert_eq!(lines[1]["outcome"], "rejected");
    assert_eq!(lines[1]["source"], "rollback:dave:to=7");
    assert_eq!(lines[2]["source"], "set-flag:dave:nope");
    assert_eq!(
        lines[2]["reasons"][0],
        "flag \"nope\" is not defined under [flags]"
    );
}

#[test]
fn an_auto_rollback_zeroes_the_canary_weight_in_a_new_audited_revision() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let text = "[models.simple]\n# the canary\nroutes = [\n  { backend = \"embedded\", weight = 80 },\n  { name = \"v2\", backend = \"embedded\", weight = 20, canary = true },\n]\n";
    let store = store_with(text, AuditLog::open(Some(&path)));
    let applied = store.roll_back_canary("simple", "v2").unwrap();
    let now = applied.snapshot();
    assert_eq!(now.revision, 2);
    assert_eq!(
        now.source,
        Source::AutoRollback {
            model: "simple".into(),
            route: "v2".into()
        }
    );
    let routes = &now.policy.models.as_ref().unwrap()["simple"].routes;
    assert_eq!((routes[0].weight, routes[1].weight), (80, 0));
    assert!(
        now.text.contains("# the canary"),
        "the rest of the text is kept"
    );
    let audit = std::fs::read_to_string(&path).unwrap();
    assert!(
        audit.contains("\"source\":\"auto-rollback:simple:v2\""),
        "{audit}"
    );
    // A route that is not the canary is never touched.
    let e = store.roll_back_canary("simple", "embedded").unwrap_err();
    assert!(
        e.to_string()
            .contains("has no canary route named \"embedded\""),
        "{e}"
    );
    assert_eq!(store.current().revision, 2);
}

#[test]
fn every_server_setting_is_either_compared_under_its_own_name_or_hot() {
    use std::time::Duration;
    let tls = crate::policy::TlsSettings {
        section: "server.tls",
        cert: "c.pem".into(),
        key: "k.pem".into(),
        client_ca: None,
    };
    let old = Policy::default();
    let mut new = Policy::default();
    let s = &mut new.server;
    let d = Duration::from_secs(12_345);
    s.listen = "127.0.0.1:1".parse().unwrap();
    s.admin_listen = "127.0.0.1:2".parse().unwrap();
    s.admin_token_env = Some("T".into());
    s.drain_grace = d;
    s.drain_timeout = d;
    s.max_message_size += 1;
    s.audit_log = Some("a.log".into());
    s.watch = !s.watch;
    s.max_in_flight += 1;
    s.interactive_reserve += 0.1;
    s.tls = Some(tls.clone());
    s.admin_tls = Some(tls);
    s.max_metadata_size += 1;
    s.max_concurrent_streams += 1;
    s.keepalive_interval = d;
    s.keepalive_timeout = d;
    s.max_connection_age = Some(d);
    s.max_connections += 1;
    s.tls_handshake_timeout = d;
    s.handshake_timeout = d;
    s.max_buffered_per_connection += 1;
    s.max_buffered += 1;
    s.workers += 1;
    let named = restart_needed(&old, &new);
    const HOT: [&str; 3] = ["drain_grace", "drain_timeout", "workers"];
    // The settings' own field names, from their Debug form.
    let debug = format!("{:?}", old.server);
    let fields: Vec<&str> = debug
        .split([',', '{'])
        .filter_map(|part| part.trim().split_once(": ").map(|(name, _)| name))
        .filter(|name| name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    let mut wanted: Vec<String> = fields
        .iter()
        .filter(|f| !HOT.contains(f))
        .map(|f| format!("server.{f}"))
        .collect();
    let mut named_sorted = named.clone();
    wanted.sort();
    named_sorted.sort();
    assert_eq!(named_sorted, wanted);
}
