//! Policy for clients on an older schema: how the legacy v1 API maps a model
//! (`[models.<name>.v1]`), whether v1 is deprecated (`[api.v1]`), and version adapters that
//! keep a client written for one version of a model working against the next
//! (`[models.<name>.adapters."<version>"]`).

use std::collections::BTreeMap;

use toml::Value;

use super::StaticTensor;
use super::reader::{Problems, Section, join};
use crate::model::DataType;

/// How v1 `instances` fill a model's inputs and its outputs become `predictions`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct V1Mapping {
    /// The input that list instances fill; by default the model's only input.
    pub input: Option<String>,
    /// Named features, in the order they fill `input`: a struct instance
    /// `{"sepal_length": 5.1, ...}` becomes one row. Without it, a struct instance names
    /// inputs.
    pub features: Vec<String>,
    /// The output that becomes the predictions; by default every output (one output: its
    /// row; several: a struct of rows by output name).
    pub output: Option<String>,
    /// What a prediction is.
    pub predict: Predict,
    /// Class names for `predict = "label"`, by index.
    pub labels: Vec<String>,
}

/// What a v1 prediction holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Predict {
    /// The output's row for the instance (probabilities, scores, values).
    #[default]
    Values,
    /// The index of the row's largest value, or its name from `labels`.
    Label,
}

/// `[api.v1]`: the legacy API's status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LegacyApi {
    /// Every v1 answer carries a `keel-deprecation` trailer.
    pub deprecated: bool,
    /// The trailer's text; a default one names the v2 API.
    pub message: Option<String>,
}

impl LegacyApi {
    /// The text of the `keel-deprecation` trailer, when v1 is deprecated.
    pub fn deprecation(&self) -> Option<String> {
        self.deprecated.then(|| {
            self.message.clone().unwrap_or_else(|| {
                "keel.inference.v1 is deprecated: use inference.GRPCInferenceService (KServe Open Inference Protocol v2)".to_string()
            })
        })
    }
}

/// Turns a request written for one version of a model into one for another version, and
/// the answer back. Input names are the client's before `rename_inputs` and the model's
/// after; output names are the model's before `rename_outputs` and the client's after.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VersionAdapter {
    /// The version that answers.
    pub to: String,
    /// Client input name → model input name.
    pub rename_inputs: BTreeMap<String, String>,
    /// Model input name → the data type the model takes.
    pub cast_inputs: BTreeMap<String, DataType>,
    /// Model input name → the shape the model takes (one -1 stands for what is left);
    /// the element count never changes.
    pub reshape_inputs: BTreeMap<String, Vec<i64>>,
    /// Inputs of the new version an old client does not send, with their values.
    pub defaults: Vec<StaticTensor>,
    /// Whether casts may lose information (FP32 → FP16, INT64 → INT32).
    pub allow_lossy: bool,
    /// Model output name → client output name.
    pub rename_outputs: BTreeMap<String, String>,
    /// Client output name → the data type the client expects.
    pub cast_outputs: BTreeMap<String, DataType>,
    /// Client output name → the shape the client expects.
    pub reshape_outputs: BTreeMap<String, Vec<i64>>,
    /// The outputs the client gets (client names); empty: all.
    pub outputs: Vec<String>,
}

impl VersionAdapter {
    /// The model's name for a client input.
    pub fn model_input<'a>(&'a self, client: &'a str) -> &'a str {
        self.rename_inputs
            .get(client)
            .map_or(client, String::as_str)
    }

    /// The client's name for a model output.
    pub fn client_output<'a>(&'a self, model: &'a str) -> &'a str {
        self.rename_outputs.get(model).map_or(model, String::as_str)
    }

    /// The model's name for a client output.
    pub fn model_output<'a>(&'a self, client: &'a str) -> &'a str {
        self.rename_outputs
            .iter()
            .find(|(_, c)| *c == client)
            .map_or(client, |(m, _)| m.as_str())
    }

    /// Every input name the adapter expects the model to have, with the policy path that
    /// names it: renamed-to inputs, casts, reshapes and defaults.
    pub fn model_inputs(&self, at: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (client, model) in &self.rename_inputs {
            out.push((model.clone(), join(&join(at, "rename_inputs"), client)));
        }
        for name in self.cast_inputs.keys() {
            out.push((name.clone(), join(&join(at, "cast_inputs"), name)));
        }
        for name in self.reshape_inputs.keys() {
            out.push((name.clone(), join(&join(at, "reshape_inputs"), name)));
        }
        for (i, d) in self.defaults.iter().enumerate() {
            out.push((d.name.clone(), format!("{}[{i}]", join(at, "defaults"))));
        }
        out
    }

    /// Every output name the adapter expects the model to have, with its policy path.
    pub fn model_outputs(&self, at: &str) -> Vec<(String, String)> {
        self.rename_outputs
            .keys()
            .map(|m| (m.clone(), join(&join(at, "rename_outputs"), m)))
            .collect()
    }
}

