//! Parsing and validation of whole documents.

use std::time::Duration;

use super::super::{BackendRef, DEFAULT_LISTEN, Flag, Policy, RetryOn};

fn errors(text: &str) -> Vec<String> {
    Policy::parse(text)
        .unwrap_err()
        .0
        .into_iter()
        .map(|e| e.to_string())
        .collect()
}

const MODEL_INFER: &str = "inference.GRPCInferenceService/ModelInfer";

#[test]
fn an_empty_document_is_the_embedded_default() {
    let p = Policy::parse("").unwrap();
    assert_eq!(p, Policy::default());
    assert_eq!(p.server.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(p.server.admin_listen.to_string(), "127.0.0.1:8002");
    assert!(p.models.is_none());
}

#[test]
fn a_full_document_parses() {
    let p = Policy::parse(
        r#"
        policy_version = "2026-11-28.1"
        [server]
        listen = "127.0.0.1:9000"
        admin_listen = "127.0.0.1:9100"
        drain_timeout = "2s"
        max_message_size = "8MiB"
        [defaults]
        timeout = "5s"
        [defaults.retry]
        max_attempts = 4
        retry_on = ["transient", "RESOURCE_EXHAUSTED"]
        [defaults.retry.budget]
        ratio = 0.1
        [methods."inference.GRPCInferenceService/ModelInfer"]
        timeout = "2s"
        [methods."inference.GRPCInferenceService/ModelInfer".breaker]
        failure_ratio = 0.3
        [upstreams.triton]
        endpoints = ["127.0.0.1:9001", "http://[::1]:9002"]
        [upstreams.canary]
        endpoints = ["127.0.0.1:9003"]
        [flags]
        use_cache = true
        tier = "gold"
        [models.simple]
        routes = [{ backend = "triton", weight = 90 }, { backend = "canary", weight = 10 }]
        versions = ["1"]
        fallback = [{ model = "iris", on = ["breaker_open", "deadline"] }, { static = [{ name = "label", datatype = "INT64", shape = [1], data = [0] }] }]
        flag = "use_cache"
        timeout = "1s"
        [models.simple.retry]
        max_attempts = 2
        [models.iris]
        backend = "embedded"
        "#,
    )
    .unwrap();
    assert_eq!(p.version.as_deref(), Some("2026-11-28.1"));
    assert_eq!(p.server.max_message_size, 8 << 20);
    let crate::policy::Endpoints::Static(uris) = &p.upstreams["triton"].endpoints else {
        panic!("static endpoints expected");
    };
    assert_eq!(uris[1].port_u16(), Some(9002));
    assert_eq!(p.flags["tier"], Flag::String("gold".into()));
    let models = p.models.as_ref().unwrap();
    assert_eq!(models["simple"].routes.len(), 2);
    assert_eq!(
        models["simple"].routes[1].backend,
        BackendRef::Upstream("canary".into())
    );
    assert_eq!(models["iris"].routes[0].backend, BackendRef::Embedded);
    assert_eq!(models["iris"].routes[0].weight, 100);

    // Resolution: model > method > defaults > built in, field by field.
    let s = p.resolve(MODEL_INFER, Some("simple"));
    assert_eq!(s.timeout, Duration::from_secs(1), "the model");
    assert_eq!(s.retry.max_attempts, 2, "the model");
    assert_eq!(
        s.retry.retry_on[1],
        RetryOn::Code(tonic::Code::ResourceExhausted),
        "defaults"
    );
    assert_eq!(s.breaker.failure_ratio, 0.3, "the method");
    assert_eq!(s.budget.ratio, 0.1, "defaults");
    assert_eq!(s.budget.window, Duration::from_secs(10), "built in");
    let s = p.resolve(MODEL_INFER, Some("iris"));
    assert_eq!(s.timeout, Duration::from_secs(2), "the method");
    assert_eq!(s.retry.max_attempts, 4, "defaults");
    let s = p.resolve("inference.GRPCInferenceService/ModelMetadata", None);
    assert_eq!(s.timeout, Duration::from_secs(5), "defaults");
    assert_eq!(s.breaker.failure_ratio, 0.5, "built in");
}

#[test]
fn unknown_keys_are_named_by_their_full_path_with_a_hint() {
    let errs =
        errors("[models.resnet]\nbackend = \"embedded\"\n[models.resnet.retry]\nmax_atempts = 3\n");
    assert_eq!(
        errs,
        ["models.resnet.retry.max_atempts: unknown key, did you mean max_attempts?"]
    );
    let errs = errors("[sever]\nlisten = \"127.0.0.1:1\"\n");
    assert_eq!(errs, ["sever: unknown key, did you mean server?"]);
}

#[test]
fn every_problem_is_reported_at_once() {
    let errs = errors(
        r#"
        [server]
        listen = "localhost"
        drain_timeout = "soon"
        interactive_reserve = -0.1
        [defaults.limits]
        interactive_reserve = 2
        [defaults.retry]
        max_attempts = 11
        multiplier = 0.5
        jitter = "sometimes"
        retry_on = ["sometimes"]
        [defaults.retry.budget]
        ratio = 1.5
        [methods."inference.GRPCInferenceService/ModelInfr"]
        timeout = "1s"
        [upstreams.a]
        endpoints = ["127.0.0.1", "https://x:1"]
        [models.simple]
        backend = "nowhere"
        flag = "missing"
        [models.split]
        routes = [{ backend = "a", weight = 0 }, { backend = "embedded", weight = 0 }]
        "#,
    );
    let joined = errs.join("\n");
    let expect = [
        "server.listen: must be an IP address and port",
        "server.drain_timeout: duration \"soon\"",
        "server.interactive_reserve: -0.1 is out of range: must be 0..=1",
        "defaults.limits.interactive_reserve: 2 is out of range: must be 0..=1",
        "defaults.retry.max_attempts: 11 is out of range: must be 1..=10",
        "defaults.retry.multiplier: 0.5 is out of range: must be 1..=10",
        "defaults.retry.jitter: \"sometimes\" is not one of full, equal, none",
        "defaults.retry.retry_on[0]: \"sometimes\" is neither an error class",
        "defaults.retry.budget.ratio: 1.5 is out of range: must be 0..=1",
        "methods.\"inference.GRPCInferenceService/ModelInfr\": unknown method",
        "upstreams.a.endpoints[0]: \"127.0.0.1\" needs a port",
        "upstreams.a.endpoints[1]: https:// needs a [tls] table",
        "models.simple.backend: unknown backend \"nowhere\": use \"embedded\" or an upstream name (a)",
        "models.simple.flag: unknown flag \"missing\"",
        "models.split.routes: no route is on",
    ];
    for e in expect {
        assert!(joined.contains(e), "missing {e:?} in:\n{joined}");
    }
    assert_eq!(errs.len(), expect.len(), "{joined}");
}

#[test]
fn cross_field_rules_name_the_layer_that_breaks_them() {
    let errs = errors(
        r#"
        [defaults.retry]
        initial_backoff = "2s"
        max_backoff = "1s"
        "#,
    );
    assert_eq!(
        errs,
        ["defaults: retry.initial_backoff (2s) must be <= retry.max_backoff (1s)"]
    );
    let errs = errors(
        r#"
        [methods."inference.GRPCInferenceService/ModelInfer"]
        timeout = "1s"
        [models.iris]
        backend = "embedded"
        [models.iris.retry]
        per_try_timeout = "5s"
        "#,
    );
    assert_eq!(
        errs,
        [
            "models.iris (with methods.\"inference.GRPCInferenceService/ModelInfer\"): retry.per_try_timeout (5s) must be <= timeout (1s)"
        ]
    );
    let errs = errors("[defaults]\ntimeout = \"10m\"\n");
    assert_eq!(
        errs,
        ["defaults: timeout (600s) must be <= max_timeout (300s)"]
    );
}

#[test]
fn fallbacks_must_exist_and_form_no_cycle() {
    let errs = errors(
        r#"
        [models.a]
        backend = "embedded"
        fallback = [{ model = "b" }]
        [models.b]
        backend = "embedded"
        fallback = [{ model = "c" }, { model = "zzz" }]
        [models.c]
        backend = "embedded"
        fallback = [{ model = "a" }]
        [models.d]
        backend = "embedded"
        fallback = [{ model = "d" }]
        "#,
    );
    let joined = errs.join("\n");
    assert!(
        joined.contains("models.b.fallback[1].model: unknown model \"zzz\""),
        "{joined}"
    );
    assert!(
        joined.contains("models.d.fallback[0].model: a model cannot fall back to itself"),
        "{joined}"
    );
    assert!(
        joined.contains("models.a.fallback: fallbacks form a cycle: a → b → c → a"),
        "{joined}"
    );
    assert_eq!(errs.len(), 3, "one report per cycle: {joined}");
}

#[test]
fn ladder_rungs_are_checked() {
    let errs = errors(
        r#"
        [flags]
        on = true
        [models.m]
        backend = "embedded"
        fallback = [
          { model = "x", cache = true },
          { upstream = "nowhere", on = ["sometimes"] },
          { static = [{ name = "y", datatype = "FP32", shape = [2], data = [1.0] }], flag = "off" },
        ]
        [models.m.cache]
        entries = 0
        "#,
    );
    let joined = errs.join("\n");
    for e in [
        "models.m.fallback[0]: set exactly one of model, upstream, cache = true, static",
        "models.m.fallback[1].upstream: unknown upstream \"nowhere\"",
        "models.m.fallback[1].on[0]: \"sometimes\" is not one of breaker_open",
        "models.m.fallback[2].static[0].data: 1 elements but shape [2] needs 2",
        "models.m.fallback[2].flag: unknown flag \"off\"",
        "models.m.cache.entries: 0 is out of range",
    ] {
        assert!(joined.contains(e), "missing {e:?} in\n{joined}");
    }
}

#[test]
fn routes_and_backend_are_exclusive_and_weights_are_checked() {
    let errs = errors(
        "[models.m]\nbackend = \"embedded\"\nroutes = [{ backend = \"embedded\", weight = 100 }]\n",
    );
    assert_eq!(errs, ["models.m: set either backend or routes, not both"]);
    let errs = errors("[models.m]\nroutes = [{ backend = \"embedded\", weight = 101 }]\n");
    assert_eq!(
        errs[0],
        "models.m.routes[0].weight: 101 is out of range: must be 0..=100"
    );
    let errs = errors("[models.m]\nversions = [\"1\"]\n");
    assert!(
        errs[0].starts_with("models.m.backend: is required"),
        "{errs:?}"
    );
}

#[test]
fn a_public_admin_listener_needs_a_token() {
    let errs = errors("[server]\nadmin_listen = \"0.0.0.0:8002\"\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("server.admin_listen: 0.0.0.0:8002 is not a loopback address"),
        "{errs:?}"
    );
    assert!(
        Policy::parse(
            "[server]\nadmin_listen = \"0.0.0.0:8002\"\nadmin_token_env = \"KEEL_ADMIN_TOKEN\"\n"
        )
        .is_ok()
    );
}

#[test]
fn buffer_limits_let_one_whole_message_in_and_grow_with_it() {
    let p = Policy::parse(
        "[server]\nhandshake_timeout = \"1s\"\nmax_buffered_per_connection = \"2MiB\"\nmax_buffered = \"3MiB\"\nmax_message_size = \"1MiB\"\n",
    )
    .unwrap();
    assert_eq!(p.server.handshake_timeout, Duration::from_secs(1));
    assert_eq!(p.server.max_buffered_per_connection, 2 << 20);
    assert_eq!(p.server.max_buffered, 3 << 20);
    // Unset, they are never below what one message of the largest size needs.
    let p = Policy::parse("[server]\nmax_message_size = \"512MiB\"\n").unwrap();
    assert_eq!(p.server.max_buffered_per_connection, 512 << 20);
    assert_eq!(p.server.max_buffered, 1 << 30);
    assert_eq!(
        errors("[server]\nmax_buffered_per_connection = \"1MiB\"\n"),
        [
            "server.max_buffered_per_connection: must be at least server.max_message_size: one whole message must fit"
        ]
    );
    assert_eq!(
        errors("[server]\nmax_buffered = \"100MiB\"\n"),
        ["server.max_buffered: must be at least server.max_buffered_per_connection"]
    );
    assert_eq!(
        errors("[server]\nhandshake_timeout = \"0s\"\n"),
        ["server.handshake_timeout: must be greater than zero"]
    );
}

#[test]
fn workers_default_to_the_cores_and_are_bounded() {
    assert_eq!(Policy::parse("").unwrap().server.workers, 0);
    assert_eq!(
        Policy::parse("[server]\nworkers = 4\n")
            .unwrap()
            .server
            .workers,
        4
    );
    assert_eq!(
        errors("[server]\nworkers = 1025\n"),
        ["server.workers: 1025 is out of range: must be 0..=1024"]
    );
    assert_eq!(
        errors("[server]\nworkers = -1\n"),
        ["server.workers: -1 is out of range: must be 0..=1024"]
    );
    assert_eq!(errors("[server]\nworkers = \"all\"\n").len(), 1);
}

#[test]
fn syntax_errors_say_where() {
    let errs = errors("a = 1\n[server\nlisten = 1");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("TOML syntax: "), "{errs:?}");
    assert!(errs[0].contains("(line 2)"), "{errs:?}");
}

