//! Model contracts (what a model accepts and returns) and the statistics kept for them.

use super::DataType;

/// A tensor in a model's contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DataType,
    /// Dimensions; -1 is any size. In a [`ModelSpec`] of a batching model the batch
    /// dimension is left out (as in Triton's `config.pbtxt`); in [`ModelMetadata`] it is
    /// included as -1.
    pub dims: Vec<i64>,
}

impl TensorSpec {
    /// A tensor spec.
    pub fn new(name: &str, dtype: DataType, dims: &[i64]) -> Self {
        TensorSpec {
            name: name.to_string(),
            dtype,
            dims: dims.to_vec(),
        }
    }
}

/// A model's configuration: identity, batching and tensor contract (Triton's `ModelConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Model name.
    pub name: String,
    /// Versions served, newest last.
    pub versions: Vec<String>,
    /// Platform label (`onnxruntime_onnx`, `keel_embedded`).
    pub platform: String,
    /// Backend label.
    pub backend: String,
    /// Largest batch; 0 means the model does not batch and shapes are given in full.
    pub max_batch_size: u32,
    /// Inputs.
    pub inputs: Vec<TensorSpec>,
    /// Outputs.
    pub outputs: Vec<TensorSpec>,
    /// Accepts any inputs (the `identity` model), so the input list is not enforced.
    pub any_inputs: bool,
}

impl ModelSpec {
    /// The OIP metadata view: shapes include the batch dimension as -1 when batching.
    pub fn metadata(&self) -> ModelMetadata {
        let full = |t: &TensorSpec| {
            let mut dims = Vec::with_capacity(t.dims.len() + 1);
            if self.max_batch_size > 0 {
                dims.push(-1);
            }
            dims.extend_from_slice(&t.dims);
            TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                dims,
            }
        };
        ModelMetadata {
            name: self.name.clone(),
            versions: self.versions.clone(),
            platform: self.platform.clone(),
            inputs: self.inputs.iter().map(full).collect(),
            outputs: self.outputs.iter().map(full).collect(),
        }
    }
}

/// A model's OIP metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelMetadata {
    /// Model name.
    pub name: String,
    /// Versions served.
    pub versions: Vec<String>,
    /// Platform label.
    pub platform: String,
    /// Inputs with full shapes.
    pub inputs: Vec<TensorSpec>,
    /// Outputs with full shapes.
    pub outputs: Vec<TensorSpec>,
}

/// A cumulative count and duration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatDuration {
    /// How many times.
    pub count: u64,
    /// Total nanoseconds.
    pub ns: u64,
}

impl StatDuration {
    /// Adds one occurrence that took `ns` nanoseconds.
    pub fn record(&mut self, ns: u64) {
        self.count += 1;
        self.ns = self.ns.saturating_add(ns);
    }
}

/// Statistics of executions with one batch size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// The batch size.
    pub batch_size: u64,
    /// Preparing inputs.
    pub compute_input: StatDuration,
    /// Running the model.
    pub compute_infer: StatDuration,
    /// Producing outputs.
    pub compute_output: StatDuration,
}

/// Statistics of one model version (the fields Triton's `ModelStatistics` reports).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Milliseconds since the Unix epoch of the last inference; 0 if none.
    pub last_inference_ms: u64,
    /// Inferences, counting each element of a batch.
    pub inference_count: u64,
    /// Model executions.
    pub execution_count: u64,
    /// Successful requests and their total time.
    pub success: StatDuration,
    /// Failed requests and their total time.
    pub fail: StatDuration,
    /// Time spent queued.
    pub queue: StatDuration,
    /// Preparing inputs.
    pub compute_input: StatDuration,
    /// Running the model.
    pub compute_infer: StatDuration,
    /// Producing outputs.
    pub compute_output: StatDuration,
    /// Per batch size, ordered by batch size.
    pub batches: Vec<BatchStats>,
}
