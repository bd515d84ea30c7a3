//! Routing: weighted splits, versions, flags, overrides and state kept across swaps.

use super::*;
use tonic::metadata::MetadataMap;

use crate::policy::{Flag, Policy, Store};

fn snapshot(text: &str) -> Arc<Snapshot> {
    let store = Store::new(
        Some(text.to_string()),
        crate::policy::Source::Startup(None),
        crate::policy::AuditLog::disabled(),
        Box::new(|_| Ok(())),
        Box::new(|_| {}),
    )
    .unwrap();
    store.current()
}

/// Fixed-seed ids, as random as a client's uuids (xorshift64*).
fn random_ids(n: usize) -> Vec<String> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            format!("{:016x}", x.wrapping_mul(0x2545_f491_4f6c_dd1d))
        })
        .collect()
}

const SPLIT: &str = "[upstreams.canary]\nendpoints = [\"127.0.0.1:1\"]\n[models.simple]\n\
    routes = [{ backend = \"embedded\", weight = 90 }, { backend = \"canary\", weight = 10 }]\n";

#[tokio::test]
async fn weighted_routes_split_within_two_points_and_an_id_keeps_its_route() {
    let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
    let routes = router.routes(&snapshot(SPLIT));
    let ids = random_ids(10_000);
    let mut canary = 0;
    for id in &ids {
        let b = routes.route(INFER, "simple", "", &Pick::by_id(id)).unwrap();
        let again = routes.route(INFER, "simple", "", &Pick::by_id(id)).unwrap();
        assert_eq!(b.name, again.name, "the same id takes the same route");
        canary += usize::from(&*b.name == "canary");
    }
    let share = canary as f64 / ids.len() as f64;
    assert!((share - 0.10).abs() <= 0.02, "canary share {share}");
    // Sequential ids spread as well as random ones.
    let seq = (0..10_000)
        .filter(|i| {
            let id = format!("req-{i}");
            &*routes
                .route(INFER, "simple", "", &Pick::by_id(&id))
                .unwrap()
                .name
                == "canary"
        })
        .count();
    assert!(
        (seq as f64 / 10_000.0 - 0.10).abs() <= 0.02,
        "sequential ids: {seq}"
    );
}

#[tokio::test]
async fn a_route_key_keeps_a_user_on_one_route_whatever_the_request_id() {
    let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
    let text = format!("{SPLIT}route_key = \"x-user-id\"\n");
    let routes = router.routes(&snapshot(&text));
    for user in random_ids(50) {
        let mut md = MetadataMap::new();
        md.insert("x-user-id", user.parse().unwrap());
        let first = routes
            .route(
                INFER,
                "simple",
                "",
                &Pick {
                    request_id: "a",
                    metadata: Some(&md),
                },
            )
            .unwrap();
        for id in random_ids(20) {
            let r = routes
                .route(
                    INFER,
                    "simple",
                    "",
                    &Pick {
                        request_id: &id,
                        metadata: Some(&md),
                    },
                )
                .unwrap();
            assert_eq!(r.name, first.name, "user {user} stays on its route");
        }
    }
}

#[tokio::test]
async fn a_pinned_version_takes_the_route_that_sends_it() {
    let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
    let routes = router.routes(&snapshot(
        "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n[models.simple]\n\
         routes = [{ backend = \"u\", version = \"1\", weight = 99 }, { backend = \"u\", version = \"2\", weight = 1 }]\n",
    ));
    for id in random_ids(200) {
        let r = routes
            .route(INFER, "simple", "2", &Pick::by_id(&id))
            .unwrap();
        assert_eq!(r.version.as_deref(), Some("2"));
        let r = routes
            .route(INFER, "simple", "1", &Pick::by_id(&id))
            .unwrap();
        assert_eq!(r.version.as_deref(), Some("1"));
    }
    let e = routes
        .route(INFER, "simple", "3", &Pick::by_id("r"))
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "model 'simple' has no version '3' (versions: 1, 2)"
    );
}

