//! Typed access to one YAML mapping with moeq's own error messages.
//!
//! Converting by hand instead of through serde derive is what lets every
//! message name the key, the expected type or range, and the value found.

use super::keys::suggest;
use super::types::Choice;
use super::ConfigError;
use serde_yaml::{Mapping, Number, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;

/// An inclusive or exclusive bound pair for float keys; `None` is unbounded.
#[derive(Clone, Copy)]
pub(crate) struct Bounds {
    lo: Option<(f64, bool)>,
    hi: Option<(f64, bool)>,
}

impl Bounds {
    /// [0, +inf)
    pub const NON_NEGATIVE: Bounds = Bounds {
        lo: Some((0.0, true)),
        hi: None,
    };
    /// (0, +inf)
    pub const POSITIVE: Bounds = Bounds {
        lo: Some((0.0, false)),
        hi: None,
    };
    /// [0, 1)
    pub const UNIT: Bounds = Bounds {
        lo: Some((0.0, true)),
        hi: Some((1.0, false)),
    };
    /// [0, 1]
    pub const UNIT_CLOSED: Bounds = Bounds {
        lo: Some((0.0, true)),
        hi: Some((1.0, true)),
    };
    /// (0, 1]
    pub const UNIT_POSITIVE: Bounds = Bounds {
        lo: Some((0.0, false)),
        hi: Some((1.0, true)),
    };

    fn contains(&self, x: f64) -> bool {
        let lo_ok = match self.lo {
            Some((lo, true)) => x >= lo,
            Some((lo, false)) => x > lo,
            None => true,
        };
        let hi_ok = match self.hi {
            Some((hi, true)) => x <= hi,
            Some((hi, false)) => x < hi,
            None => true,
        };
        x.is_finite() && lo_ok && hi_ok
    }
}

impl fmt::Display for Bounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.lo, self.hi) {
            (Some((lo, li)), Some((hi, hi_inc))) => {
                let open = if li { '[' } else { '(' };
                let close = if hi_inc { ']' } else { ')' };
                write!(f, "must be in {open}{lo}, {hi}{close}")
            }
            (Some((lo, true)), None) => write!(f, "must be at least {lo}"),
            (Some((lo, false)), None) => write!(f, "must be greater than {lo}"),
            (None, Some((hi, true))) => write!(f, "must be at most {hi}"),
            (None, Some((hi, false))) => write!(f, "must be less than {hi}"),
            (None, None) => write!(f, "must be a finite number"),
        }
    }
}

/// How a value is named in "got ..." so the user can find it in the file.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {:?}", shorten(s)),
        Value::Sequence(_) => "a list".to_string(),
        Value::Mapping(_) => "a mapping".to_string(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// Keeps messages on one readable line even for pasted multi-kilobyte values.
pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}...")
    }
}

/// A string value quoted the way enum errors show it: `'cosin'`.
pub(crate) fn quote_word(s: &str) -> String {
    format!("'{}'", shorten(s).escape_debug())
}

pub(crate) fn invalid(origin: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.to_string(),
        message: message.into(),
    }
}

/// A mapping whose keys have already been checked against the key tables.
///
/// The typed accessors (`bool`, `string`, `choice`, ...) record a value's problem in `errors`
/// and answer "absent", so one run reports every bad value of a config at once; the `strict_`
/// variants return the problem instead, for callers that rework its message.
pub(crate) struct Fields<'a> {
    origin: &'a str,
    /// `""` at the top level, `"datasets[3]."` inside a dataset entry.
    prefix: String,
    map: &'a Mapping,
    errors: &'a RefCell<Vec<ConfigError>>,
}

type R<T> = Result<T, ConfigError>;

impl<'a> Fields<'a> {
    pub fn new(
        origin: &'a str,
        prefix: String,
        map: &'a Mapping,
        errors: &'a RefCell<Vec<ConfigError>>,
    ) -> Self {
        Fields {
            origin,
            prefix,
            map,
            errors,
        }
    }

