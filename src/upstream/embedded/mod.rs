//! Built-in models, so Keel serves real inference with nothing else running.
//!
//! Triton's stateless quick-start models (`simple`, `simple_int8`, `simple_string`,
//! `simple_identity`) with the names, tensors and semantics of Triton's example model
//! repository, so Triton's example clients run unchanged; `identity` for payload tests; and
//! `iris`, a real classifier that later serves as a light fallback.
//!
//! Every model is checked against its contract ([`crate::model::validate`]) before it runs,
//! and its statistics are counted for ModelStatistics.

mod arith;
mod identity;
mod iris;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::FutureExt as _;
use tokio::time::Instant;

use super::{
    Attempt, Backend, BackendFuture, ConfigQuery, MetadataQuery, ReadyQuery, StatisticsQuery,
};
use crate::error::Error;
use crate::model::{
    BatchStats, ContentForm, Contract, InferRequest, InferResponse, InvalidRequest, ModelMetadata,
    ModelRef, ModelSpec, ModelStats, Tensor, validate,
};

/// The only version of every embedded model.
const VERSION: &str = "1";

/// Who answers, in the receipt (`keel-served-by`).
static EMBEDDED: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "embedded".into());

/// A model computed in process.
trait Model: Send + Sync {
    /// The model's contract.
    fn spec(&self) -> &ModelSpec;
    /// Computes every output from inputs that passed [`validate`].
    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InvalidRequest>;
}

/// Finds an input that [`validate`] guaranteed is present.
fn input<'a>(
    inputs: &'a [Tensor],
    spec: &ModelSpec,
    name: &str,
) -> Result<&'a Tensor, InvalidRequest> {
    inputs
        .iter()
        .find(|t| t.name() == name)
        .ok_or_else(|| InvalidRequest::MissingInput {
            model: spec.name.clone(),
            tensor: name.to_string(),
        })
}

struct Entry {
    model: Box<dyn Model>,
    stats: Mutex<ModelStats>,
}

/// The embedded backend: every built-in model, with its statistics.
pub struct Embedded {
    models: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Embedded {
    /// Every built-in model.
    pub fn new() -> Arc<Self> {
        let models: Vec<Box<dyn Model>> = vec![
            Box::new(arith::Arith::simple()),
            Box::new(arith::Arith::simple_int8()),
            Box::new(arith::Arith::simple_string()),
            Box::new(identity::Identity::simple_identity()),
            Box::new(identity::Identity::any()),
            Box::new(iris::Iris::new()),
        ];
        let models = models
            .into_iter()
            .map(|model| {
                let stats = ModelStats {
                    name: model.spec().name.clone(),
                    version: VERSION.to_string(),
                    ..ModelStats::default()
                };
                let entry = Entry {
                    model,
                    stats: Mutex::new(stats),
                };
                (entry.model.spec().name.clone(), entry)
            })
            .collect();
        Arc::new(Embedded { models })
    }

    /// Names of the built-in models, sorted.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Whether a built-in model of this name exists.
    pub fn has_model(&self, name: &str) -> bool {
        self.models.contains_key(name)
    }

    /// The contract of a built-in model, for checks made when a policy loads.
    pub fn contract(&self, name: &str) -> Option<Contract> {
        self.models
            .get(name)
            .map(|e| Contract::of_spec(e.model.spec()))
    }

    fn entry(&self, model: &ModelRef) -> Result<&Entry, Error> {
        let entry = self
            .models
            .get(&model.name)
            .ok_or_else(|| Error::ModelNotFound {
                model: model.name.clone(),
            })?;
        if !model.version.is_empty() && model.version != VERSION {
            return Err(Error::VersionNotFound {
                model: model.name.clone(),
                version: model.version.clone(),
                available: vec![VERSION.to_string()],
            });
        }
        Ok(entry)
    }

    /// Runs one inference synchronously and counts it.
    fn run(&self, req: &InferRequest) -> Result<InferResponse, Error> {
        let model_ref = ModelRef {
            name: req.model.clone(),
            version: req.version.clone(),
        };
        let entry = self.entry(&model_ref)?;
        let start = Instant::now();
        let result = execute(entry.model.as_ref(), req, start);
        let total = nanos(start.elapsed());
        let mut stats = entry.stats.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok((_, timing)) => timing.record(&mut stats, total),
            Err(_) => stats.fail.record(total),
        }
        drop(stats);
        result.map(|(resp, _)| resp)
    }
}

/// Where one successful execution spent its time, in nanoseconds.
struct Timing {
    batch: u64,
    input: u64,
    infer: u64,
    output: u64,
}

impl Timing {
    /// Adds this execution (which took `total` ns in all) to a model's statistics.
    fn record(&self, stats: &mut ModelStats, total: u64) {
        stats.success.record(total);
        stats.inference_count += self.batch;
        stats.execution_count += 1;
        stats.compute_input.record(self.input);
        stats.compute_infer.record(self.infer);
        stats.compute_output.record(self.output);
        stats.last_inference_ms = now_ms();
        // Batch sizes stay sorted, as Triton reports them.
        let at = stats.batches.partition_point(|b| b.batch_size < self.batch);
        if stats.batches.get(at).map(|b| b.batch_size) != Some(self.batch) {
            stats.batches.insert(
                at,
                BatchStats {
                    batch_size: self.batch,
                    ..BatchStats::default()
                },
            );
        }
        let b = &mut stats.batches[at];
        b.compute_input.record(self.input);
        b.compute_infer.record(self.infer);
        b.compute_output.record(self.output);
    }
}