#[tokio::test]
async fn keel_route_picks_a_route_by_name_only_where_the_policy_allows() {
    let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
    let mut md = MetadataMap::new();
    md.insert(ROUTE_OVERRIDE, "canary".parse().unwrap());
    let ids = random_ids(100);
    let pick = |id| Pick {
        request_id: id,
        metadata: Some(&md),
    };
    let routes = router.routes(&snapshot(SPLIT));
    let ignored = ids
        .iter()
        .filter(|id| &*routes.route(INFER, "simple", "", &pick(id)).unwrap().name == "embedded")
        .count();
    assert!(ignored > 50, "without route_override the header is ignored");
    let allowed = format!("{SPLIT}route_override = true\n");
    let store = Store::with_default();
    store
        .apply(
            &allowed,
            crate::policy::Source::Admin {
                principal: "t".into(),
            },
            None,
        )
        .unwrap();
    let routes = router.routes(&store.current());
    for id in &ids {
        assert_eq!(
            &*routes.route(INFER, "simple", "", &pick(id)).unwrap().name,
            "canary"
        );
    }
    let mut blue = MetadataMap::new();
    blue.insert(ROUTE_OVERRIDE, "blue".parse().unwrap());
    let pick = Pick {
        request_id: "r",
        metadata: Some(&blue),
    };
    let e = routes.route(INFER, "simple", "", &pick).err().unwrap();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        e.to_string(),
        "keel-route \"blue\" is not a route of model 'simple' (routes: embedded, canary)"
    );
}

#[tokio::test]
async fn flags_switch_routes_and_models() {
    let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
    let store = Store::with_default();
    store
        .apply(
            "[flags]\ncolor = \"blue\"\nserve_iris = true\n[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n\
             [models.simple]\nroutes = [{ name = \"blue\", backend = \"embedded\", weight = 100, flag = \"color=blue\" }, \
             { name = \"green\", backend = \"u\", weight = 100, flag = \"color=green\" }]\n\
             [models.iris]\nbackend = \"embedded\"\nflag = \"serve_iris\"\n",
            crate::policy::Source::Admin { principal: "t".into() },
            None,
        )
        .unwrap();
    let name = |store: &Store, id: &str| {
        router
            .routes(&store.current())
            .route(INFER, "simple", "", &Pick::by_id(id))
            .unwrap()
            .name
    };
    let ids = random_ids(100);
    assert!(ids.iter().all(|id| &*name(&store, id) == "blue"));
    let before = store.current();
    store
        .set_flag("color", Flag::String("green".into()), "t", None)
        .unwrap();
    assert!(
        ids.iter().all(|id| &*name(&store, id) == "green"),
        "all at once"
    );
    let old = router
        .routes(&before)
        .route(INFER, "simple", "", &Pick::by_id("x"))
        .unwrap();
    assert_eq!(
        &*old.name, "blue",
        "the old snapshot still routes as it did"
    );

    assert!(
        router
            .routes(&store.current())
            .route(INFER, "iris", "", &Pick::by_id("x"))
            .is_ok()
    );
    store
        .set_flag("serve_iris", Flag::Bool(false), "t", None)
        .unwrap();
    let e = router
        .routes(&store.current())
        .route(INFER, "iris", "", &Pick::by_id("x"))
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(
        e.to_string(),
        "model 'iris' is switched off (flag condition serve_iris does not hold)"
    );
}

#[tokio::test]
async fn a_canary_under_analysis_is_dropped_from_it_once_rolled_back() {
    let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
    let store = Store::with_default();
    let text = "[models.simple]\nroutes = [{ backend = \"embedded\", weight = 50 }, \
                { name = \"v2\", backend = \"embedded\", weight = 50, canary = true }]\n\
                [models.simple.rollback]\nwindow = \"10s\"\n";
    store
        .apply(
            text,
            crate::policy::Source::Admin {
                principal: "t".into(),
            },
            None,
        )
        .unwrap();
    let routes = router.routes(&store.current());
    let sides: Vec<_> = random_ids(100)
        .iter()
        .map(|id| routes.route(INFER, "simple", "", &Pick::by_id(id)).unwrap())
        .map(|r| (r.name.clone(), r.canary.map(|(_, side)| side)))
        .collect();
    assert!(
        sides
            .iter()
            .any(|(n, s)| &**n == "v2" && *s == Some(canary::Side::Canary))
    );
    assert!(
        sides
            .iter()
            .any(|(n, s)| &**n == "embedded" && *s == Some(canary::Side::Baseline))
    );
    store.roll_back_canary("simple", "v2").unwrap();
    let routes = router.routes(&store.current());
    for id in random_ids(100) {
        let r = routes
            .route(INFER, "simple", "", &Pick::by_id(&id))
            .unwrap();
        assert_eq!(&*r.name, "embedded");
        assert!(
            r.canary.is_none(),
            "no analysis without a canary taking calls"
        );
    }
}

