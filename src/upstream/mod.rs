//! The backends that answer calls: the embedded models and OIP gRPC upstreams.
//!
//! Every backend implements [`Backend`]; an [`Operation`] is one of the per-model calls a
//! backend answers, so a single generic tower stack can carry each of them.

mod attempt;
pub mod embedded;
pub mod forward;
pub mod grpc;
pub mod pool;
pub mod sequence;

use std::sync::Arc;

use futures::future::BoxFuture;

pub use attempt::{Attempt, Timing};

use crate::error::Error;
use crate::model::{
    Contract, InferRequest, InferResponse, ModelMetadata, ModelRef, ModelSpec, ModelStats,
};

/// The result of a backend call.
pub type BackendFuture<T> = BoxFuture<'static, Result<T, Error>>;

/// Something that answers per-model calls. Each call is one [`Attempt`]: what it sends, the
/// time it has and where to write who answered, with a shared body, so retries copy nothing.
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// Runs inference.
    fn infer(&self, attempt: Attempt<InferRequest>) -> BackendFuture<InferResponse>;
    /// Whether the model (version) is ready.
    fn model_ready(&self, attempt: Attempt<ReadyQuery>) -> BackendFuture<bool>;
    /// The model's OIP metadata.
    fn model_metadata(&self, attempt: Attempt<MetadataQuery>) -> BackendFuture<ModelMetadata>;
    /// The model's configuration.
    fn model_config(&self, attempt: Attempt<ConfigQuery>) -> BackendFuture<ModelSpec>;
    /// The model's statistics, one entry per version.
    fn model_statistics(&self, attempt: Attempt<StatisticsQuery>)
    -> BackendFuture<Vec<ModelStats>>;
    /// A short description for logs and the startup line (`embedded`, `upstream triton`).
    fn describe(&self) -> String;
    /// Whether some endpoint may take calls now (not every endpoint ejected or failing checks).
    fn healthy(&self) -> bool {
        true
    }
    /// The model's contract, to check requests against before they are sent: its OIP
    /// metadata, with `max_batch_size` from its configuration where the backend has one
    /// (Triton does; a KServe runtime without ModelConfig leaves batching unknown).
    fn contract(&self, attempt: Attempt<MetadataQuery>) -> BackendFuture<Contract> {
        let query = Arc::new(ConfigQuery(attempt.body.0.clone()));
        let config = self.model_config(attempt.with_body(query));
        let metadata = self.model_metadata(attempt);
        Box::pin(async move {
            let (metadata, config) = futures::future::join(metadata, config).await;
            let batch = config.ok().map(|c| c.max_batch_size);
            Ok(Contract::of_metadata(metadata?, batch))
        })
    }
}

/// About how long a request's summary in its log line grows before the rest is counted.
const SUMMARY_BYTES: usize = 512;

/// One kind of per-model call, sent to the backend that serves its model.
pub trait Operation: Send + Sync + 'static {
    /// What the backend answers.
    type Response: Send + 'static;
    /// The model the call is for.
    fn model(&self) -> &str;
    /// The model version asked for; empty lets the backend choose.
    fn version(&self) -> &str;
    /// The same call for another version of the model (a route that sends its own).
    fn at_version(&self, version: &str) -> Self
    where
        Self: Sized;
    /// Sends the call to `backend`.
    fn send(backend: &dyn Backend, attempt: Attempt<Self>) -> BackendFuture<Self::Response>
    where
        Self: Sized;
    /// Input names, types and shapes for the request log (never tensor contents).
    fn summary(&self) -> String {
        String::new()
    }
    /// Bytes of tensor data sent.
    fn payload_bytes(&self) -> usize {
        0
    }
    /// Whether the call belongs to a sequence of a stateful model, and so must reach the
    /// same endpoint as the sequence's other calls, once: never retried elsewhere, hedged
    /// or answered by a fallback.
    fn pinned(&self) -> bool {
        false
    }
    /// The request to check against the model's contract before it is sent; only an
    /// inference request has one.
    fn checked(&self) -> Option<&InferRequest> {
        None
    }
    /// The encoded length of `answer` as the edge sends it, if it exceeds `limit`; `None`
    /// when within it. Only an inference answer (tensors) can grow so large.
    fn answer_over(_answer: &Self::Response, _limit: usize) -> Option<usize> {
        None
    }
}

impl Operation for InferRequest {
    type Response = InferResponse;
    fn model(&self) -> &str {
        &self.model
    }
    fn version(&self) -> &str {
        &self.version
    }
    fn at_version(&self, version: &str) -> Self {
        InferRequest {
            version: version.to_string(),
            ..self.clone()
        }
    }
    fn send(backend: &dyn Backend, attempt: Attempt<Self>) -> BackendFuture<InferResponse> {
        backend.infer(attempt)
    }
    fn summary(&self) -> String {
        use std::fmt::Write as _;
        // Bounded, as every log line is: the first inputs, then how many more.
        let mut out = String::new();
        for (i, t) in self.inputs.iter().enumerate() {
            if out.len() >= SUMMARY_BYTES {
                let _ = write!(out, ",+{} more", self.inputs.len() - i);
                break;
            }
            if i > 0 {
                out.push(',');
            }
            let name = crate::model::clip(t.name(), 64);
            let _ = write!(out, "{name}:{}{:?}", t.dtype(), t.shape());
        }
        out
    }
    fn payload_bytes(&self) -> usize {
        self.inputs.iter().map(|t| t.data().len()).sum()
    }
    fn checked(&self) -> Option<&InferRequest> {
        Some(self)
    }
    fn answer_over(answer: &InferResponse, limit: usize) -> Option<usize> {
        crate::pb::infer_response_len(answer, limit)
    }
    fn pinned(&self) -> bool {
        sequence::of(self).is_some()
    }
}

macro_rules! model_query {
    ($(#[$doc:meta] $name:ident => $method:ident -> $resp:ty;)*) => {$(
        #[$doc]
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name(pub ModelRef);

        impl Operation for $name {
            type Response = $resp;
            fn model(&self) -> &str {
                &self.0.name
            }
            fn version(&self) -> &str {
                &self.0.version
            }
            fn at_version(&self, version: &str) -> Self {
                $name(ModelRef { name: self.0.name.clone(), version: version.to_string() })
            }
            fn send(backend: &dyn Backend, attempt: Attempt<Self>) -> BackendFuture<$resp> {
                backend.$method(attempt)
            }
        }
    )*};
}

model_query! {
    /// ModelReady.
    ReadyQuery => model_ready -> bool;
    /// ModelMetadata.
    MetadataQuery => model_metadata -> ModelMetadata;
    /// ModelConfig.
    ConfigQuery => model_config -> ModelSpec;
    /// ModelStatistics for one model.
    StatisticsQuery => model_statistics -> Vec<ModelStats>;
}
