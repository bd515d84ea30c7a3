//! Numeric elements of any data type, and casts between data types that say when they
//! would lose information.
//!
//! Used where Keel changes a tensor's form on a client's behalf: the legacy v1 API (JSON
//! numbers in and out) and version adapters (INT32 → INT64, FP16 → FP32). A cast never
//! wraps or saturates silently: a value that does not fit is an error naming its element.

use bytes::{BufMut, BytesMut};

use super::{DataType, Element, Tensor, TensorError};

/// One numeric element, wide enough for every numeric data type (BOOL is 0 or 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar {
    /// An integer (every integer type and BOOL).
    Int(i128),
    /// A floating-point number (FP16, BF16, FP32, FP64).
    Float(f64),
}

impl Scalar {
    /// The value as a float (integers beyond 2^53 round).
    pub fn as_f64(self) -> f64 {
        match self {
            Scalar::Int(i) => i as f64,
            Scalar::Float(f) => f,
        }
    }
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
        }
    }
}

/// Why an element cannot take a data type.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("element {index}: {reason}")]
pub struct CastError {
    /// Position in the flattened tensor.
    pub index: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// Whether every value of `from` is exactly a value of `to`.
pub fn lossless(from: DataType, to: DataType) -> bool {
    use DataType::*;
    if from == to {
        return true;
    }
    // Integer range as (signed, bits); floats as the integer bits their mantissa holds.
    let int = |t| match t {
        Bool => Some((false, 1)),
        Uint8 => Some((false, 8)),
        Uint16 => Some((false, 16)),
        Uint32 => Some((false, 32)),
        Uint64 => Some((false, 64)),
        Int8 => Some((true, 8)),
        Int16 => Some((true, 16)),
        Int32 => Some((true, 32)),
        Int64 => Some((true, 64)),
        _ => None,
    };
    let mantissa = |t| match t {
        Fp16 => Some(11),
        Bf16 => Some(8),
        Fp32 => Some(24),
        Fp64 => Some(53),
        _ => None,
    };
    match (int(from), int(to), mantissa(from), mantissa(to)) {
        // Wider, and signed if the source is.
        (Some((fs, fb)), Some((ts, tb)), _, _) => {
            (fs == ts && tb >= fb) || (!fs && ts && tb > fb) || from == Bool
        }
        (Some((fs, fb)), None, _, Some(m)) => fb - u32::from(fs) <= m,
        // A float with a wider mantissa and exponent: FP16/BF16 → FP32 → FP64.
        (None, None, Some(_), Some(_)) => {
            matches!((from, to), (Fp16 | Bf16, Fp32 | Fp64) | (Fp32, Fp64))
        }
        _ => false,
    }
}

/// The elements of a numeric tensor.
pub fn scalars(t: &Tensor) -> Result<Vec<Scalar>, TensorError> {
    fn ints<T: Element + Into<i128>>(t: &Tensor) -> Result<Vec<Scalar>, TensorError> {
        Ok(t.values::<T>()?
            .into_iter()
            .map(|v| Scalar::Int(v.into()))
            .collect())
    }
    let halves = |decode: fn(u16) -> f32| {
        t.data()
            .chunks_exact(2)
            .map(|c| Scalar::Float(f64::from(decode(u16::from_le_bytes([c[0], c[1]])))))
            .collect()
    };
    Ok(match t.dtype() {
        DataType::Bool => t
            .values::<bool>()?
            .into_iter()
            .map(|b| Scalar::Int(i128::from(b)))
            .collect(),
        DataType::Uint8 => ints::<u8>(t)?,
        DataType::Uint16 => ints::<u16>(t)?,
        DataType::Uint32 => ints::<u32>(t)?,
        DataType::Uint64 => ints::<u64>(t)?,
        DataType::Int8 => ints::<i8>(t)?,
        DataType::Int16 => ints::<i16>(t)?,
        DataType::Int32 => ints::<i32>(t)?,
        DataType::Int64 => ints::<i64>(t)?,
        DataType::Fp16 => halves(f16_to_f32),
        DataType::Bf16 => halves(bf16_to_f32),
        DataType::Fp32 => t
            .values::<f32>()?
            .into_iter()
            .map(|v| Scalar::Float(f64::from(v)))
            .collect(),
        DataType::Fp64 => t.values::<f64>()?.into_iter().map(Scalar::Float).collect(),
        DataType::Bytes => {
            return Err(TensorError::ContentsField {
                dtype: DataType::Bytes,
                expected: "a numeric data type",
            });
        }
    })
}

/// A tensor of `dtype` from `values`. An integer type takes only integers in its range
/// (with `round`, floats are rounded to the nearest integer first); a float type takes any
/// finite or infinite number, rounding to its precision.
pub fn from_scalars(
    name: &str,
    dtype: DataType,
    shape: Vec<i64>,
    values: &[Scalar],
    round: bool,
) -> Result<Tensor, CastError> {
    let size = dtype.element_size().ok_or_else(|| CastError {
        index: 0,
        reason: "BYTES elements are strings, not numbers".into(),
    })?;
    let mut buf = BytesMut::with_capacity(values.len() * size);
    for (index, &v) in values.iter().enumerate() {
        let fail = |reason: String| CastError { index, reason };
        let int = |lo: i128, hi: i128| -> Result<i128, CastError> {
            let i = match v {
                Scalar::Int(i) => i,
                Scalar::Float(f) if f.fract() == 0.0 && f.is_finite() => f as i128,
                Scalar::Float(f) if round && f.is_finite() => f.round() as i128,
                Scalar::Float(f) => {
                    return Err(fail(format!("{f} is not an integer, as {dtype} needs")));
                }
            };
            if i < lo || i > hi {
                return Err(fail(format!("{v} is out of range for {dtype}")));
            }
            Ok(i)
        };
        match dtype {
            DataType::Bool => buf.put_u8(int(0, 1)? as u8),
            DataType::Uint8 => buf.put_u8(int(0, u8::MAX.into())? as u8),
            DataType::Uint16 => buf.put_u16_le(int(0, u16::MAX.into())? as u16),
            DataType::Uint32 => buf.put_u32_le(int(0, u32::MAX.into())? as u32),
            DataType::Uint64 => buf.put_u64_le(int(0, u64::MAX.into())? as u64),
            DataType::Int8 => buf.put_i8(int(i8::MIN.into(), i8::MAX.into())? as i8),
            DataType::Int16 => buf.put_i16_le(int(i16::MIN.into(), i16::MAX.into())? as i16),
            DataType::Int32 => buf.put_i32_le(int(i32::MIN.into(), i32::MAX.into())? as i32),
            DataType::Int64 => buf.put_i64_le(int(i64::MIN.into(), i64::MAX.into())? as i64),
            DataType::Fp16 => buf.put_u16_le(f32_to_f16(v.as_f64() as f32)),
            DataType::Bf16 => buf.put_u16_le(f32_to_bf16(v.as_f64() as f32)),
            DataType::Fp32 => buf.put_f32_le(v.as_f64() as f32),
            DataType::Fp64 => buf.put_f64_le(v.as_f64()),
            DataType::Bytes => return Err(fail("BYTES elements are strings, not numbers".into())),
        }
    }
    Tensor::new(name, dtype, shape, buf.freeze()).map_err(|e| CastError {
        index: 0,
        reason: e.to_string(),
    })
}

/// `t` as `to`, keeping its name, shape and parameters. Refused when the cast could lose
/// information, unless `allow_lossy`; even then a value out of `to`'s range is an error.
pub fn cast(t: &Tensor, to: DataType, allow_lossy: bool) -> Result<Tensor, String> {
    if t.dtype() == to {
        return Ok(t.clone());
    }
    if !allow_lossy && !lossless(t.dtype(), to) {
        return Err(format!(
            "casting {} to {to} can lose information (set allow_lossy = true to allow it)",
            t.dtype()
        ));
    }
    let values = scalars(t).map_err(|e| e.to_string())?;
    let mut out = from_scalars(t.name(), to, t.shape().to_vec(), &values, allow_lossy)
        .map_err(|e| e.to_string())?;
    out.parameters = t.parameters.clone();
    Ok(out)
}

/// IEEE half precision bits to f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let shift = m.leading_zeros() - 21;
            let m = (m << shift) & 0x3ff;
            sign | ((113 - shift) << 23) | (m << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// f32 to IEEE half precision bits, rounding to nearest even.
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        // Infinity, or a NaN keeping its payload's top bits (and never becoming infinity).
        let payload = (man >> 13) as u16;
        let nan = match (man, payload) {
            (0, _) => 0,
            (_, 0) => 0x200,
            (_, p) => p,
        };
        return sign | 0x7c00 | nan;
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1 << shift) - 1);
        let mut out = m >> shift;
        if rest > half || (rest == half && out & 1 == 1) {
            out += 1;
        }
        return sign | out as u16;
    }
    let mut out = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && out & 1 == 1) {
        out += 1;
    }
    sign | out as u16
}

