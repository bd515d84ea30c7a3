//! Tensors in Keel's one internal form: the protocol's raw bytes.
//!
//! Whatever form a client used (raw `raw_input_contents` or typed `contents`), a [`Tensor`]
//! holds its elements as the protocol's raw form: little-endian numbers, and for `BYTES` each
//! element prefixed by its length as a 4-byte little-endian integer. Raw requests are
//! therefore forwarded without copying a byte (`Bytes` is reference-counted), and every
//! check and model works on one representation.
//!
//! # Invariant
//!
//! A `Tensor` is only built through [`Tensor::new`], which checks that the data matches the
//! shape and data type, so code holding one never re-checks.

use bytes::{BufMut, Bytes, BytesMut};

use super::{DataType, Parameters};

/// A named, shaped, typed tensor whose data matches its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    name: String,
    dtype: DataType,
    shape: Vec<i64>,
    data: Bytes,
    /// Per-tensor parameters, carried through untouched.
    pub parameters: Parameters,
}

/// What is wrong with a tensor's shape or contents. The tensor's name is added by the caller.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TensorError {
    /// A dimension below zero; requests carry concrete shapes.
    #[error("shape {shape:?} has a negative dimension")]
    NegativeDimension {
        /// The shape as given.
        shape: Vec<i64>,
    },
    /// The element count does not fit in memory arithmetic.
    #[error("shape {shape:?} has too many elements")]
    TooManyElements {
        /// The shape as given.
        shape: Vec<i64>,
    },
    /// Fixed-size raw data whose length is not elements × element size.
    #[error("raw content is {actual} bytes but shape {shape:?} of {dtype} needs {expected} bytes")]
    RawLength {
        /// The shape as given.
        shape: Vec<i64>,
        /// The data type as given.
        dtype: DataType,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes received.
        actual: usize,
    },
    /// `BYTES` raw data that does not split into length-prefixed elements.
    #[error("BYTES content is malformed at byte {offset}: {what}")]
    BytesFraming {
        /// Where parsing stopped.
        offset: usize,
        /// What was expected there.
        what: &'static str,
    },
    /// A different number of elements than the shape says.
    #[error("shape {shape:?} needs {expected} elements but the content has {actual}")]
    ElementCount {
        /// The shape as given.
        shape: Vec<i64>,
        /// Elements the shape needs.
        expected: usize,
        /// Elements received.
        actual: usize,
    },
    /// A typed value that does not fit the data type (300 for INT8).
    #[error("element {index} is {value}, out of range for {dtype}")]
    OutOfRange {
        /// Position in the flattened tensor.
        index: usize,
        /// The value as sent.
        value: i128,
        /// The tensor's data type.
        dtype: DataType,
    },
    /// Typed contents for a type that has none (FP16, BF16), or in the wrong field.
    #[error("{dtype} data must be sent in {expected}")]
    ContentsField {
        /// The tensor's data type.
        dtype: DataType,
        /// Where the data belongs.
        expected: &'static str,
    },
    /// The tensor has a different data type than the operation needs.
    #[error("expected {expected}, got {actual}")]
    DataType {
        /// What the operation needs.
        expected: DataType,
        /// What the tensor holds.
        actual: DataType,
    },
}

/// The number of elements in `shape`, rejecting negative dimensions and overflow.
pub fn element_count(shape: &[i64]) -> Result<usize, TensorError> {
    shape.iter().try_fold(1usize, |acc, &d| {
        let d = usize::try_from(d).map_err(|_| TensorError::NegativeDimension {
            shape: shape.to_vec(),
        })?;
        acc.checked_mul(d)
            .ok_or_else(|| TensorError::TooManyElements {
                shape: shape.to_vec(),
            })
    })
}

