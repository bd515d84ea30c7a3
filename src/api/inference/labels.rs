//! The labels of a ModelInfer answer ([`Labels`], decided by the dispatch) written where
//! clients read them: the response parameters and the trailing metadata, with the receipt
//! of the call that answered and what the upstream sent with it.

use http::{HeaderMap, HeaderValue};
use tonic::{Response, Status};

use super::Edge;
use crate::api::receipt;
use crate::call::CallContext;
use crate::dispatch::{Labels, Served};
use crate::error::Error;
use crate::model::InferResponse;

/// A labelled answer, with the receipt of the call that produced it (if any: a cache or
/// static answer has none of its own).
pub(in crate::api) fn labelled(
    edge: &Edge,
    served: Served,
) -> Result<Response<InferResponse>, Status> {
    let Served {
        mut resp,
        labels,
        ctx,
    } = served;
    let ctx: Option<&CallContext> = ctx.as_deref();
    let served_by = labels.to_parameters(&mut resp);
    // The call checked the answer it got left room for its labels (`LABEL_ROOM`): this
    // only holds that bound to account.
    let limit = edge.snapshot.policy.server.max_message_size;
    if let Some(len) = crate::pb::infer_response_len(&resp, limit) {
        let e = Error::AnswerTooLarge {
            upstream: ctx.map_or_else(
                || labels.tier.to_string(),
                |c| c.route.target.upstream.to_string(),
            ),
            detail: format!("{len} bytes with Keel's labels; the limit is {limit}"),
        };
        tracing::warn!(request_id = %edge.ctx.request_id, tier = labels.tier, error = %e,
            "answer refused: its labels took it past server.max_message_size");
        return Err(edge.status(&e, ctx));
    }
    // What the upstream sent with its answer goes on with it, under Keel's own.
    let wire = resp.wire.clone();
    let mut out = edge.reply(resp);
    let mut trailers = HeaderMap::with_capacity(16);
    if let Some((headers, upstream)) = wire.metadata() {
        crate::api::passed::add_headers(out.metadata_mut(), headers);
        crate::api::passed::filter_into(&mut trailers, upstream);
    }
    if let Some(ctx) = ctx {
        receipt::write_to(&mut trailers, ctx);
    }
    to_trailers(&labels, &mut trailers, &served_by);
    // The revision goes in the trailers too, for clients that read outcomes there.
    trailers.insert(
        receipt::names::POLICY_REVISION,
        HeaderValue::from(edge.snapshot.revision),
    );
    out.extensions_mut().insert(receipt::Trailing(trailers));
    Ok(out)
}

/// Writes an answer's labels into its trailers.
fn to_trailers(labels: &Labels, h: &mut HeaderMap, served_by: &str) {
    use receipt::names;
    let degraded = if labels.degraded { "true" } else { "false" };
    h.insert(names::DEGRADED, HeaderValue::from_static(degraded));
    h.insert(names::TIER, HeaderValue::from_static(labels.tier));
    if let Ok(v) = HeaderValue::from_str(served_by) {
        h.insert(names::SERVED_MODEL, v);
    }
    if let Some(reason) = labels.reason {
        h.insert(
            receipt::DEGRADED_REASON,
            HeaderValue::from_static(reason.as_str()),
        );
    }
    if let Some(ms) = labels.stale_ms() {
        h.insert(receipt::STALE_MS, HeaderValue::from(ms));
    }
    if let Some(story) = &labels.story {
        h.insert(
            receipt::PRIMARY_ATTEMPTS,
            HeaderValue::from(story.primary_attempts),
        );
        h.insert(
            receipt::PRIMARY_ERROR,
            HeaderValue::from_static(story.primary_error),
        );
        h.insert(
            receipt::PRIMARY_CODE,
            HeaderValue::from_static(story.primary_code),
        );
        if let Some(v) = story
            .rungs_failed()
            .and_then(|r| HeaderValue::from_str(&r).ok())
        {
            h.insert(receipt::RUNGS_FAILED, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prost::Message as _;

    use crate::dispatch::{LABEL_ROOM, Labels, Story};
    use crate::model::InferResponse;
    use crate::policy::Trigger;

    fn encoded(resp: &InferResponse) -> usize {
        crate::pb::infer_response_to_pb(resp.clone()).encoded_len()
    }

    #[test]
    fn the_labels_at_their_longest_fit_in_their_room() {
        let mut resp = InferResponse {
            model: "m".repeat(500),
            version: "v".repeat(500),
            id: String::new(),
            parameters: Default::default(),
            outputs: Vec::new(),
            form: crate::model::ContentForm::Raw,
            wire: Default::default(),
        };
        let bare = encoded(&resp);
        let story = Story {
            primary_attempts: u32::MAX,
            primary_error: "local_rejection",
            primary_code: "FAILED_PRECONDITION",
            rungs_failed: vec!["a_long_fallback_tier"; 40],
        };
        let labels = Labels {
            tier: "a_long_fallback_tier_name_of_32b",
            degraded: true,
            reason: Some(Trigger::BudgetExhausted),
            stale: Some(Duration::MAX),
            story: Some(story),
        };
        labels.to_parameters(&mut resp);
        let added = encoded(&resp) - bare;
        assert!(added <= LABEL_ROOM, "the labels took {added} bytes");
        assert!(added > LABEL_ROOM / 2, "{added}: the room is far too large");
    }
}