#[test]
fn every_example_policy_in_deploy_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let p = Policy::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                p.version.is_some(),
                "{} sets policy_version",
                path.display()
            );
            n += 1;
        }
    }
    assert!(n >= 2);
}

#[test]
fn routes_carry_versions_names_flags_and_one_canary() {
    let p = Policy::parse(
        r#"
        [flags]
        canary = true
        color = "blue"
        [upstreams.u]
        endpoints = ["127.0.0.1:1"]
        [models.simple]
        routes = [
          { backend = "u", version = "1", weight = 90 },
          { backend = "u", version = "2", weight = 10, canary = true, flag = "canary" },
          { name = "green", backend = "embedded", weight = 0, flag = "color=green" },
        ]
        route_key = "X-User-Id"
        route_override = true
        [models.simple.rollback]
        window = "30s"
        min_requests = 20
        windows = 2
        "#,
    )
    .unwrap();
    let m = &p.models.as_ref().unwrap()["simple"];
    let names: Vec<&str> = m.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["1", "2", "green"]);
    assert_eq!(m.routes[1].version.as_deref(), Some("2"));
    assert!(m.routes[1].canary && m.routes[1].is_on(&p.flags));
    assert!(
        !m.routes[2].is_on(&p.flags),
        "weight 0 and its flag does not hold"
    );
    assert_eq!(
        m.route_key.as_deref(),
        Some("x-user-id"),
        "metadata keys are lower case"
    );
    assert!(m.route_override);
    let r = m.rollback.as_ref().unwrap();
    assert_eq!(
        (r.window, r.min_requests, r.windows),
        (Duration::from_secs(30), 20, 2)
    );
    assert_eq!(r.max_p99_ratio, 1.5, "the default");
}

