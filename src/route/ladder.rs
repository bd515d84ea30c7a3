//! The fallback ladder of a model, compiled for one policy revision: which rungs are on
//! (their flags are read when the revision is compiled), the targets and answers they
//! stand for, and which failures let a call fall back.

use std::sync::Arc;

use super::Target;
use crate::error::Error;
use crate::model::{DataType, Tensor};
use crate::policy::{StaticData, StaticTensor, Trigger};

/// What answers on one rung.
#[derive(Debug)]
pub enum Rung {
    /// Another model, by name (routed like any call).
    Model(String),
    /// The same model on another upstream.
    Upstream(Arc<Target>),
    /// A stale entry of the model's cache.
    Cache,
    /// A fixed answer.
    Static(Arc<Vec<Tensor>>),
}

impl Rung {
    /// The `keel.tier` label of an answer from this rung.
    pub fn tier(&self) -> &'static str {
        match self {
            Rung::Model(_) | Rung::Upstream(_) => "fallback_model",
            Rung::Cache => "cache",
            Rung::Static(_) => "static",
        }
    }
}

/// One rung and the failures that reach it.
#[derive(Debug)]
pub struct Step {
    /// What answers.
    pub rung: Rung,
    /// What lets it answer.
    pub on: Vec<Trigger>,
}

/// The failures a call's error stands for, for the ladder: none when no fallback may
/// answer it (client errors, and refusals about the caller or the answer), else its own
/// trigger ([`Error::trigger`], from the error taxonomy), and `budget_exhausted` too when
/// the retry budget refused a retry.
pub fn triggers(e: &Error, budget_exhausted: bool) -> Vec<Trigger> {
    match e.trigger() {
        Some(t) if budget_exhausted => vec![Trigger::BudgetExhausted, t],
        Some(t) => vec![t],
        None => vec![],
    }
}

/// The trigger for which a ladder step answers, if any.
pub fn answers(step: &Step, triggers: &[Trigger]) -> Option<Trigger> {
    triggers.iter().copied().find(|t| step.on.contains(t))
}

/// The tensors of a static answer; errors name the output and the problem.
pub fn static_tensors(outputs: &[StaticTensor]) -> Result<Vec<Tensor>, String> {
    outputs
        .iter()
        .map(|o| {
            let dtype = DataType::parse(&o.datatype)
                .ok_or_else(|| format!("output '{}': unknown datatype", o.name))?;
            let shape = o.shape.clone();
            let fail = |e: crate::model::TensorError| format!("output '{}': {e}", o.name);
            match (&o.data, dtype) {
                (StaticData::Strings(s), DataType::Bytes) => {
                    Tensor::from_byte_strings(o.name.clone(), shape, s).map_err(fail)
                }
                (StaticData::Numbers(v), t) => numbers(&o.name, t, shape, v).map_err(fail),
                _ => Err(format!(
                    "output '{}': data does not fit {}",
                    o.name, o.datatype
                )),
            }
        })
        .collect()
}

fn numbers(
    name: &str,
    dtype: DataType,
    shape: Vec<i64>,
    v: &[f64],
) -> Result<Tensor, crate::model::TensorError> {
    macro_rules! cast {
        ($t:ty) => {
            Tensor::from_values(
                name.to_string(),
                shape,
                &v.iter().map(|x| *x as $t).collect::<Vec<$t>>(),
            )
        };
    }
    match dtype {
        DataType::Bool => Tensor::from_values(
            name.to_string(),
            shape,
            &v.iter().map(|x| *x != 0.0).collect::<Vec<bool>>(),
        ),
        DataType::Uint8 => cast!(u8),
        DataType::Uint16 => cast!(u16),
        DataType::Uint32 => cast!(u32),
        DataType::Uint64 => cast!(u64),
        DataType::Int8 => cast!(i8),
        DataType::Int16 => cast!(i16),
        DataType::Int32 => cast!(i32),
        DataType::Int64 => cast!(i64),
        DataType::Fp32 => cast!(f32),
        _ => cast!(f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::BreakerOpen;

    #[test]
    fn client_errors_never_fall_back() {
        let e = Error::ModelNotFound { model: "x".into() };
        assert!(triggers(&e, true).is_empty());
        let e = Error::UpstreamStatus {
            upstream: "u".into(),
            code: tonic::Code::InvalidArgument,
            message: String::new(),
            pushback: crate::resilience::Pushback::None,
        };
        assert!(triggers(&e, false).is_empty());
    }

    #[test]
    fn failures_map_to_their_triggers() {
        let open = Error::BreakerOpen(BreakerOpen {
            retry_after: std::time::Duration::ZERO,
        });
        assert_eq!(triggers(&open, false), [Trigger::BreakerOpen]);
        let late = Error::DeadlineExceeded {
            budget: std::time::Duration::ZERO,
        };
        assert_eq!(triggers(&late, false), [Trigger::Deadline]);
        let down = Error::UpstreamUnavailable {
            upstream: "u".into(),
            detail: String::new(),
            never_sent: true,
        };
        assert_eq!(triggers(&down, false), [Trigger::Unavailable]);
        assert_eq!(
            triggers(&down, true),
            [Trigger::BudgetExhausted, Trigger::Unavailable]
        );
        let only_unavailable = Step {
            rung: Rung::Cache,
            on: vec![Trigger::Unavailable],
        };
        assert_eq!(
            answers(&only_unavailable, &triggers(&down, true)),
            Some(Trigger::Unavailable)
        );
    }

    #[test]
    fn every_endpoint_ejected_falls_back_as_an_open_breaker() {
        let ejected = Error::NoEndpoint {
            upstream: "u".into(),
            retry_after: std::time::Duration::from_secs(1),
        };
        assert_eq!(triggers(&ejected, false), [Trigger::BreakerOpen]);
        // Refusals about the caller or the answer never fall back.
        for e in [
            Error::DrainTimeout,
            Error::AnswerTooLarge {
                upstream: "u".into(),
                detail: String::new(),
            },
        ] {
            assert!(triggers(&e, true).is_empty(), "{e:?}");
        }
    }

    #[test]
    fn static_answers_are_typed_tensors() {
        let t = static_tensors(&[StaticTensor {
            name: "label".into(),
            datatype: "INT64".into(),
            shape: vec![2],
            data: StaticData::Numbers(vec![1.0, 2.0]),
        }])
        .unwrap();
        assert_eq!(t[0].values::<i64>().unwrap(), vec![1, 2]);
        assert!(
            static_tensors(&[StaticTensor {
                name: "s".into(),
                datatype: "INT8".into(),
                shape: vec![1],
                data: StaticData::Strings(vec!["a".into()]),
            }])
            .is_err()
        );
    }
}