impl Tensor {
    /// Builds a tensor, checking that `data` (raw form) matches `shape` and `dtype`.
    pub fn new(
        name: impl Into<String>,
        dtype: DataType,
        shape: Vec<i64>,
        data: Bytes,
    ) -> Result<Self, TensorError> {
        let elements = element_count(&shape)?;
        match dtype.element_size() {
            Some(size) => {
                let expected =
                    elements
                        .checked_mul(size)
                        .ok_or_else(|| TensorError::TooManyElements {
                            shape: shape.clone(),
                        })?;
                if data.len() != expected {
                    return Err(TensorError::RawLength {
                        shape,
                        dtype,
                        expected,
                        actual: data.len(),
                    });
                }
            }
            None => {
                let actual = count_bytes_elements(&data)?;
                if actual != elements {
                    return Err(TensorError::ElementCount {
                        shape,
                        expected: elements,
                        actual,
                    });
                }
            }
        }
        Ok(Tensor {
            name: name.into(),
            dtype,
            shape,
            data,
            parameters: Parameters::new(),
        })
    }

    /// Builds a fixed-size tensor from values.
    pub fn from_values<T: Element>(
        name: impl Into<String>,
        shape: Vec<i64>,
        values: &[T],
    ) -> Result<Self, TensorError> {
        let mut buf = BytesMut::with_capacity(values.len() * T::DTYPE.element_size().unwrap_or(1));
        for v in values {
            v.put_le(&mut buf);
        }
        Tensor::new(name, T::DTYPE, shape, buf.freeze())
    }

