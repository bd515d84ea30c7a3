//! Typed tensor contents (`InferTensorContents`) to and from the raw form.
//!
//! The protocol carries INT8/INT16/INT32 in one `int_contents` field of int32 and
//! UINT8/UINT16/UINT32 in `uint_contents`; values are range-checked on the way in. FP16 and
//! BF16 have no typed field and must be sent raw.

use bytes::{BufMut, Bytes, BytesMut};

use super::inference::InferTensorContents;
use crate::model::{DataType, Element, Tensor, TensorError, encode_byte_strings};

/// The field a data type's typed contents belong in.
fn field_name(dtype: DataType) -> &'static str {
    match dtype {
        DataType::Bool => "bool_contents",
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int_contents",
        DataType::Int64 => "int64_contents",
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => "uint_contents",
        DataType::Uint64 => "uint64_contents",
        DataType::Fp32 => "fp32_contents",
        DataType::Fp64 => "fp64_contents",
        DataType::Bytes => "bytes_contents",
        DataType::Fp16 | DataType::Bf16 => "raw_input_contents",
    }
}

/// Lengths of every typed field, by field name.
fn populated(c: &InferTensorContents) -> [(&'static str, usize); 8] {
    [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ]
}

/// Whether any typed field holds data.
pub(super) fn has_data(c: &InferTensorContents) -> bool {
    populated(c).iter().any(|&(_, n)| n > 0)
}

fn put_all<T: Element>(values: impl IntoIterator<Item = T>, len: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(len * T::SIZE);
    for v in values {
        v.put_le(&mut buf);
    }
    buf.freeze()
}

fn narrow<T, S>(values: &[S], dtype: DataType) -> Result<Bytes, TensorError>
where
    T: Element + TryFrom<S>,
    S: Copy + Into<i128>,
{
    let mut buf = BytesMut::with_capacity(values.len() * T::SIZE);
    for (index, &v) in values.iter().enumerate() {
        let t = T::try_from(v).map_err(|_| TensorError::OutOfRange {
            index,
            value: v.into(),
            dtype,
        })?;
        t.put_le(&mut buf);
    }
    Ok(buf.freeze())
}

/// Converts typed contents of `dtype` to the raw form.
pub(super) fn typed_to_raw(dtype: DataType, c: InferTensorContents) -> Result<Bytes, TensorError> {
    let expected = field_name(dtype);
    if populated(&c)
        .iter()
        .any(|&(name, n)| n > 0 && name != expected)
    {
        return Err(TensorError::ContentsField { dtype, expected });
    }
    Ok(match dtype {
        DataType::Bool => {
            let mut buf = BytesMut::with_capacity(c.bool_contents.len());
            for b in c.bool_contents {
                buf.put_u8(u8::from(b));
            }
            buf.freeze()
        }
        DataType::Int8 => narrow::<i8, i32>(&c.int_contents, dtype)?,
        DataType::Int16 => narrow::<i16, i32>(&c.int_contents, dtype)?,
        DataType::Int32 => put_all(c.int_contents.iter().copied(), c.int_contents.len()),
        DataType::Int64 => put_all(c.int64_contents.iter().copied(), c.int64_contents.len()),
        DataType::Uint8 => narrow::<u8, u32>(&c.uint_contents, dtype)?,
        DataType::Uint16 => narrow::<u16, u32>(&c.uint_contents, dtype)?,
        DataType::Uint32 => put_all(c.uint_contents.iter().copied(), c.uint_contents.len()),
        DataType::Uint64 => put_all(c.uint64_contents.iter().copied(), c.uint64_contents.len()),
        DataType::Fp32 => put_all(c.fp32_contents.iter().copied(), c.fp32_contents.len()),
        DataType::Fp64 => put_all(c.fp64_contents.iter().copied(), c.fp64_contents.len()),
        DataType::Bytes => encode_byte_strings(&c.bytes_contents),
        DataType::Fp16 | DataType::Bf16 => {
            if has_data(&c) {
                return Err(TensorError::ContentsField { dtype, expected });
            }
            Bytes::new()
        }
    })
}

/// Converts a tensor's raw data to typed contents; `None` for FP16 and BF16, which have none.
pub(super) fn raw_to_typed(t: &Tensor) -> Option<InferTensorContents> {
    let mut c = InferTensorContents::default();
    // A tensor's data always matches its type (checked when it was built), so decoding
    // cannot fail; an empty field is the fallback should that ever change.
    match t.dtype() {
        DataType::Bool => c.bool_contents = t.values::<bool>().unwrap_or_default(),
        DataType::Int8 => {
            c.int_contents = widen(t.values::<i8>().unwrap_or_default());
        }
        DataType::Int16 => {
            c.int_contents = widen(t.values::<i16>().unwrap_or_default());
        }
        DataType::Int32 => c.int_contents = t.values::<i32>().unwrap_or_default(),
        DataType::Int64 => c.int64_contents = t.values::<i64>().unwrap_or_default(),
        DataType::Uint8 => c.uint_contents = widen(t.values::<u8>().unwrap_or_default()),
        DataType::Uint16 => c.uint_contents = widen(t.values::<u16>().unwrap_or_default()),
        DataType::Uint32 => c.uint_contents = t.values::<u32>().unwrap_or_default(),
        DataType::Uint64 => c.uint64_contents = t.values::<u64>().unwrap_or_default(),
        DataType::Fp32 => c.fp32_contents = t.values::<f32>().unwrap_or_default(),
        DataType::Fp64 => c.fp64_contents = t.values::<f64>().unwrap_or_default(),
        DataType::Bytes => c.bytes_contents = t.byte_strings().unwrap_or_default(),
        DataType::Fp16 | DataType::Bf16 => return None,
    }
    Some(c)
}

fn widen<S, T: From<S>>(v: Vec<S>) -> Vec<T> {
    v.into_iter().map(T::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_typed_field_round_trips_through_raw() {
        let cases: Vec<(DataType, InferTensorContents)> = vec![
            (
                DataType::Bool,
                InferTensorContents {
                    bool_contents: vec![true, false],
                    ..Default::default()
                },
            ),
            (
                DataType::Int8,
                InferTensorContents {
                    int_contents: vec![-128, 127],
                    ..Default::default()
                },
            ),
            (
                DataType::Int16,
                InferTensorContents {
                    int_contents: vec![-300, 300],
                    ..Default::default()
                },
            ),
            (
                DataType::Int32,
                InferTensorContents {
                    int_contents: vec![i32::MIN, 7],
                    ..Default::default()
                },
            ),
            (
                DataType::Int64,
                InferTensorContents {
                    int64_contents: vec![i64::MIN, 7],
                    ..Default::default()
                },
            ),
            (
                DataType::Uint8,
                InferTensorContents {
                    uint_contents: vec![0, 255],
                    ..Default::default()
                },
            ),
            (
                DataType::Uint16,
                InferTensorContents {
                    uint_contents: vec![0, 65535],
                    ..Default::default()
                },
            ),
            (
                DataType::Uint32,
                InferTensorContents {
                    uint_contents: vec![0, u32::MAX],
                    ..Default::default()
                },
            ),
            (
                DataType::Uint64,
                InferTensorContents {
                    uint64_contents: vec![0, u64::MAX],
                    ..Default::default()
                },
            ),
            (
                DataType::Fp32,
                InferTensorContents {
                    fp32_contents: vec![1.5, -0.25],
                    ..Default::default()
                },
            ),
            (
                DataType::Fp64,
                InferTensorContents {
                    fp64_contents: vec![1e300, -2.0],
                    ..Default::default()
                },
            ),
            (
                DataType::Bytes,
                InferTensorContents {
                    bytes_contents: vec![Bytes::from("ab"), Bytes::new()],
                    ..Default::default()
                },
            ),
        ];
        for (dtype, contents) in cases {
            let raw = typed_to_raw(dtype, contents.clone()).unwrap();
            let t = Tensor::new("t", dtype, vec![2], raw).unwrap();
            assert_eq!(raw_to_typed(&t), Some(contents), "{dtype}");
        }
    }

    #[test]
    fn out_of_range_values_and_wrong_fields_are_rejected() {
        let c = InferTensorContents {
            int_contents: vec![1, 300],
            ..Default::default()
        };
        assert_eq!(
            typed_to_raw(DataType::Int8, c).unwrap_err().to_string(),
            "element 1 is 300, out of range for INT8"
        );
        let c = InferTensorContents {
            fp32_contents: vec![1.0],
            ..Default::default()
        };
        assert_eq!(
            typed_to_raw(DataType::Int32, c).unwrap_err().to_string(),
            "INT32 data must be sent in int_contents"
        );
        let c = InferTensorContents {
            fp32_contents: vec![1.0],
            ..Default::default()
        };
        assert_eq!(
            typed_to_raw(DataType::Fp16, c).unwrap_err().to_string(),
            "FP16 data must be sent in raw_input_contents"
        );
    }
}
