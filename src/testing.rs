//! Constructors for unit tests, integration tests and benchmarks: pieces that a server
//! would build, made outside any server. Nothing on the request path uses them.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::call::CallContext;
use crate::dispatch::{Cap, EdgeContext};

/// A call's context under the embedded default policy: `model` routed to the embedded
/// backend, with `budget` from now (whatever the policy's timeouts say).
pub fn call_context(model: &str, budget: Duration) -> Result<Arc<CallContext>, crate::Error> {
    let snapshot = crate::policy::Store::with_default().current();
    let router = crate::route::Router::new(
        crate::upstream::embedded::Embedded::new(),
        1 << 20,
        crate::observe::Metrics::new(),
    );
    let route = router.routes(&snapshot).route(
        crate::policy::METHODS[0],
        model,
        "",
        &crate::route::Pick::by_id("standalone"),
    )?;
    let edge = EdgeContext {
        request_id: "standalone".into(),
        client_deadline: None,
        metadata: Arc::default(),
    };
    let mut ctx = edge.call(&snapshot, route, None, Cap::default());
    ctx.deadline = Instant::now() + budget;
    ctx.budget = budget;
    Ok(Arc::new(ctx))
}