#[tokio::test]
async fn routes_are_compiled_once_per_revision_and_upstreams_survive_a_swap() {
    let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
    let a = snapshot(
        "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n[models.simple]\nbackend = \"u\"\n",
    );
    let r1 = router.routes(&a);
    assert!(
        Arc::ptr_eq(&r1, &router.routes(&a)),
        "cached for the revision"
    );
    let before = router.registry.lock().unwrap().upstreams["u"].1.clone();
    // A later revision with the same upstream settings keeps the same upstream.
    let store = Store::with_default();
    store
        .apply(
            "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n[models.simple]\nbackend = \"u\"\n[models.iris]\nbackend = \"embedded\"\n",
            crate::policy::Source::Admin { principal: "t".into() },
            None,
        )
        .unwrap();
    let r2 = router.routes(&store.current());
    assert!(!Arc::ptr_eq(&r1, &r2));
    assert_eq!(r2.models().collect::<Vec<_>>(), ["iris", "simple"]);
    let after = router.registry.lock().unwrap().upstreams["u"].1.clone();
    assert!(
        Arc::ptr_eq(&before, &after),
        "connections kept across the swap"
    );
}

#[tokio::test]
async fn versions_outside_the_list_are_not_found() {
    let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
    let snap = snapshot("[models.iris]\nbackend = \"embedded\"\nversions = [\"1\"]\n");
    let routes = router.routes(&snap);
    assert!(routes.route(INFER, "iris", "1", &Pick::by_id("r")).is_ok());
    assert!(routes.route(INFER, "iris", "", &Pick::by_id("r")).is_ok());
    let e = routes
        .route(INFER, "iris", "2", &Pick::by_id("r"))
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "model 'iris' has no version '2' (versions: 1)"
    );
    let e = routes
        .route(INFER, "simple", "", &Pick::by_id("r"))
        .err()
        .unwrap();
    assert_eq!(e.to_string(), "unknown model 'simple'");
}

const INFER: &str = "inference.GRPCInferenceService/ModelInfer";

#[tokio::test]
async fn breaker_state_survives_a_swap_unless_its_settings_change() {
    let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
    let store = Store::with_default();
    let admin = || crate::policy::Source::Admin {
        principal: "t".into(),
    };
    let route = |router: &Router, store: &Store| {
        router
            .routes(&store.current())
            .route(INFER, "iris", "", &Pick::by_id("r"))
            .unwrap()
    };
    let first = route(&router, &store);
    let breaker = first.target.breaker.clone().unwrap();
    store
        .apply("[defaults]\ntimeout = \"9s\"\n", admin(), None)
        .unwrap();
    let second = route(&router, &store);
    assert_eq!(second.settings.timeout, std::time::Duration::from_secs(9));
    assert!(
        Arc::ptr_eq(&breaker, second.target.breaker.as_ref().unwrap()),
        "kept"
    );
    assert!(Arc::ptr_eq(&first.limiter, &second.limiter), "kept");
    store
        .apply(
            "[defaults]\ntimeout = \"9s\"\n[defaults.breaker]\nconsecutive_failures = 3\n",
            admin(),
            None,
        )
        .unwrap();
    let third = route(&router, &store);
    assert!(
        !Arc::ptr_eq(&breaker, third.target.breaker.as_ref().unwrap()),
        "reset"
    );
    assert!(
        Arc::ptr_eq(&first.limiter, &third.limiter),
        "other state kept"
    );
    store
        .apply("[defaults.breaker]\nenabled = false\n", admin(), None)
        .unwrap();
    assert!(route(&router, &store).target.breaker.is_none());
}

#[test]
fn embedded_routes_must_name_embedded_models() {
    let p = Policy::parse("[models.resnet]\nbackend = \"embedded\"\n").unwrap();
    let e = crate::policy::builtin::check(&p, &*Embedded::new()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("models.resnet.backend: there is no embedded model named \"resnet\"")
    );
}

#[tokio::test]
async fn serve_stale_on_error_puts_a_cache_rung_before_the_static_answer() {
    let rungs = |text: &str| -> Vec<&'static str> {
        // A router per document: routers compile once per revision, and both are revision 1.
        let router = Router::new(Embedded::new(), 1 << 20, Metrics::new());
        let routes = router.routes(&snapshot(text));
        routes
            .ladder("simple")
            .iter()
            .map(|s| s.rung.tier())
            .collect()
    };
    let base = "[models.simple]\nbackend = \"embedded\"\n\
        fallback = [{ static = [{ name = \"OUTPUT0\", datatype = \"INT32\", shape = [1], data = [0] }] }]\n\
        [models.simple.cache]\n";
    assert_eq!(rungs(base), ["static"]);
    assert_eq!(
        rungs(&format!("{base}serve_stale_on_error = true\n")),
        ["cache", "static"]
    );
}