#[test]
fn route_mistakes_are_named() {
    let errs = errors(
        r#"
        [flags]
        on = true
        color = "blue"
        [models.a]
        routes = [
          { backend = "embedded", weight = 50, canary = true, flag = "color" },
          { backend = "embedded", weight = 50, canary = true, flag = "on=yes" },
          { backend = "embedded", version = "", flag = "off" },
        ]
        [models.a.rollback]
        windows = 0
        [models.b]
        backend = "embedded"
        route_key = "bad key"
        flag = "!color"
        [models.b.rollback]
        window = "1m"
        "#,
    );
    let joined = errs.join("\n");
    let expect = [
        "models.a.routes[0].flag: flag \"color\" is a string: write \"color=<value>\"",
        "models.a.routes[1].flag: flag \"on\" is true or false",
        "models.a.routes[1]: another route is also named \"embedded\"",
        "models.a.routes[2].version: must not be empty when given",
        "models.a.routes[2].flag: unknown flag \"off\"",
        "models.a.routes[2].weight: is required",
        "models.a.rollback.windows: 0 is out of range",
        "models.a.rollback: needs routes with one canary = true route and at least one baseline",
        "models.b.route_key: \"bad key\" is not a valid metadata key",
        "models.b.flag: flag \"color\" is a string",
        "models.b.rollback: needs routes with one canary = true route",
    ];
    for e in expect {
        assert!(joined.contains(e), "missing {e:?} in:\n{joined}");
    }
    assert_eq!(errs.len(), expect.len(), "{joined}");
    let errs = errors(
        "[models.a]\nroutes = [{ backend = \"embedded\", weight = 50, canary = true }, { name = \"b\", backend = \"embedded\", weight = 50, canary = true }]\n",
    );
    assert_eq!(
        errs,
        ["models.a.routes: at most one route may be the canary"]
    );
}