/// Reads `[models.<name>.v1]`.
pub(super) fn read_v1(s: &mut Section<'_>, p: &mut Problems) -> Option<V1Mapping> {
    let mut t = s.table(p, "v1")?;
    let predict = match t.string(p, "predict").as_deref() {
        None | Some("values") => Predict::Values,
        Some("label") => Predict::Label,
        Some(other) => {
            p.add(
                t.at("predict"),
                format!("{other:?} is not one of \"values\", \"label\""),
            );
            Predict::Values
        }
    };
    let m = V1Mapping {
        input: t.string(p, "input"),
        features: t.strings(p, "features").unwrap_or_default(),
        output: t.string(p, "output"),
        predict,
        labels: t.strings(p, "labels").unwrap_or_default(),
    };
    if !m.labels.is_empty() && m.predict != Predict::Label {
        p.add(
            t.at("labels"),
            "labels are used only with predict = \"label\"",
        );
    }
    t.finish(p);
    Some(m)
}

/// Reads `[api]` (only `[api.v1]` today).
pub(super) fn read_api(root: &mut Section<'_>, p: &mut Problems) -> LegacyApi {
    let Some(mut api) = root.table(p, "api") else {
        return LegacyApi::default();
    };
    let legacy = match api.table(p, "v1") {
        Some(mut v1) => {
            let l = LegacyApi {
                deprecated: v1.boolean(p, "deprecated").unwrap_or(false),
                message: v1.string(p, "message"),
            };
            if let Some(m) = &l.message
                && http::HeaderValue::from_str(m).is_err()
            {
                p.add(
                    v1.at("message"),
                    "must be printable ASCII (it is sent as a trailer)",
                );
            }
            v1.finish(p);
            l
        }
        None => LegacyApi::default(),
    };
    api.finish(p);
    legacy
}

/// Reads `[models.<name>.adapters."<version>"]`, keyed by the version clients ask for.
pub(super) fn read_adapters(
    s: &mut Section<'_>,
    p: &mut Problems,
) -> BTreeMap<String, VersionAdapter> {
    let mut out = BTreeMap::new();
    for (version, mut a) in s.named_tables(p, "adapters").unwrap_or_default() {
        let to = a.string(p, "to");
        if to.is_none() {
            p.add(a.at("to"), "is required: the version that answers");
        }
        if to.as_deref() == Some(version.as_str()) {
            p.add(a.at("to"), "must differ from the version it adapts");
        }
        let adapter = VersionAdapter {
            to: to.unwrap_or_default(),
            rename_inputs: names(&mut a, p, "rename_inputs"),
            cast_inputs: dtypes(&mut a, p, "cast_inputs"),
            reshape_inputs: shapes(&mut a, p, "reshape_inputs"),
            defaults: a
                .array(p, "defaults")
                .map(|d| super::fallback::read_static(d, &a.at("defaults"), p))
                .unwrap_or_default(),
            allow_lossy: a.boolean(p, "allow_lossy").unwrap_or(false),
            rename_outputs: names(&mut a, p, "rename_outputs"),
            cast_outputs: dtypes(&mut a, p, "cast_outputs"),
            reshape_outputs: shapes(&mut a, p, "reshape_outputs"),
            outputs: a.strings(p, "outputs").unwrap_or_default(),
        };
        check_renames(&adapter.rename_inputs, &a.at("rename_inputs"), p);
        check_renames(&adapter.rename_outputs, &a.at("rename_outputs"), p);
        a.finish(p);
        out.insert(version, adapter);
    }
    out
}

/// Two names renamed to one would make a request with both ambiguous.
fn check_renames(renames: &BTreeMap<String, String>, at: &str, p: &mut Problems) {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (from, to) in renames {
        if let Some(first) = seen.insert(to, from) {
            p.add(
                join(at, from),
                format!("{first:?} and {from:?} are both renamed to {to:?}"),
            );
        }
    }
}

fn names(s: &mut Section<'_>, p: &mut Problems, key: &'static str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, v, path) in s.entries(p, key).unwrap_or_default() {
        match v {
            Value::String(to) if !to.is_empty() => {
                out.insert(name, to.clone());
            }
            _ => p.add(path, "expected a tensor name"),
        }
    }
    out
}

fn dtypes(s: &mut Section<'_>, p: &mut Problems, key: &'static str) -> BTreeMap<String, DataType> {
    let mut out = BTreeMap::new();
    for (name, v, path) in s.entries(p, key).unwrap_or_default() {
        match v.as_str().and_then(DataType::parse) {
            Some(DataType::Bytes) => p.add(path, "BYTES tensors cannot be cast"),
            Some(t) => {
                out.insert(name, t);
            }
            None => p.add(
                path,
                "expected a numeric datatype such as \"FP32\" or \"INT64\"",
            ),
        }
    }
    out
}

fn shapes(s: &mut Section<'_>, p: &mut Problems, key: &'static str) -> BTreeMap<String, Vec<i64>> {
    let mut out = BTreeMap::new();
    for (name, v, path) in s.entries(p, key).unwrap_or_default() {
        let dims: Option<Vec<i64>> = v.as_array().and_then(|a| {
            a.iter()
                .map(|d| d.as_integer().filter(|&n| n >= -1))
                .collect()
        });
        match dims {
            Some(d) if d.iter().filter(|&&x| x == -1).count() <= 1 => {
                out.insert(name, d);
            }
            _ => p.add(
                path,
                "expected a shape: a list of dimensions >= 0, with at most one -1",
            ),
        }
    }
    out
}
