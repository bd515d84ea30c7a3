//! Reads a TOML table key by key, collecting every problem with its full path instead of
//! stopping at the first, and reporting unknown keys with the nearest known one.
//!
//! Each getter registers its key as known; [`Section::finish`] then reports every key of the
//! table that no getter asked for (`models.resnet.retry.max_atempts: unknown key, did you mean
//! max_attempts?`).

use std::time::Duration;

use toml::{Table, Value};

use super::units::{parse_duration, parse_size};
use super::{Files, PolicyError, PolicyErrors};

/// Problems found so far, and whether the files the policy names are read.
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<PolicyError>, Files);

impl Problems {
    /// No problems yet; `files` says whether the policy's files are read and checked.
    pub(super) fn new(files: Files) -> Problems {
        Problems(Vec::new(), files)
    }

    /// Whether the files the policy names (certificates, keys, CAs) are read and checked.
    pub(super) fn reads_files(&self) -> bool {
        self.1 == Files::Read
    }

    pub(super) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let e = PolicyError {
            path: path.into(),
            message: message.into(),
        };
        // Layers checked in combination can find one problem twice.
        if !self.0.contains(&e) {
            self.0.push(e);
        }
    }

    pub(super) fn into_result<T>(self, ok: T) -> Result<T, PolicyErrors> {
        if self.0.is_empty() {
            Ok(ok)
        } else {
            Err(PolicyErrors(self.0))
        }
    }
}

/// Joins a path and a key, quoting keys that are not bare TOML keys (method names).
pub(super) fn join(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

/// One table being read.
pub(super) struct Section<'t> {
    pub(super) path: String,
    table: &'t Table,
    known: Vec<&'static str>,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "a list",
        Value::Table(_) => "a table",
    }
}

impl<'t> Section<'t> {
    pub(super) fn new(path: impl Into<String>, table: &'t Table) -> Self {
        Section {
            path: path.into(),
            table,
            known: Vec::new(),
        }
    }

