//! Tensor element types, named as the Open Inference Protocol names them.

use std::fmt;

/// The element type of a tensor.
///
/// Spelled on the wire as in the Open Inference Protocol (`"INT32"`, `"BYTES"`); Triton's model
/// configuration spells the same types `TYPE_INT32`, `TYPE_STRING`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    /// One byte, 0 or 1.
    Bool,
    /// Unsigned 8-bit integer.
    Uint8,
    /// Unsigned 16-bit integer.
    Uint16,
    /// Unsigned 32-bit integer.
    Uint32,
    /// Unsigned 64-bit integer.
    Uint64,
    /// Signed 8-bit integer.
    Int8,
    /// Signed 16-bit integer.
    Int16,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 64-bit integer.
    Int64,
    /// IEEE half precision; raw form only, there is no typed field for it.
    Fp16,
    /// IEEE single precision.
    Fp32,
    /// IEEE double precision.
    Fp64,
    /// bfloat16; raw form only.
    Bf16,
    /// Variable-length byte strings.
    Bytes,
}

impl DataType {
    /// Every data type, in the order of Triton's `DataType` enum.
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
        DataType::Bf16,
    ];

    /// Parses the protocol spelling (`"FP32"`); `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The protocol spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bf16 => "BF16",
            DataType::Bytes => "BYTES",
        }
    }

    /// Bytes per element in raw form; `None` for `BYTES`, whose elements vary in length.
    pub fn element_size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }

    /// The number Triton's model configuration gives this type (`TYPE_INT32 = 8`).
    pub fn config_code(self) -> i32 {
        match self {
            DataType::Bool => 1,
            DataType::Uint8 => 2,
            DataType::Uint16 => 3,
            DataType::Uint32 => 4,
            DataType::Uint64 => 5,
            DataType::Int8 => 6,
            DataType::Int16 => 7,
            DataType::Int32 => 8,
            DataType::Int64 => 9,
            DataType::Fp16 => 10,
            DataType::Fp32 => 11,
            DataType::Fp64 => 12,
            DataType::Bytes => 13,
            DataType::Bf16 => 14,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips_through_its_spelling() {
        for t in DataType::ALL {
            assert_eq!(DataType::parse(t.as_str()), Some(t));
        }
        assert_eq!(DataType::parse("FLOAT"), None);
        assert_eq!(
            DataType::parse("int32"),
            None,
            "spellings are case-sensitive"
        );
    }

    #[test]
    fn config_codes_are_distinct_and_match_tritons_enum() {
        let codes: std::collections::BTreeSet<i32> =
            DataType::ALL.iter().map(|t| t.config_code()).collect();
        assert_eq!(codes, (1..=14).collect());
        assert_eq!(DataType::Bytes.config_code(), 13, "BYTES is TYPE_STRING");
        assert_eq!(DataType::Bf16.config_code(), 14);
    }
}
