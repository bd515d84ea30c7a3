//! Echo models: `simple_identity` (Triton's BYTES `[-1]` echo, `OUTPUT0 = INPUT0`) and
//! `identity`, which answers every input tensor, whatever its name, type and shape, as an
//! output of the same name (for payload tests and benchmarks).

use super::{Model, input};
use crate::model::{DataType, InvalidRequest, ModelSpec, Tensor, TensorSpec};

/// An echo model.
pub(super) struct Identity {
    spec: ModelSpec,
}

impl Identity {
    /// Triton's `simple_identity`.
    pub(super) fn simple_identity() -> Self {
        Identity {
            spec: ModelSpec {
                name: "simple_identity".to_string(),
                versions: vec![super::VERSION.to_string()],
                platform: "keel_embedded".to_string(),
                backend: "keel".to_string(),
                max_batch_size: 8,
                inputs: vec![TensorSpec::new("INPUT0", DataType::Bytes, &[-1])],
                outputs: vec![TensorSpec::new("OUTPUT0", DataType::Bytes, &[-1])],
                any_inputs: false,
            },
        }
    }

    /// `identity`: any inputs, echoed under their own names. Its metadata lists no tensors,
    /// because it takes any.
    pub(super) fn any() -> Self {
        Identity {
            spec: ModelSpec {
                name: "identity".to_string(),
                versions: vec![super::VERSION.to_string()],
                platform: "keel_embedded".to_string(),
                backend: "keel".to_string(),
                max_batch_size: 0,
                inputs: vec![],
                outputs: vec![],
                any_inputs: true,
            },
        }
    }
}

impl Model for Identity {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InvalidRequest> {
        if self.spec.any_inputs {
            // Cloning a tensor clones a reference to its bytes, not the bytes.
            return Ok(inputs.to_vec());
        }
        let t = input(inputs, &self.spec, "INPUT0")?;
        Ok(vec![t.clone().with_name("OUTPUT0")])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_echoes_every_input_without_copying() {
        let a = Tensor::from_values("a", vec![2], &[1.5f32, 2.5]).unwrap();
        let b = Tensor::from_byte_strings("b", vec![1], ["x"]).unwrap();
        let out = Identity::any().execute(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(out, vec![a.clone(), b]);
        assert_eq!(out[0].data().as_ptr(), a.data().as_ptr(), "same buffer");
    }

    #[test]
    fn simple_identity_renames_input0_to_output0() {
        let a = Tensor::from_byte_strings("INPUT0", vec![1, 2], ["p", "q"]).unwrap();
        let out = Identity::simple_identity().execute(&[a]).unwrap();
        assert_eq!(out[0].name(), "OUTPUT0");
        assert_eq!(out[0].byte_strings().unwrap(), vec!["p", "q"]);
    }
}
