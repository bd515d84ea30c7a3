//! Turns away an inference request that breaks its model's contract or the policy's size
//! limits, before it takes a slot, an attempt or a breaker's count.

use std::borrow::Cow;

use tower::Layer;

use super::passthrough::{Gate, Gated, Next, Passthrough, take};
use crate::call::Call;
use crate::contract::Lookup;
use crate::error::Error;
use crate::model::{Contract, InferRequest, RequestLimits, check};
use crate::upstream::Operation;

/// Applies [`ValidateService`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ValidateLayer;

impl<S> Layer<S> for ValidateLayer {
    type Service = ValidateService<S>;
    fn layer(&self, inner: S) -> ValidateService<S> {
        Gated::new(inner, *self)
    }
}

/// Checks each inference request against its route's contract; other calls pass.
pub type ValidateService<S> = Gated<S, ValidateLayer>;

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

impl<Op: Operation> Gate<Op> for ValidateLayer {
    fn gate<S: Next<Op>>(
        &self,
        call: Call<Op>,
        inner: &mut S,
    ) -> Passthrough<S::Future, S::Response> {
        let Some(req) = call.body.checked() else {
            return Passthrough::inner(inner.call(call));
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
                    Ok(()) => return Passthrough::inner(inner.call(call)),
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
        let mut inner = take(inner);
        Passthrough::own(async move {
            let contract = fetch.await;
            if let Some(req) = call.body.checked() {
                verdict(&call, req, contract.as_deref())?;
            }
            inner.call(call).await
        })
    }
}
