//! The fallback ladder of a model, and its response cache: plain data, parsed and checked
//! here, run by the edge.

use std::collections::BTreeMap;
use std::time::Duration;

use toml::Value;

use super::reader::{Problems, Section, join};
use super::{Flag, UpstreamSpec, When};

/// What made a call fall back: the `on` list of a fallback tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Trigger {
    /// The breaker of the model's upstream is open.
    BreakerOpen,
    /// The deadline (or an attempt's timeout) ran out.
    Deadline,
    /// The upstream could not be reached or answered UNAVAILABLE.
    Unavailable,
    /// The upstream, or Keel's limits, were overloaded.
    Overloaded,
    /// Retries were refused by the retry budget.
    BudgetExhausted,
    /// The upstream failed with a server error.
    ServerBug,
}

impl Trigger {
    /// Every trigger: the default `on` of a tier.
    pub const ALL: [Trigger; 6] = [
        Trigger::BreakerOpen,
        Trigger::Deadline,
        Trigger::Unavailable,
        Trigger::Overloaded,
        Trigger::BudgetExhausted,
        Trigger::ServerBug,
    ];

    /// The policy spelling (`breaker_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::BreakerOpen => "breaker_open",
            Trigger::Deadline => "deadline",
            Trigger::Unavailable => "unavailable",
            Trigger::Overloaded => "overloaded",
            Trigger::BudgetExhausted => "budget_exhausted",
            Trigger::ServerBug => "server_bug",
        }
    }

    fn parse(s: &str) -> Option<Trigger> {
        Trigger::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// One tensor of a static default response.
#[derive(Clone, Debug, PartialEq)]
pub struct StaticTensor {
    /// Output name.
    pub name: String,
    /// Protocol datatype (`FP32`, `INT64`, `BYTES`, ...).
    pub datatype: String,
    /// Shape; its element count matches `data`.
    pub shape: Vec<i64>,
    /// Elements: numbers, or strings for `BYTES`.
    pub data: StaticData,
}

/// The elements of a [`StaticTensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum StaticData {
    /// Numeric elements (converted to the datatype; booleans are 0 or 1).
    Numbers(Vec<f64>),
    /// `BYTES` elements.
    Strings(Vec<String>),
}

/// What answers on one rung of the ladder.
#[derive(Clone, Debug, PartialEq)]
pub enum Tier {
    /// Another model served by Keel (a lighter one), with the same inputs.
    Model(String),
    /// The same model on another upstream.
    Upstream(String),
    /// A stale entry of the model's response cache.
    Cache,
    /// A fixed answer.
    Static(Vec<StaticTensor>),
}

impl Tier {
    /// The tier's label on the wire (`keel.tier`).
    pub fn label(&self) -> &'static str {
        match self {
            Tier::Model(_) | Tier::Upstream(_) => "fallback_model",
            Tier::Cache => "cache",
            Tier::Static(_) => "static",
        }
    }
}

/// One rung of a model's fallback ladder.
#[derive(Clone, Debug, PartialEq)]
pub struct Fallback {
    /// What answers.
    pub tier: Tier,
    /// What lets it answer.
    pub on: Vec<Trigger>,
    /// The flag condition that turns the rung on; `None` is always on.
    pub when: Option<When>,
}

/// A model's response cache.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheSpec {
    /// Most entries kept.
    pub entries: usize,
    /// Most bytes of tensor data kept.
    pub bytes: usize,
    /// Answer from the cache, without calling the model, while an entry is younger.
    pub fresh_ttl: Option<Duration>,
    /// Oldest entry the `cache` rung of the ladder may serve.
    pub max_stale: Duration,
    /// Serve a stale entry on any failure the ladder answers: adds a `cache` rung (before
    /// any `static` one) when the ladder has none.
    pub serve_stale_on_error: bool,
}

/// The datatypes a static response may use.
const DATATYPES: [&str; 12] = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32",
    "FP64", "BYTES",
];