    /// A nested mapping (a dataset entry, `bnb_config_kwargs`) reporting into the same list.
    pub fn child(&self, prefix: String, map: &'a Mapping) -> Fields<'a> {
        Fields::new(self.origin, prefix, map, self.errors)
    }

    /// Records a problem found outside the typed accessors and goes on.
    pub fn record(&self, e: ConfigError) {
        self.errors.borrow_mut().push(e);
    }

    fn soft<T>(&self, r: R<Option<T>>) -> R<Option<T>> {
        r.or_else(|e| {
            self.record(e);
            Ok(None)
        })
    }

    pub fn origin(&self) -> &'a str {
        self.origin
    }

    /// The key as the user should look for it, e.g. `datasets[0].path`.
    pub fn name(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    /// `key 'K' <msg>` error for this mapping.
    pub fn err(&self, key: &str, msg: impl fmt::Display) -> ConfigError {
        invalid(self.origin, format!("key '{}' {msg}", self.name(key)))
    }

    pub fn missing(&self, key: &str, what: &str) -> ConfigError {
        invalid(
            self.origin,
            format!("missing required key '{}' ({what})", self.name(key)),
        )
    }

    /// The value, treating an explicit null as absent: axolotl templates
    /// list many keys with no value to mean "unset".
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn present(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn bool(&self, key: &str) -> R<Option<bool>> {
        self.soft(self.strict_bool(key))
    }

    pub fn strict_bool(&self, key: &str) -> R<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("must be true or false, got {}", describe(v)))),
        }
    }

    /// An integer value, range-checked against `min`, as i128 so that both
    /// u64 and negative i64 fit.
    fn int(&self, key: &str, min: i128) -> R<Option<(i128, &'a Number)>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::Number(n) => n,
            _ => return Err(self.err(key, format!("must be an integer, got {}", describe(v)))),
        };
        let i = if let Some(u) = n.as_u64() {
            i128::from(u)
        } else if let Some(i) = n.as_i64() {
            i128::from(i)
        } else {
            return Err(self.err(key, format!("must be an integer, got {}", describe(v))));
        };
        if i < min {
            return Err(self.err(key, format!("must be at least {min}, got {n}")));
        }
        Ok(Some((i, n)))
    }

    pub fn usize_min(&self, key: &str, min: usize) -> R<Option<usize>> {
        self.soft(self.strict_usize_min(key, min))
    }

    pub fn strict_usize_min(&self, key: &str, min: usize) -> R<Option<usize>> {
        match self.int(key, min as i128)? {
            None => Ok(None),
            Some((i, n)) => usize::try_from(i)
                .map(Some)
                .map_err(|_| self.err(key, format!("is too large, got {n}"))),
        }
    }

    pub fn u64_min(&self, key: &str, min: u64) -> R<Option<u64>> {
        self.soft(self.strict_u64_min(key, min))
    }

    pub fn strict_u64_min(&self, key: &str, min: u64) -> R<Option<u64>> {
        match self.int(key, i128::from(min))? {
            None => Ok(None),
            Some((i, n)) => u64::try_from(i)
                .map(Some)
                .map_err(|_| self.err(key, format!("is too large, got {n}"))),
        }
    }

    /// A number (integers included) within `bounds`.
    pub fn number(&self, key: &str, bounds: Bounds) -> R<Option<f64>> {
        self.soft(self.strict_number(key, bounds))
    }

    pub fn strict_number(&self, key: &str, bounds: Bounds) -> R<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Number(n) = v else {
            return Err(self.err(key, format!("must be a number, got {}", describe(v))));
        };
        let x = n.as_f64().unwrap_or(f64::NAN);
        if !bounds.contains(x) {
            return Err(self.err(key, format!("{bounds}, got {n}")));
        }
        Ok(Some(x))
    }

    /// A non-empty string.
    pub fn string(&self, key: &str) -> R<Option<String>> {
        self.soft(self.strict_string(key))
    }

    pub fn strict_string(&self, key: &str) -> R<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => {
                Err(self.err(key, "must not be empty"))
            }
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, format!("must be a string, got {}", describe(v)))),
        }
    }

    /// A list of non-empty strings; a lone string counts as a one-element
    /// list, as axolotl allows for most list keys.
    pub fn string_list(&self, key: &str) -> R<Option<Vec<String>>> {
        self.soft(self.strict_string_list(key))
    }

    pub fn strict_string_list(&self, key: &str) -> R<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => {
                Err(self.err(key, "must not be empty"))
            }
            Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
            Some(Value::Sequence(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let elem = format!("{key}[{i}]");
                    match item {
                        Value::String(s) if s.trim().is_empty() => {
                            return Err(self.err(&elem, "must not be empty"))
                        }
                        Value::String(s) => out.push(s.clone()),
                        other => {
                            return Err(self
                                .err(&elem, format!("must be a string, got {}", describe(other))))
                        }
                    }
                }
                Ok(Some(out))
            }
            Some(v) => Err(self.err(
                key,
                format!("must be a list of strings, got {}", describe(v)),
            )),
        }
    }

    /// A mapping from strings to strings, such as `message_property_mappings`.
    pub fn string_map(&self, key: &str) -> R<Option<BTreeMap<String, String>>> {
        self.soft(self.strict_string_map(key))
    }

    pub fn strict_string_map(&self, key: &str) -> R<Option<BTreeMap<String, String>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Mapping(m) = v else {
            return Err(self.err(
                key,
                format!("must be a mapping of names to names, got {}", describe(v)),
            ));
        };
        let mut out = BTreeMap::new();
        for (k, val) in m {
            let Value::String(k) = k else {
                return Err(self.err(key, format!("must have string keys, got {}", describe(k))));
            };
            let Value::String(val) = val else {
                let elem = format!("{key}.{k}");
                return Err(self.err(&elem, format!("must be a string, got {}", describe(val))));
            };
            out.insert(k.clone(), val.clone());
        }
        Ok(Some(out))
    }

    /// A mapping of names to any values, as JSON (`model_config`: config.json overrides, which
    /// the model directory judges).
    pub fn json_map(&self, key: &str) -> R<Option<serde_json::Map<String, serde_json::Value>>> {
        let Some(v) = self.get(key).filter(|v| !matches!(v, Value::Null)) else {
            return Ok(None);
        };
        let Value::Mapping(m) = v else {
            return Err(self.err(key, "must be a mapping of config.json keys to values"));
        };
        let mut out = serde_json::Map::new();
        for (k, val) in m {
            let Value::String(k) = k else {
                return Err(self.err(key, format!("must have string keys, got {}", describe(k))));
            };
            let json = serde_json::to_value(val)
                .map_err(|e| self.err(&format!("{key}.{k}"), format!("not a JSON value: {e}")))?;
            out.insert(k.clone(), json);
        }
        Ok(Some(out))
    }

    /// One of the spellings `T` accepts.
    pub fn choice<T: Choice>(&self, key: &str) -> R<Option<T>> {
        self.soft(self.strict_choice(key))
    }

    pub fn strict_choice<T: Choice>(&self, key: &str) -> R<Option<T>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        if let Value::String(s) = v {
            if let Some((_, t)) = T::accepted().iter().find(|(name, _)| name == s) {
                return Ok(Some(*t));
            }
        }
        let names: Vec<&str> = T::accepted().iter().map(|(n, _)| *n).collect();
        Err(self.err(key, one_of(&names, v)))
    }
}

/// `must be one of a, b, c; got 'x' (did you mean 'y'?)`
pub(crate) fn one_of(names: &[&str], got: &Value) -> String {
    let list = names.join(", ");
    match got {
        Value::String(s) => {
            let mut msg = format!("must be one of {list}; got {}", quote_word(s));
            if let Some(best) = suggest(s, names.iter().copied()) {
                msg.push_str(&format!(" (did you mean '{best}'?)"));
            }
            msg
        }
        other => format!("must be one of {list}; got {}", describe(other)),
    }
}
