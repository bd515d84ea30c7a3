//! `iris`: a logistic-regression classifier of iris flowers, the light model that later
//! stands in for heavier ones.
//!
//! Input `features` FP32 `[N, 4]` (sepal length, sepal width, petal length, petal width, in
//! cm); outputs `probabilities` FP32 `[N, 3]` (setosa, versicolor, virginica) and `label`
//! INT64 `[N]`, the most probable class. The weights in `iris.toml` were trained on Fisher's
//! iris data set by `tools/train_iris.py`, which says how to reproduce them.

use serde::Deserialize;

use super::{Model, input};
use crate::model::{DataType, InvalidRequest, ModelSpec, Tensor, TensorSpec};

const WEIGHTS: &str = include_str!("iris.toml");

#[derive(Deserialize)]
struct Weights {
    #[allow(dead_code)]
    features: Vec<String>,
    #[allow(dead_code)]
    classes: Vec<String>,
    weights: [[f64; 4]; 3],
    bias: [f64; 3],
}

/// The classifier.
pub(super) struct Iris {
    spec: ModelSpec,
    weights: Weights,
}

impl Iris {
    pub(super) fn new() -> Self {
        // Compiled in and parsed by a unit test, so this cannot fail at run time.
        let weights: Weights = toml::from_str(WEIGHTS).expect("iris.toml is valid");
        Iris {
            spec: ModelSpec {
                name: "iris".to_string(),
                versions: vec![super::VERSION.to_string()],
                platform: "keel_embedded".to_string(),
                backend: "keel".to_string(),
                max_batch_size: 0,
                inputs: vec![TensorSpec::new("features", DataType::Fp32, &[-1, 4])],
                outputs: vec![
                    TensorSpec::new("probabilities", DataType::Fp32, &[-1, 3]),
                    TensorSpec::new("label", DataType::Int64, &[-1]),
                ],
                any_inputs: false,
            },
            weights,
        }
    }

    /// Class probabilities for one sample: softmax(W x + b).
    fn predict(&self, x: &[f32]) -> [f64; 3] {
        let mut z = [0f64; 3];
        for (k, zk) in z.iter_mut().enumerate() {
            *zk = self.weights.bias[k]
                + self.weights.weights[k]
                    .iter()
                    .zip(x)
                    .map(|(w, &xi)| w * f64::from(xi))
                    .sum::<f64>();
        }
        // Subtract the maximum first so exp never overflows.
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exp = z.map(|v| (v - max).exp());
        let total: f64 = exp.iter().sum();
        exp.map(|e| e / total)
    }
}

impl Model for Iris {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InvalidRequest> {
        let features = input(inputs, &self.spec, "features")?;
        let as_tensor_error = |problem| InvalidRequest::Tensor {
            tensor: features.name().to_string(),
            problem,
        };
        let x = features.values::<f32>().map_err(as_tensor_error)?;
        let rows = features.shape().first().copied().unwrap_or(0);
        let mut probabilities = Vec::with_capacity(x.len() / 4 * 3);
        let mut labels = Vec::with_capacity(x.len() / 4);
        for (i, sample) in x.chunks_exact(4).enumerate() {
            if let Some(j) = sample.iter().position(|v| !v.is_finite()) {
                return Err(InvalidRequest::BadElement {
                    tensor: features.name().to_string(),
                    index: i * 4 + j,
                    reason: format!("is {}, not a finite number", sample[j]),
                });
            }
            let p = self.predict(sample);
            let label = (0..3).fold(0, |best, k| if p[k] > p[best] { k } else { best });
            probabilities.extend(p.map(|v| v as f32));
            labels.push(label as i64);
        }
        Ok(vec![
            Tensor::from_values("probabilities", vec![rows, 3], &probabilities)
                .map_err(as_tensor_error)?,
            Tensor::from_values("label", vec![rows], &labels).map_err(as_tensor_error)?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(samples: &[[f32; 4]]) -> (Vec<f32>, Vec<i64>) {
        let flat: Vec<f32> = samples.iter().flatten().copied().collect();
        let x = Tensor::from_values("features", vec![samples.len() as i64, 4], &flat).unwrap();
        let out = Iris::new().execute(&[x]).unwrap();
        (out[0].values().unwrap(), out[1].values().unwrap())
    }

    #[test]
    fn predicts_the_reference_samples_as_scikit_learn_did() {
        // Samples 0, 50, 100 and 77 of the data set, with scikit-learn's probabilities as
        // recorded in iris.toml.
        let (p, labels) = run(&[
            [5.1, 3.5, 1.4, 0.2],
            [7.0, 3.2, 4.7, 1.4],
            [6.3, 3.3, 6.0, 2.5],
            [6.7, 3.0, 5.0, 1.7],
        ]);
        assert_eq!(labels, vec![0, 1, 2, 2]);
        let expected = [
            [0.981_656_829, 0.018_343_156, 1.44e-8],
            [0.002_118_045, 0.874_228_649, 0.123_653_306],
            [8.9e-7, 0.003_937_034, 0.996_062_075],
            [0.000_574_574, 0.481_319_039, 0.518_106_387],
        ];
        for (row, want) in expected.iter().enumerate() {
            for k in 0..3 {
                let got = f64::from(p[row * 3 + k]);
                assert!(
                    (got - want[k]).abs() < 1e-5,
                    "row {row} class {k}: {got} vs {}",
                    want[k]
                );
            }
        }
    }

    #[test]
    fn probabilities_sum_to_one_and_nan_is_rejected() {
        let (p, _) = run(&[[1.0, 2.0, 3.0, 4.0]]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let x = Tensor::from_values("features", vec![1, 4], &[1.0f32, f32::NAN, 0.0, 0.0]).unwrap();
        let e = Iris::new().execute(&[x]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 'features': element 1 is NaN, not a finite number"
        );
    }
}
