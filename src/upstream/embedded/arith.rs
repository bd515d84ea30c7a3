//! Triton's `simple` family: `OUTPUT0 = INPUT0 + INPUT1`, `OUTPUT1 = INPUT0 - INPUT1`,
//! element-wise over `[batch, 16]` (max_batch_size 8).
//!
//! # Overflow
//!
//! `simple` and `simple_int8` wrap on overflow, as two's-complement INT32/INT8 arithmetic
//! does in Triton's example models (`i32::MAX + 1` is `i32::MIN`). `simple_string` parses
//! each element as a decimal INT32, computes with the same wrapping arithmetic and answers
//! decimal strings.

use super::{Model, input};
use crate::model::{DataType, Element, InvalidRequest, ModelSpec, Tensor, TensorSpec};

/// Which element type the model computes on.
#[derive(Clone, Copy)]
enum Kind {
    Int32,
    Int8,
    String,
}

/// One model of the family.
pub(super) struct Arith {
    spec: ModelSpec,
    kind: Kind,
}

impl Arith {
    fn new(name: &str, dtype: DataType, kind: Kind) -> Self {
        let t = |n: &str| TensorSpec::new(n, dtype, &[16]);
        Arith {
            spec: ModelSpec {
                name: name.to_string(),
                versions: vec![super::VERSION.to_string()],
                platform: "keel_embedded".to_string(),
                backend: "keel".to_string(),
                max_batch_size: 8,
                inputs: vec![t("INPUT0"), t("INPUT1")],
                outputs: vec![t("OUTPUT0"), t("OUTPUT1")],
                any_inputs: false,
            },
            kind,
        }
    }

    /// `simple`: INT32.
    pub(super) fn simple() -> Self {
        Arith::new("simple", DataType::Int32, Kind::Int32)
    }

    /// `simple_int8`: INT8.
    pub(super) fn simple_int8() -> Self {
        Arith::new("simple_int8", DataType::Int8, Kind::Int8)
    }

    /// `simple_string`: BYTES holding decimal integers.
    pub(super) fn simple_string() -> Self {
        Arith::new("simple_string", DataType::Bytes, Kind::String)
    }
}

/// Wrapping add and subtract for the integer element types.
trait Wrapping: Element {
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
}