#[test]
fn upstream_pools_parse_dns_checks_and_ejection() {
    use super::super::{CheckKind, Endpoints};
    let p = Policy::parse(
        r#"
        [upstreams.triton]
        dns = "triton.models.svc.cluster.local:8001"
        dns_interval = "10s"
        keepalive_interval = "20s"
        max_concurrent_streams = 100
        [upstreams.triton.health_check]
        kind = "model_ready"
        model = "simple"
        interval = "2s"
        timeout = "500ms"
        unhealthy_threshold = 3
        [upstreams.triton.outlier]
        consecutive_failures = 3
        base_ejection = "5s"
        max_ejection_percent = 30
        "#,
    )
    .unwrap();
    let u = &p.upstreams["triton"];
    assert_eq!(
        u.endpoints,
        Endpoints::Dns {
            host: "triton.models.svc.cluster.local".into(),
            port: 8001,
            interval: Duration::from_secs(10),
        }
    );
    assert_eq!(u.connection.keepalive_interval, Duration::from_secs(20));
    assert_eq!(u.connection.max_concurrent_streams, Some(100));
    let c = u.health_check.as_ref().unwrap();
    assert_eq!(
        c.kind,
        CheckKind::ModelReady {
            model: "simple".into(),
            version: String::new()
        }
    );
    assert_eq!((c.unhealthy_threshold, c.healthy_threshold), (3, 2));
    assert_eq!(u.outlier.consecutive_failures, 3);
    assert_eq!(u.outlier.base_ejection, Duration::from_secs(5));
    assert_eq!(u.outlier.max_ejection_percent, 30);
}