/// Reads `[[models.<name>.fallback]]`.
pub(super) fn read_ladder(
    s: &mut Section<'_>,
    p: &mut Problems,
    upstreams: &BTreeMap<String, UpstreamSpec>,
    flags: &BTreeMap<String, Flag>,
) -> Vec<Fallback> {
    let path = s.at("fallback");
    let Some(items) = s.array(p, "fallback") else {
        return vec![];
    };
    let mut out = Vec::new();
    for (i, v) in items.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let Value::Table(t) = v else {
            p.add(at, "expected a table such as { model = \"iris\" }");
            continue;
        };
        let mut r = Section::new(at.clone(), t);
        let model = r.string(p, "model");
        let upstream = r.string(p, "upstream");
        let cache = r.boolean(p, "cache").unwrap_or(false);
        let statik = r
            .array(p, "static")
            .map(|outputs| read_static(outputs, &join(&at, "static"), p));
        let on = match r.strings(p, "on") {
            None => Trigger::ALL.to_vec(),
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(k, name)| {
                    let t = Trigger::parse(name);
                    if t.is_none() {
                        let all: Vec<&str> = Trigger::ALL.iter().map(|t| t.as_str()).collect();
                        p.add(
                            format!("{}[{k}]", join(&at, "on")),
                            format!("{name:?} is not one of {}", all.join(", ")),
                        );
                    }
                    t
                })
                .collect(),
        };
        let when = super::rollout::read_when(&mut r, p, "flag", flags);
        r.finish(p);
        let tiers = [model.is_some(), upstream.is_some(), cache, statik.is_some()];
        let tier = match (model, upstream, cache, statik) {
            _ if tiers.iter().filter(|x| **x).count() != 1 => {
                p.add(
                    at,
                    "set exactly one of model, upstream, cache = true, static",
                );
                continue;
            }
            (Some(m), ..) => Tier::Model(m),
            (_, Some(u), ..) => {
                if !upstreams.contains_key(&u) {
                    p.add(join(&at, "upstream"), format!("unknown upstream {u:?}"));
                }
                Tier::Upstream(u)
            }
            (_, _, true, _) => Tier::Cache,
            (_, _, _, Some(outputs)) => Tier::Static(outputs),
            _ => continue,
        };
        out.push(Fallback { tier, on, when });
    }
    out
}

pub(super) fn read_static(outputs: &[Value], path: &str, p: &mut Problems) -> Vec<StaticTensor> {
    let mut out = Vec::new();
    for (i, v) in outputs.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let Value::Table(t) = v else {
            p.add(at, "expected a table { name, datatype, shape, data }");
            continue;
        };
        let mut s = Section::new(at.clone(), t);
        let name = s.string(p, "name");
        let datatype = s.string(p, "datatype");
        let shape: Option<Vec<i64>> = s.array(p, "shape").map(|dims| {
            dims.iter()
                .filter_map(|d| match d {
                    Value::Integer(n) if *n >= 0 => Some(*n),
                    _ => {
                        p.add(join(&at, "shape"), "dimensions are integers >= 0");
                        None
                    }
                })
                .collect()
        });
        let data = s.array(p, "data").map(|items| {
            if items.iter().all(|x| matches!(x, Value::String(_))) && !items.is_empty() {
                StaticData::Strings(
                    items
                        .iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect(),
                )
            } else {
                StaticData::Numbers(
                    items
                        .iter()
                        .filter_map(|x| match x {
                            Value::Integer(n) => Some(*n as f64),
                            Value::Float(f) => Some(*f),
                            Value::Boolean(b) => Some(f64::from(u8::from(*b))),
                            _ => {
                                p.add(join(&at, "data"), "elements are all numbers or all strings");
                                None
                            }
                        })
                        .collect(),
                )
            }
        });
        s.finish(p);
        let (Some(name), Some(datatype), Some(shape), Some(data)) = (name, datatype, shape, data)
        else {
            p.add(at, "needs name, datatype, shape and data");
            continue;
        };
        if !DATATYPES.contains(&datatype.as_str()) {
            p.add(
                join(&at, "datatype"),
                format!("{datatype:?} is not one of {}", DATATYPES.join(", ")),
            );
        }
        let count = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        let len = match &data {
            StaticData::Numbers(v) => v.len(),
            StaticData::Strings(v) => v.len(),
        };
        if count != Some(len as u64) {
            p.add(
                join(&at, "data"),
                format!(
                    "{len} elements but shape {shape:?} needs {}",
                    count.map_or("too many".into(), |c| c.to_string())
                ),
            );
        }
        if matches!(data, StaticData::Strings(_)) != (datatype == "BYTES") {
            p.add(
                join(&at, "data"),
                "strings go with BYTES, numbers with the other datatypes",
            );
        }
        out.push(StaticTensor {
            name,
            datatype,
            shape,
            data,
        });
    }
    out
}

/// Reads `[models.<name>.cache]`.
pub(super) fn read_cache(s: &mut Section<'_>, p: &mut Problems) -> Option<CacheSpec> {
    let mut c = s.table(p, "cache")?;
    let spec = CacheSpec {
        entries: c.count(p, "entries", 1..=10_000_000).unwrap_or(1024) as usize,
        bytes: c.size(p, "bytes").unwrap_or(64 << 20),
        fresh_ttl: c.duration(p, "fresh_ttl", super::MAX_DURATION),
        max_stale: c
            .duration(p, "max_stale", Duration::from_secs(7 * 24 * 3600))
            .unwrap_or(Duration::from_secs(300)),
        serve_stale_on_error: c.boolean(p, "serve_stale_on_error").unwrap_or(false),
    };
    c.finish(p);
    Some(spec)
}