/// bfloat16 bits to f32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// f32 to bfloat16 bits, rounding to nearest even.
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        // Keep the payload's top bits; a payload that would vanish becomes a quiet NaN.
        let h = (bits >> 16) as u16;
        return if h & 0x7f == 0 { h | 0x40 } else { h };
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lossless_casts_are_the_widening_ones() {
        use DataType::*;
        for (from, to) in [
            (Int32, Int64),
            (Uint8, Int16),
            (Uint32, Uint64),
            (Int16, Fp32),
            (Int32, Fp64),
            (Fp16, Fp32),
            (Bf16, Fp64),
            (Fp32, Fp64),
            (Bool, Int8),
        ] {
            assert!(lossless(from, to), "{from} -> {to}");
        }
        for (from, to) in [
            (Int64, Int32),
            (Int8, Uint16),
            (Uint64, Int64),
            (Int32, Fp32),
            (Fp32, Fp16),
            (Fp64, Fp32),
            (Fp32, Int32),
            (Fp16, Bf16),
        ] {
            assert!(!lossless(from, to), "{from} -> {to}");
        }
    }

    #[test]
    fn half_precision_round_trips_and_rounds_to_nearest_even() {
        for h in [0u16, 0x3c00, 0xc000, 0x0001, 0x03ff, 0x7bff, 0x7c00, 0xfc00] {
            assert_eq!(f32_to_f16(f16_to_f32(h)), h, "{h:#x}");
        }
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f32_to_f16(65520.0), 0x7c00, "overflows to infinity");
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // NaNs stay NaNs with their payloads: FP16/BF16 → FP32 → back is exact.
        for h in [0x7c01u16, 0xfe00, 0x7fff, 0x7d55] {
            assert_eq!(f32_to_f16(f16_to_f32(h)), h, "{h:#x}");
        }
        for h in [0x7f81u16, 0xffc0, 0x7fff] {
            assert_eq!(f32_to_bf16(bf16_to_f32(h)), h, "{h:#x}");
        }
        assert!(f16_to_f32(f32_to_f16(f32::from_bits(0x7f80_0001))).is_nan());
        assert_eq!(bf16_to_f32(0x4049), 3.140625);
    }

    #[test]
    fn a_cast_refuses_what_could_lose_information_and_values_that_do_not_fit() {
        let t = Tensor::from_values("x", vec![3], &[1i32, -2, 300]).unwrap();
        let wide = cast(&t, DataType::Int64, false).unwrap();
        assert_eq!(wide.values::<i64>().unwrap(), [1, -2, 300]);
        assert!(
            cast(&t, DataType::Int8, false)
                .unwrap_err()
                .contains("allow_lossy")
        );
        assert_eq!(
            cast(&t, DataType::Int8, true).unwrap_err(),
            "element 2: 300 is out of range for INT8"
        );
        let f = Tensor::from_values("x", vec![2], &[1.5f32, -2.0]).unwrap();
        let r = cast(&f, DataType::Int32, true).unwrap();
        assert_eq!(r.values::<i32>().unwrap(), [2, -2]);
        let h = cast(&f, DataType::Fp16, true).unwrap();
        assert_eq!(cast(&h, DataType::Fp32, false).unwrap(), f.clone());
    }
}