impl Wrapping for i32 {
    fn add(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
    fn sub(self, o: Self) -> Self {
        self.wrapping_sub(o)
    }
}

impl Wrapping for i8 {
    fn add(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
    fn sub(self, o: Self) -> Self {
        self.wrapping_sub(o)
    }
}

fn tensor_error(t: &Tensor, problem: crate::model::TensorError) -> InvalidRequest {
    InvalidRequest::Tensor {
        tensor: t.name().to_string(),
        problem,
    }
}

fn sums<T: Wrapping>(a: &[T], b: &[T]) -> (Vec<T>, Vec<T>) {
    a.iter().zip(b).map(|(&x, &y)| (x.add(y), x.sub(y))).unzip()
}

fn numeric<T: Wrapping>(a: &Tensor, b: &Tensor) -> Result<Vec<Tensor>, InvalidRequest> {
    let x = a.values::<T>().map_err(|e| tensor_error(a, e))?;
    let y = b.values::<T>().map_err(|e| tensor_error(b, e))?;
    let (sum, diff) = sums(&x, &y);
    let shape = a.shape().to_vec();
    Ok(vec![
        Tensor::from_values("OUTPUT0", shape.clone(), &sum).map_err(|e| tensor_error(a, e))?,
        Tensor::from_values("OUTPUT1", shape, &diff).map_err(|e| tensor_error(a, e))?,
    ])
}

fn parse_decimals(t: &Tensor) -> Result<Vec<i32>, InvalidRequest> {
    let elements = t.byte_strings().map_err(|e| tensor_error(t, e))?;
    elements
        .iter()
        .enumerate()
        .map(|(index, e)| {
            std::str::from_utf8(e)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .ok_or_else(|| InvalidRequest::BadElement {
                    tensor: t.name().to_string(),
                    index,
                    reason: format!(
                        "is {:?}, not a decimal INT32",
                        String::from_utf8_lossy(&e[..e.len().min(32)])
                    ),
                })
        })
        .collect()
}

fn strings(a: &Tensor, b: &Tensor) -> Result<Vec<Tensor>, InvalidRequest> {
    let (sum, diff) = sums(&parse_decimals(a)?, &parse_decimals(b)?);
    let shape = a.shape().to_vec();
    let text = |v: &[i32]| v.iter().map(i32::to_string).collect::<Vec<_>>();
    Ok(vec![
        Tensor::from_byte_strings("OUTPUT0", shape.clone(), text(&sum))
            .map_err(|e| tensor_error(a, e))?,
        Tensor::from_byte_strings("OUTPUT1", shape, text(&diff)).map_err(|e| tensor_error(a, e))?,
    ])
}

impl Model for Arith {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InvalidRequest> {
        let a = input(inputs, &self.spec, "INPUT0")?;
        let b = input(inputs, &self.spec, "INPUT1")?;
        match self.kind {
            Kind::Int32 => numeric::<i32>(a, b),
            Kind::Int8 => numeric::<i8>(a, b),
            Kind::String => strings(a, b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_adds_and_subtracts_with_int32_wraparound() {
        let m = Arith::simple();
        let mut x: Vec<i32> = (0..16).collect();
        x[15] = i32::MAX;
        let y = vec![1i32; 16];
        let out = m
            .execute(&[
                Tensor::from_values("INPUT0", vec![1, 16], &x).unwrap(),
                Tensor::from_values("INPUT1", vec![1, 16], &y).unwrap(),
            ])
            .unwrap();
        let sum = out[0].values::<i32>().unwrap();
        let diff = out[1].values::<i32>().unwrap();
        assert_eq!(sum[0..3], [1, 2, 3]);
        assert_eq!(diff[0..3], [-1, 0, 1]);
        assert_eq!(sum[15], i32::MIN, "INT32 overflow wraps");
        assert_eq!(out[0].shape(), [1, 16]);
    }

    #[test]
    fn simple_int8_wraps_as_int8() {
        let m = Arith::simple_int8();
        let out = m
            .execute(&[
                Tensor::from_values("INPUT0", vec![1, 16], &[127i8; 16]).unwrap(),
                Tensor::from_values("INPUT1", vec![1, 16], &[-128i8; 16]).unwrap(),
            ])
            .unwrap();
        assert_eq!(out[0].values::<i8>().unwrap(), vec![-1; 16]);
        assert_eq!(
            out[1].values::<i8>().unwrap(),
            vec![-1; 16],
            "127 - -128 wraps to -1"
        );
    }

    #[test]
    fn simple_string_answers_decimal_strings_and_names_bad_elements() {
        let m = Arith::simple_string();
        let a: Vec<String> = (0..16).map(|i| i.to_string()).collect();
        let b = vec!["1".to_string(); 16];
        let out = m
            .execute(&[
                Tensor::from_byte_strings("INPUT0", vec![1, 16], &a).unwrap(),
                Tensor::from_byte_strings("INPUT1", vec![1, 16], &b).unwrap(),
            ])
            .unwrap();
        let sums = out[0].byte_strings().unwrap();
        assert_eq!(&sums[3][..], b"4");
        let diffs = out[1].byte_strings().unwrap();
        assert_eq!(&diffs[0][..], b"-1");

        let mut bad = a.clone();
        bad[5] = "five".into();
        let e = m
            .execute(&[
                Tensor::from_byte_strings("INPUT0", vec![1, 16], &bad).unwrap(),
                Tensor::from_byte_strings("INPUT1", vec![1, 16], &b).unwrap(),
            ])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 'INPUT0': element 5 is \"five\", not a decimal INT32"
        );
    }
}
