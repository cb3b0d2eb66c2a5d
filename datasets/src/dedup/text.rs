//! The text a row is compared on: chosen fields of its JSON (dot paths), or every string in it.

use serde_json::Value;

/// Keys left out when no fields are chosen: identifiers and provenance (tool call ids too),
/// which would make every row unique, and chat roles, which are structure rather than content.
pub const METADATA_KEYS: &[&str] = &[
    "id",
    "_id",
    "uuid",
    "idx",
    "source",
    "source_file",
    "meta",
    "metadata",
    "schemaVersion",
    "evol",
    "role",
    "from",
    "tool_call_id",
    "toolUseId",
];

/// Field selection: dot paths such as `instruction`, `messages.0.content` or `messages.content`
/// (an array in the middle of a path applies the rest of the path to every element). Empty =
/// every string leaf of the row except [`METADATA_KEYS`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields(pub Vec<String>);

impl Fields {
    pub fn parse(list: &[String]) -> Self {
        Self(
            list.iter()
                .flat_map(|s| s.split(','))
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    /// The row's text: the selected strings joined by newlines (numbers and booleans under a
    /// chosen path count too). An error names a chosen field the row lacks.
    pub fn extract(&self, row: &Value) -> Result<String, String> {
        let mut parts = Vec::new();
        if self.0.is_empty() {
            leaves(row, true, &mut parts);
        } else {
            for path in &self.0 {
                let segs: Vec<&str> = path.split('.').collect();
                // Present but empty ("" or []) is fine: it adds nothing.
                if !select(row, &segs, &mut parts) {
                    return Err(format!("field `{path}` is missing"));
                }
            }
        }
        Ok(parts.join("\n"))
    }
}

fn leaves(v: &Value, skip_meta: bool, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| leaves(x, skip_meta, out)),
        Value::Object(o) => {
            for (k, x) in o {
                if skip_meta && METADATA_KEYS.contains(&k.as_str()) {
                    continue;
                }
                leaves(x, skip_meta, out);
            }
        }
        _ => {}
    }
}

fn scalar_leaves(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Number(n) => out.push(n.to_string()),
        Value::Bool(b) => out.push(b.to_string()),
        other => leaves(other, false, out),
    }
}

/// Follows `segs` from `v`; false when the path does not exist.
fn select(v: &Value, segs: &[&str], out: &mut Vec<String>) -> bool {
    let Some((head, rest)) = segs.split_first() else {
        scalar_leaves(v, out);
        return true;
    };
    match v {
        Value::Object(o) => match o.get(*head) {
            Some(x) => select(x, rest, out),
            None => false,
        },
        Value::Array(a) => {
            if let Ok(i) = head.parse::<usize>() {
                return a.get(i).is_some_and(|x| select(x, rest, out));
            }
            // Apply the whole path to each element; present if any element has it.
            let mut any = false;
            for x in a {
                any |= select(x, segs, out);
            }
            any
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_takes_every_string_but_metadata() {
        let row = json!({"id": "x1", "instruction": "Add", "input": "", "output": "2", "n": 3});
        assert_eq!(Fields::default().extract(&row).unwrap(), "Add\n\n2");
    }

    #[test]
    fn paths_select_through_arrays() {
        let row = json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"text": "hello"}]}]});
        let f = Fields::parse(&["messages.0.content".into()]);
        assert_eq!(f.extract(&row).unwrap(), "hi");
        let f = Fields::parse(&["messages.content".into()]);
        assert_eq!(f.extract(&row).unwrap(), "hi\nhello");
        let f = Fields::parse(&["instruction".into()]);
        assert_eq!(
            f.extract(&row).unwrap_err(),
            "field `instruction` is missing"
        );
    }
}