    /// The path of `key` in this section.
    pub(super) fn at(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Whether the table has `key` at all (a getter's `None` also means "invalid").
    pub(super) fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    fn get(&mut self, key: &'static str) -> Option<&'t Value> {
        self.known.push(key);
        self.table.get(key)
    }

    fn wrong_type(&self, p: &mut Problems, key: &str, want: &str, got: &Value) {
        p.add(
            self.at(key),
            format!("expected {want}, found {}", type_name(got)),
        );
    }

    pub(super) fn string(&mut self, p: &mut Problems, key: &'static str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            v => {
                self.wrong_type(p, key, "a string", v);
                None
            }
        }
    }

    pub(super) fn boolean(&mut self, p: &mut Problems, key: &'static str) -> Option<bool> {
        match self.get(key)? {
            Value::Boolean(b) => Some(*b),
            v => {
                self.wrong_type(p, key, "true or false", v);
                None
            }
        }
    }

    /// An integer within `range`.
    pub(super) fn integer(
        &mut self,
        p: &mut Problems,
        key: &'static str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<i64> {
        match self.get(key)? {
            Value::Integer(i) if range.contains(i) => Some(*i),
            Value::Integer(i) => {
                p.add(
                    self.at(key),
                    format!(
                        "{i} is out of range: must be {}..={}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
            v => {
                self.wrong_type(p, key, "an integer", v);
                None
            }
        }
    }

    /// A count (a non-negative integer) within `range`.
    pub(super) fn count(
        &mut self,
        p: &mut Problems,
        key: &'static str,
        range: std::ops::RangeInclusive<u32>,
    ) -> Option<u32> {
        let wide = i64::from(*range.start())..=i64::from(*range.end());
        self.integer(p, key, wide)
            .and_then(|n| u32::try_from(n).ok())
    }

    /// A number (integer or float) within `range`.
    pub(super) fn number(
        &mut self,
        p: &mut Problems,
        key: &'static str,
        range: std::ops::RangeInclusive<f64>,
    ) -> Option<f64> {
        let x = match self.get(key)? {
            Value::Float(f) => *f,
            Value::Integer(i) => *i as f64,
            v => {
                self.wrong_type(p, key, "a number", v);
                return None;
            }
        };
        if !range.contains(&x) {
            p.add(
                self.at(key),
                format!(
                    "{x} is out of range: must be {}..={}",
                    range.start(),
                    range.end()
                ),
            );
            return None;
        }
        Some(x)
    }

    /// A positive duration no longer than `max`.
    pub(super) fn duration(
        &mut self,
        p: &mut Problems,
        key: &'static str,
        max: Duration,
    ) -> Option<Duration> {
        let s = self.string(p, key)?;
        match parse_duration(&s) {
            Ok(d) if d.is_zero() => {
                p.add(self.at(key), "must be greater than zero");
                None
            }
            Ok(d) if d > max => {
                p.add(
                    self.at(key),
                    format!("{s} is too long: at most {}", super::format_duration(max)),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                p.add(self.at(key), e);
                None
            }
        }
    }

    /// A byte size, as an integer or a string with a unit.
    pub(super) fn size(&mut self, p: &mut Problems, key: &'static str) -> Option<usize> {
        match self.get(key)? {
            Value::Integer(i) if *i >= 0 => usize::try_from(*i).ok(),
            Value::String(s) => match parse_size(s) {
                Ok(n) => Some(n),
                Err(e) => {
                    p.add(self.at(key), e);
                    None
                }
            },
            v => {
                self.wrong_type(p, key, "a size such as \"64MiB\"", v);
                None
            }
        }
    }

    /// A list of strings.
    pub(super) fn strings(&mut self, p: &mut Problems, key: &'static str) -> Option<Vec<String>> {
        let items = self.array(p, key)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, v) in items.iter().enumerate() {
            match v {
                Value::String(s) => out.push(s.clone()),
                v => p.add(
                    format!("{}[{i}]", self.at(key)),
                    format!("expected a string, found {}", type_name(v)),
                ),
            }
        }
        Some(out)
    }

    /// A list of any values.
    pub(super) fn array(&mut self, p: &mut Problems, key: &'static str) -> Option<&'t Vec<Value>> {
        match self.get(key)? {
            Value::Array(a) => Some(a),
            v => {
                self.wrong_type(p, key, "a list", v);
                None
            }
        }
    }

    /// A sub-table, as a section of its own.
    pub(super) fn table(&mut self, p: &mut Problems, key: &'static str) -> Option<Section<'t>> {
        match self.get(key)? {
            Value::Table(t) => Some(Section::new(self.at(key), t)),
            v => {
                self.wrong_type(p, key, "a table", v);
                None
            }
        }
    }

    /// A table of named sub-tables (`[upstreams.<name>]`); every entry must be a table. The
    /// names are the user's choice, so none of them is an unknown key.
    pub(super) fn named_tables(
        &mut self,
        p: &mut Problems,
        key: &'static str,
    ) -> Option<Vec<(String, Section<'t>)>> {
        let section = self.table(p, key)?;
        let mut out = Vec::new();
        for (name, v) in section.table {
            match v {
                Value::Table(t) => out.push((name.clone(), Section::new(section.at(name), t))),
                v => section.wrong_type(p, name, "a table", v),
            }
        }
        Some(out)
    }

    /// Every key that is not a table, for a table of user-named values (`[flags]`).
    pub(super) fn entries(
        &mut self,
        p: &mut Problems,
        key: &'static str,
    ) -> Option<Vec<(String, &'t Value, String)>> {
        let section = self.table(p, key)?;
        Some(
            section
                .table
                .iter()
                .map(|(k, v)| (k.clone(), v, section.at(k)))
                .collect(),
        )
    }

    /// Reports every key no getter asked for, with the closest known key as a hint.
    pub(super) fn finish(self, p: &mut Problems) {
        for key in self.table.keys() {
            if self.known.contains(&key.as_str()) {
                continue;
            }
            let hint = closest(key, &self.known)
                .map(|k| format!(", did you mean {k}?"))
                .unwrap_or_else(|| {
                    if self.known.is_empty() {
                        String::new()
                    } else {
                        format!(" (known keys: {})", self.known.join(", "))
                    }
                });
            p.add(self.at(key), format!("unknown key{hint}"));
        }
    }
}

/// The known key nearest to `key` by edit distance, if it is near enough to be a typo.
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|&(d, k)| d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> Table {
        s.parse().unwrap()
    }

    #[test]
    fn unknown_keys_get_the_nearest_known_key_as_a_hint() {
        let t = table("max_atempts = 3\nzzz = 1\n");
        let mut p = Problems::default();
        let mut s = Section::new("models.resnet.retry", &t);
        assert_eq!(s.integer(&mut p, "max_attempts", 1..=10), None);
        s.string(&mut p, "initial_backoff");
        s.finish(&mut p);
        let msgs: Vec<String> = p.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            msgs,
            [
                "models.resnet.retry.max_atempts: unknown key, did you mean max_attempts?",
                "models.resnet.retry.zzz: unknown key (known keys: max_attempts, initial_backoff)",
            ]
        );
    }

    #[test]
    fn wrong_types_and_ranges_are_named() {
        let t = table("a = \"x\"\nb = 11\nc = 1.5\nd = \"0s\"\ne = [1, \"ok\"]\n");
        let mut p = Problems::default();
        let mut s = Section::new("x", &t);
        s.integer(&mut p, "a", 0..=5);
        s.integer(&mut p, "b", 1..=10);
        s.number(&mut p, "c", 0.0..=1.0);
        s.duration(&mut p, "d", Duration::from_secs(60));
        s.strings(&mut p, "e");
        s.finish(&mut p);
        let msgs: Vec<String> = p.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            msgs,
            [
                "x.a: expected an integer, found a string",
                "x.b: 11 is out of range: must be 1..=10",
                "x.c: 1.5 is out of range: must be 0..=1",
                "x.d: must be greater than zero",
                "x.e[0]: expected a string, found an integer",
            ]
        );
    }

    #[test]
    fn method_names_are_quoted_in_paths() {
        assert_eq!(
            join("methods", "inference.GRPCInferenceService/ModelInfer"),
            "methods.\"inference.GRPCInferenceService/ModelInfer\""
        );
        assert_eq!(join("", "server"), "server");
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("max_atempts", "max_attempts"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