#[test]
fn upstream_pool_mistakes_are_named() {
    let e = errors(
        r#"
        [upstreams.a]
        endpoints = ["127.0.0.1:9001"]
        dns = "a:1"
        [upstreams.b]
        dns = "no-port"
        [upstreams.c]
        endpoints = ["127.0.0.1:9001"]
        dns_interval = "1s"
        [upstreams.c.health_check]
        kind = "model_ready"
        timeout = "10s"
        [upstreams.d]
        endpoints = ["127.0.0.1:9001"]
        [upstreams.d.health_check]
        kind = "ping"
        [upstreams.d.outlier]
        base_ejection = "1m"
        max_ejection = "10s"
        max_ejection_percent = 101
        "#,
    );
    let has = |path: &str, text: &str| {
        assert!(
            e.iter().any(|m| m.starts_with(path) && m.contains(text)),
            "{path}: {text} not in {e:#?}"
        );
    };
    has("upstreams.a.dns", "not both");
    has("upstreams.b.dns", "must be \"name:port\"");
    has("upstreams.c.dns_interval", "only with `dns`");
    has("upstreams.c.health_check.model", "is required");
    has(
        "upstreams.c.health_check.timeout",
        "not be longer than the interval",
    );
    has("upstreams.d.health_check.kind", "unknown check \"ping\"");
    has("upstreams.d.outlier.max_ejection", "not be shorter");
    has("upstreams.d.outlier.max_ejection_percent", "out of range");
}