    /// Builds a `BYTES` tensor from its elements.
    pub fn from_byte_strings<I, B>(
        name: impl Into<String>,
        shape: Vec<i64>,
        elements: I,
    ) -> Result<Self, TensorError>
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        Tensor::new(name, DataType::Bytes, shape, encode_byte_strings(elements))
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renames the tensor (an identity model answers under the input's name, for example).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The element type.
    pub fn dtype(&self) -> DataType {
        self.dtype
    }

    /// The shape; every dimension is at least zero.
    pub fn shape(&self) -> &[i64] {
        &self.shape
    }

    /// The raw data (a cheap reference-counted clone away from the wire bytes).
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Number of elements.
    pub fn element_count(&self) -> usize {
        // Checked in `new`.
        element_count(&self.shape).unwrap_or(0)
    }

    /// Decodes the elements of a fixed-size tensor of type `T`.
    pub fn values<T: Element>(&self) -> Result<Vec<T>, TensorError> {
        if self.dtype != T::DTYPE {
            return Err(TensorError::DataType {
                expected: T::DTYPE,
                actual: self.dtype,
            });
        }
        Ok(self.data.chunks_exact(T::SIZE).map(T::from_le).collect())
    }

    /// The elements of a `BYTES` tensor, as slices of the one buffer.
    pub fn byte_strings(&self) -> Result<Vec<Bytes>, TensorError> {
        if self.dtype != DataType::Bytes {
            return Err(TensorError::DataType {
                expected: DataType::Bytes,
                actual: self.dtype,
            });
        }
        split_bytes_elements(&self.data)
    }
}

/// Encodes byte strings in the raw `BYTES` form: each with a 4-byte little-endian length.
pub fn encode_byte_strings<I, B>(elements: I) -> Bytes
where
    I: IntoIterator<Item = B>,
    B: AsRef<[u8]>,
{
    let mut buf = BytesMut::new();
    for e in elements {
        let e = e.as_ref();
        // An element over 4 GiB cannot be framed; messages are capped far below that.
        buf.put_u32_le(u32::try_from(e.len()).unwrap_or(u32::MAX));
        buf.put_slice(e);
    }
    buf.freeze()
}

/// Splits raw `BYTES` data into its elements without copying.
pub fn split_bytes_elements(data: &Bytes) -> Result<Vec<Bytes>, TensorError> {
    let mut out = Vec::new();
    walk_bytes_elements(data, |start, end| out.push(data.slice(start..end)))?;
    Ok(out)
}

fn count_bytes_elements(data: &[u8]) -> Result<usize, TensorError> {
    let mut n = 0;
    walk_bytes_elements(data, |_, _| n += 1)?;
    Ok(n)
}

fn walk_bytes_elements(data: &[u8], mut each: impl FnMut(usize, usize)) -> Result<(), TensorError> {
    let mut at = 0;
    while at < data.len() {
        let Some(prefix) = data.get(at..at + 4) else {
            return Err(TensorError::BytesFraming {
                offset: at,
                what: "a 4-byte length prefix",
            });
        };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let start = at + 4;
        let end = start.checked_add(len).filter(|&e| e <= data.len()).ok_or(
            TensorError::BytesFraming {
                offset: start,
                what: "as many bytes as the length prefix says",
            },
        )?;
        each(start, end);
        at = end;
    }
    Ok(())
}

/// A fixed-size element type with a little-endian raw form.
pub trait Element: Copy {
    /// The protocol data type.
    const DTYPE: DataType;
    /// Bytes per element.
    const SIZE: usize;
    /// Appends the little-endian form.
    fn put_le(self, buf: &mut BytesMut);
    /// Reads from exactly `SIZE` little-endian bytes.
    fn from_le(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($($t:ty => $dtype:ident),* $(,)?) => {$(
        impl Element for $t {
            const DTYPE: DataType = DataType::$dtype;
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put_le(self, buf: &mut BytesMut) {
                buf.put_slice(&self.to_le_bytes());
            }
            fn from_le(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(bytes);
                <$t>::from_le_bytes(a)
            }
        }
    )*};
}

element!(
    u8 => Uint8, u16 => Uint16, u32 => Uint32, u64 => Uint64,
    i8 => Int8, i16 => Int16, i32 => Int32, i64 => Int64,
    f32 => Fp32, f64 => Fp64,
);

impl Element for bool {
    const DTYPE: DataType = DataType::Bool;
    const SIZE: usize = 1;
    fn put_le(self, buf: &mut BytesMut) {
        buf.put_u8(u8::from(self));
    }
    fn from_le(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_size_data_must_match_shape_times_element_size() {
        let ok = Tensor::new("x", DataType::Int32, vec![2, 2], Bytes::from(vec![0u8; 16]));
        assert!(ok.is_ok());
        let err = Tensor::new(
            "x",
            DataType::Int32,
            vec![1, 16],
            Bytes::from(vec![0u8; 60]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "raw content is 60 bytes but shape [1, 16] of INT32 needs 64 bytes"
        );
    }

    #[test]
    fn negative_and_overflowing_shapes_are_rejected() {
        assert!(matches!(
            element_count(&[1, -1]),
            Err(TensorError::NegativeDimension { .. })
        ));
        assert!(matches!(
            element_count(&[i64::MAX, i64::MAX]),
            Err(TensorError::TooManyElements { .. })
        ));
        assert_eq!(element_count(&[]).unwrap(), 1, "a scalar has one element");
        assert_eq!(element_count(&[3, 0]).unwrap(), 0);
    }

    #[test]
    fn bytes_elements_round_trip_and_framing_is_checked() {
        let t = Tensor::from_byte_strings("s", vec![3], ["a", "", "hello"]).unwrap();
        let parts: Vec<Bytes> = t.byte_strings().unwrap();
        assert_eq!(
            parts,
            vec![Bytes::from("a"), Bytes::new(), Bytes::from("hello")]
        );

        let short = Tensor::new(
            "s",
            DataType::Bytes,
            vec![1],
            Bytes::from_static(&[5, 0, 0]),
        );
        assert!(matches!(
            short,
            Err(TensorError::BytesFraming { offset: 0, .. })
        ));
        let truncated = Tensor::new(
            "s",
            DataType::Bytes,
            vec![1],
            Bytes::from_static(&[5, 0, 0, 0, b'a']),
        );
        assert!(matches!(
            truncated,
            Err(TensorError::BytesFraming { offset: 4, .. })
        ));
        let count = Tensor::from_byte_strings("s", vec![2], ["only one"]);
        assert!(matches!(
            count,
            Err(TensorError::ElementCount {
                expected: 2,
                actual: 1,
                ..
            })
        ));
    }

    #[test]
    fn values_decode_what_from_values_encoded() {
        let t = Tensor::from_values("v", vec![3], &[1i32, -2, i32::MAX]).unwrap();
        assert_eq!(t.data().len(), 12);
        assert_eq!(t.values::<i32>().unwrap(), vec![1, -2, i32::MAX]);
        assert!(matches!(
            t.values::<f32>(),
            Err(TensorError::DataType {
                expected: DataType::Fp32,
                actual: DataType::Int32
            })
        ));
        let b = Tensor::from_values("b", vec![2], &[true, false]).unwrap();
        assert_eq!(b.values::<bool>().unwrap(), vec![true, false]);
    }
}
