//! Turns away an inference request that breaks its model's contract or the policy's size
//! limits, before it takes a slot, an attempt or a breaker's count.

use std::borrow::Cow;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::Lookup;
use crate::call::Call;
use crate::error::Error;
use crate::model::{Contract, InferRequest, RequestLimits, check};
use crate::passthrough::Passthrough;
use crate::upstream::Operation;

/// Applies [`ValidateService`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ValidateLayer;

impl<S> Layer<S> for ValidateLayer {
    type Service = ValidateService<S>;
    fn layer(&self, inner: S) -> ValidateService<S> {
        ValidateService { inner }
    }
}

/// Checks each inference request against its route's contract; other calls pass.
#[derive(Clone, Debug)]
pub struct ValidateService<S> {
    inner: S,
}

/// Checks `req` under the call's limits against `contract`, or against the limits alone
/// when the contract is unknown.
fn verdict<Op>(
    call: &Call<Op>,
    req: &InferRequest,
    contract: Option<&Contract>,
) -> Result<(), Error> {
    let settings = &call.ctx.route.settings;
    let limits = RequestLimits {
        max_bytes: settings.limits.max_request_bytes,
        max_elements: settings.limits.max_elements,
        max_inputs: settings.limits.max_inputs as usize,
        max_outputs: settings.limits.max_outputs as usize,
    };
    let contract = match contract {
        // `strict_outputs` takes a forwarded model's listed outputs as complete: the copy
        // is made only for models that opted in.
        Some(c) if settings.strict_outputs && !c.outputs_complete => Cow::Owned(Contract {
            outputs_complete: true,
            ..c.clone()
        }),
        Some(c) => Cow::Borrowed(c),
        None => Cow::Owned(Contract {
            model: req.model.clone(),
            inputs: vec![],
            outputs: vec![],
            max_batch_size: None,
            any_inputs: true,
            outputs_complete: false,
        }),
    };
    check(req, &contract, limits).map(drop).map_err(Error::from)
}

impl<S, Op> Service<Call<Op>> for ValidateService<S>
where
    S: Service<Call<Op>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    Op: Operation,
{
    type Response = S::Response;
    type Error = Error;
    type Future = Passthrough<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call<Op>) -> Self::Future {
        let Some(req) = call.body.checked() else {
            return Passthrough::inner(self.inner.call(call));
        };
        let contracts = &call.ctx.route.target.contracts;
        let fetch = match contracts.lookup(&req.version, call.ctx.deadline) {
            Lookup::Fetch(fetch) => fetch,
            found => {
                let known = match found {
                    Lookup::Known(c) => Some(c),
                    _ => None,
                };
                let refused = match verdict(&call, req, known.as_deref()) {
                    Ok(()) => return Passthrough::inner(self.inner.call(call)),
                    Err(e) => e,
                };
                // The model may have changed upstream since its contract was fetched: the
                // refusal stands only against a fresh contract.
                let recheck = match (&known, &refused) {
                    (Some(_), Error::InvalidRequest(_)) => {
                        contracts.recheck(&req.version, call.ctx.deadline)
                    }
                    _ => None,
                };
                match recheck {
                    Some(fetch) => fetch,
                    None => return Passthrough::own(std::future::ready(Err(refused))),
                }
            }
        };
        // The service that was polled ready goes with the call; a clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Passthrough::own(async move {
            let contract = fetch.await;
            if let Some(req) = call.body.checked() {
                verdict(&call, req, contract.as_deref())?;
            }
            inner.call(call).await
        })
    }
}
