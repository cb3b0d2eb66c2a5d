//! Field access for row parsers: every failure names the JSON path of the field to blame
//! and says what was wrong, so a reject can be found and fixed by hand.

use serde_json::{Map, Value};

/// Why a row could not be parsed: the field (as a JSON path such as `messages[2].content`)
/// when one is to blame, and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fail {
    pub field: Option<String>,
    pub reason: String,
}

impl Fail {
    pub fn at(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            reason: reason.into(),
        }
    }

    pub fn row(reason: impl Into<String>) -> Self {
        Self {
            field: None,
            reason: reason.into(),
        }
    }
}

pub(crate) type Parsed<T> = Result<T, Fail>;

pub(crate) const MISSING: &str = "missing required field";

/// `prefix.key`, or just `key` at the top level.
pub(crate) fn key_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// `prefix[index]`.
pub(crate) fn index_path(prefix: &str, index: usize) -> String {
    format!("{prefix}[{index}]")
}

/// The JSON type of a value, with its article, for "expected X, found Y" messages.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn wrong_type(path: &str, expected: &str, found: &Value) -> Fail {
    Fail::at(
        path,
        format!("expected {expected}, found {}", type_name(found)),
    )
}

/// The row itself must be an object; anything else has no fields to read.
pub(crate) fn row_object(value: &Value) -> Parsed<&Map<String, Value>> {
    value.as_object().ok_or_else(|| {
        Fail::row(format!(
            "expected a JSON object per row, found {}",
            type_name(value)
        ))
    })
}

/// Same as [`row_object`] for nested objects (a message, a content part).
pub(crate) fn object_at<'a>(value: &'a Value, path: &str) -> Parsed<&'a Map<String, Value>> {
    value
        .as_object()
        .ok_or_else(|| wrong_type(path, "an object", value))
}

pub(crate) fn array_at<'a>(value: &'a Value, path: &str) -> Parsed<&'a [Value]> {
    value
        .as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| wrong_type(path, "an array", value))
}

pub(crate) fn str_at<'a>(value: &'a Value, path: &str) -> Parsed<&'a str> {
    value
        .as_str()
        .ok_or_else(|| wrong_type(path, "a string", value))
}

/// A field that must be present (null counts as missing: Parquet and pandas write absent
/// values as null).
pub(crate) fn required<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    prefix: &str,
) -> Parsed<&'a Value> {
    match obj.get(key) {
        Some(Value::Null) | None => Err(Fail::at(key_path(prefix, key), MISSING)),
        Some(v) => Ok(v),
    }
}

/// A field that may be absent or null.
pub(crate) fn optional<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    match obj.get(key) {
        Some(Value::Null) | None => None,
        Some(v) => Some(v),
    }
}

/// Fails when the text is empty or whitespace only: such a turn teaches nothing and usually
/// means a broken export.
pub(crate) fn non_empty(text: &str, path: &str) -> Parsed<()> {
    if text.is_empty() {
        Err(Fail::at(path, "empty content"))
    } else if text.trim().is_empty() {
        Err(Fail::at(path, "empty content (whitespace only)"))
    } else {
        Ok(())
    }
}

/// A required, non-empty string field.
pub(crate) fn required_text(obj: &Map<String, Value>, key: &str, prefix: &str) -> Parsed<String> {
    let path = key_path(prefix, key);
    let text = str_at(required(obj, key, prefix)?, &path)?;
    non_empty(text, &path)?;
    Ok(text.to_string())
}

/// An optional string field; absent, null and empty all mean "not given".
pub(crate) fn optional_text<'a>(obj: &'a Map<String, Value>, key: &str) -> Parsed<Option<&'a str>> {
    match optional(obj, key) {
        None => Ok(None),
        Some(v) => {
            let text = str_at(v, key)?;
            Ok((!text.trim().is_empty()).then_some(text))
        }
    }
}

/// Keys of `obj` not in `consumed`, kept so that nothing a reward function might use is lost.
pub(crate) fn extra_fields(obj: &Map<String, Value>, consumed: &[&str]) -> Map<String, Value> {
    obj.iter()
        .filter(|(k, _)| !consumed.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn required_text_names_the_field_and_the_problem() {
        let row = json!({"a": 3, "b": "  ", "c": null, "d": "ok"});
        let obj = row_object(&row).unwrap();
        let e = required_text(obj, "a", "").unwrap_err();
        assert_eq!(e, Fail::at("a", "expected a string, found a number"));
        let e = required_text(obj, "b", "messages[0]").unwrap_err();
        assert_eq!(
            e,
            Fail::at("messages[0].b", "empty content (whitespace only)")
        );
        assert_eq!(
            required_text(obj, "c", "").unwrap_err(),
            Fail::at("c", MISSING)
        );
        assert_eq!(
            required_text(obj, "zz", "").unwrap_err(),
            Fail::at("zz", MISSING)
        );
        assert_eq!(required_text(obj, "d", "").unwrap(), "ok");
    }

    #[test]
    fn a_row_must_be_an_object() {
        let e = row_object(&json!([1, 2])).unwrap_err();
        assert_eq!(e.field, None);
        assert_eq!(e.reason, "expected a JSON object per row, found an array");
    }
}
