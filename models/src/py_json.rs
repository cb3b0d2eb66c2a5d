//! `tojson` as transformers defines it for chat templates: Python's `json.dumps` with
//! `ensure_ascii=False` and the keys in their given order. minijinja's own filter writes
//! compact JSON (`{"a":1}`) and HTML-escapes `<`, `>`, `&` and `'`, so a tools-aware template
//! would render other bytes than transformers does (`{"a": 1}`).

use minijinja::value::Kwargs;
use minijinja::{Error, ErrorKind, Value};
use serde_json::Value as Json;

/// Layout options of `json.dumps`.
#[derive(Debug, Clone)]
pub struct Dumps {
    pub indent: Option<String>,
    pub ensure_ascii: bool,
    pub sort_keys: bool,
    pub item_separator: String,
    pub key_separator: String,
}

impl Default for Dumps {
    fn default() -> Self {
        Self {
            indent: None,
            ensure_ascii: false,
            sort_keys: false,
            item_separator: ", ".into(),
            key_separator: ": ".into(),
        }
    }
}

/// The filter: `x | tojson`, `x | tojson(indent=2)`, with `ensure_ascii`, `sort_keys` and
/// `separators` as Python accepts them.
pub fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let mut dumps = Dumps {
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ..Dumps::default()
    };
    dumps.indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(v.as_usize().ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be a count",
                )
            })?),
        }),
    };
    if dumps.indent.is_some() {
        // Python drops the space after `,` when indenting.
        dumps.item_separator = ",".into();
    }
    if let Some(separators) = kwargs.get::<Option<Value>>("separators")? {
        let pair: Vec<String> = separators
            .try_iter()?
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .unwrap_or_default();
        let [item, key] = <[String; 2]>::try_from(pair).map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            )
        })?;
        (dumps.item_separator, dumps.key_separator) = (item, key);
    }
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "tojson: cannot serialize").with_source(e)
    })?;
    Ok(Value::from_safe_string(dumps.dumps(&json)))
}

impl Dumps {
    pub fn dumps(&self, value: &Json) -> String {
        let mut out = String::new();
        self.write(value, 0, &mut out);
        out
    }

    fn write(&self, value: &Json, depth: usize, out: &mut String) {
        match value {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => out.push_str(&i.to_string()),
                (_, Some(u), _) => out.push_str(&u.to_string()),
                (_, _, Some(f)) => out.push_str(&float_repr(f)),
                _ => out.push_str(&n.to_string()),
            },
            Json::String(s) => self.write_str(s, out),
            Json::Array(items) => {
                let items: Vec<&Json> = items.iter().collect();
                self.write_container(('[', ']'), &items, depth, out, |v, d, o| {
                    self.write(v, d, o)
                });
            }
            Json::Object(map) => {
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                self.write_container(('{', '}'), &entries, depth, out, |(k, v), d, o| {
                    self.write_str(k, o);
                    o.push_str(&self.key_separator);
                    self.write(v, d, o);
                });
            }
        }
    }

    fn write_container<T: Copy>(
        &self,
        (open, close): (char, char),
        items: &[T],
        depth: usize,
        out: &mut String,
        mut write_item: impl FnMut(T, usize, &mut String),
    ) {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return;
        }
        for (i, &item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_separator);
            }
            self.newline(depth + 1, out);
            write_item(item, depth + 1, out);
        }
        self.newline(depth, out);
        out.push(close);
    }

    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }

    fn write_str(&self, s: &str, out: &mut String) {
        // serde_json escapes exactly what Python's encoder does with ensure_ascii=False.
        let quoted = serde_json::to_string(s).expect("strings serialize");
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, in positional notation for
/// exponents from -4 to 15 (with `.0` when integral), else `1.5e-07` / `1e+16`.
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    if (-4..16).contains(&exp) {
        let fixed = format!("{x}");
        if fixed.contains('.') {
            fixed
        } else {
            format!("{fixed}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn layout_matches_python_json_dumps() {
        let v = json!({"b": [1, 2.5, "é\n\"x\""], "a": {}, "c": [], "d": null, "e": true});
        // json.dumps(v, ensure_ascii=False)
        assert_eq!(
            Dumps::default().dumps(&v),
            r#"{"b": [1, 2.5, "é\n\"x\""], "a": {}, "c": [], "d": null, "e": true}"#
        );
        let indented = Dumps {
            indent: Some("  ".into()),
            item_separator: ",".into(),
            sort_keys: true,
            ..Dumps::default()
        };
        // json.dumps(v, ensure_ascii=False, indent=2, sort_keys=True)
        assert_eq!(
            indented.dumps(&v),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.5,\n    \"é\\n\\\"x\\\"\"\n  ],\n  \"c\": [],\n  \"d\": null,\n  \"e\": true\n}"
        );
        let ascii = Dumps {
            ensure_ascii: true,
            ..Dumps::default()
        };
        assert_eq!(ascii.dumps(&json!("é😀<")), r#""\u00e9\ud83d\ude00<""#);
    }

    #[test]
    fn floats_print_as_python_repr() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (123456789012345.0, "123456789012345.0"),
            (-2.5e20, "-2.5e+20"),
        ] {
            assert_eq!(float_repr(x), want, "{x}");
        }
    }
}