fn execute(
    model: &dyn Model,
    req: &InferRequest,
    start: Instant,
) -> Result<(InferResponse, Timing), Error> {
    let spec = model.spec();
    let batch = validate(req, spec)?;
    let checked = Instant::now();
    let mut outputs = model.execute(&req.inputs)?;
    let computed = Instant::now();
    if !req.outputs.is_empty() {
        let mut chosen = Vec::with_capacity(req.outputs.len());
        for want in &req.outputs {
            let Some(i) = outputs.iter().position(|t| t.name() == want.name) else {
                return Err(InvalidRequest::UnknownOutput {
                    model: spec.name.clone(),
                    output: want.name.clone(),
                    expected: outputs.iter().map(|t| t.name().to_string()).collect(),
                }
                .into());
            };
            chosen.push(outputs.swap_remove(i));
        }
        outputs = chosen;
    }
    let resp = InferResponse {
        model: spec.name.clone(),
        version: VERSION.to_string(),
        id: req.id.clone(),
        parameters: Default::default(),
        outputs,
        // Raw whatever the request's form, as Triton answers.
        form: ContentForm::Raw,
        wire: Default::default(),
    };
    let done = Instant::now();
    Ok((
        resp,
        Timing {
            batch,
            input: nanos(checked - start),
            infer: nanos(computed - checked),
            output: nanos(done - computed),
        },
    ))
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Backend for Embedded {
    fn infer(&self, attempt: Attempt<InferRequest>) -> BackendFuture<InferResponse> {
        attempt.receipt.served(EMBEDDED.clone(), None);
        // The models are microseconds of arithmetic: computing inline beats a task hop.
        futures::future::ready(self.run(&attempt.body)).boxed()
    }

    fn model_ready(&self, attempt: Attempt<ReadyQuery>) -> BackendFuture<bool> {
        futures::future::ready(Ok(self.entry(&attempt.body.0).is_ok())).boxed()
    }

    fn model_metadata(&self, attempt: Attempt<MetadataQuery>) -> BackendFuture<ModelMetadata> {
        let out = self
            .entry(&attempt.body.0)
            .map(|e| e.model.spec().metadata());
        futures::future::ready(out).boxed()
    }

    fn model_config(&self, attempt: Attempt<ConfigQuery>) -> BackendFuture<ModelSpec> {
        let out = self.entry(&attempt.body.0).map(|e| e.model.spec().clone());
        futures::future::ready(out).boxed()
    }

    fn contract(&self, attempt: Attempt<MetadataQuery>) -> BackendFuture<Contract> {
        let out = self
            .entry(&attempt.body.0)
            .map(|e| Contract::of_spec(e.model.spec()));
        futures::future::ready(out).boxed()
    }

    fn model_statistics(
        &self,
        attempt: Attempt<StatisticsQuery>,
    ) -> BackendFuture<Vec<ModelStats>> {
        let out = self
            .entry(&attempt.body.0)
            .map(|e| vec![e.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()]);
        futures::future::ready(out).boxed()
    }

    fn describe(&self) -> String {
        "embedded".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContentForm, Parameters};

    fn request(model: &str, inputs: Vec<Tensor>) -> InferRequest {
        InferRequest {
            model: model.into(),
            version: String::new(),
            id: "r1".into(),
            parameters: Parameters::new(),
            inputs,
            outputs: vec![],
            form: ContentForm::Raw,
            wire: Default::default(),
        }
    }

    #[test]
    fn statistics_count_successes_failures_and_batches() {
        let e = Embedded::new();
        let a: Vec<i32> = (0..32).collect();
        let ok = request(
            "simple",
            vec![
                Tensor::from_values("INPUT0", vec![2, 16], &a).unwrap(),
                Tensor::from_values("INPUT1", vec![2, 16], &a).unwrap(),
            ],
        );
        e.run(&ok).unwrap();
        e.run(&ok).unwrap();
        assert!(e.run(&request("simple", vec![])).is_err());
        let s = e.models["simple"].stats.lock().unwrap().clone();
        assert_eq!(s.success.count, 2);
        assert_eq!(s.fail.count, 1);
        assert_eq!(s.inference_count, 4, "two requests of batch 2");
        assert_eq!(s.execution_count, 2);
        assert_eq!(s.batches.len(), 1);
        assert_eq!(s.batches[0].batch_size, 2);
        assert_eq!(s.batches[0].compute_infer.count, 2);
        assert!(s.last_inference_ms > 0);
    }

    #[test]
    fn unknown_models_and_versions_are_named() {
        let e = Embedded::new();
        assert_eq!(
            e.run(&request("nope", vec![])).unwrap_err().to_string(),
            "unknown model 'nope'"
        );
        let mut r = request("iris", vec![]);
        r.version = "7".into();
        assert_eq!(
            e.run(&r).unwrap_err().to_string(),
            "model 'iris' has no version '7' (versions: 1)"
        );
    }

    #[test]
    fn requested_outputs_come_back_in_the_requested_order() {
        let e = Embedded::new();
        let a = [1i32; 16];
        let mut r = request(
            "simple",
            vec![
                Tensor::from_values("INPUT0", vec![1, 16], &a).unwrap(),
                Tensor::from_values("INPUT1", vec![1, 16], &a).unwrap(),
            ],
        );
        for name in ["OUTPUT1", "OUTPUT0"] {
            r.outputs.push(crate::model::RequestedOutput {
                name: name.into(),
                parameters: Parameters::new(),
            });
        }
        let resp = e.run(&r).unwrap();
        let names: Vec<&str> = resp.outputs.iter().map(Tensor::name).collect();
        assert_eq!(names, ["OUTPUT1", "OUTPUT0"]);
        assert_eq!(resp.outputs[0].values::<i32>().unwrap(), vec![0; 16]);
        assert_eq!(resp.outputs[1].values::<i32>().unwrap(), vec![2; 16]);
    }
}
