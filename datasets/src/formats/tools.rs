//! Structured tool use in the three shapes users bring, read into one canonical form: tool
//! definitions as JSON schema (`{"type": "function", "function": {name, description?,
//! parameters}}`, transformers' `tools=`), assistant calls with a name and a JSON-object of
//! arguments, and `tool` results that answer them.
//!
//! - OpenAI: `tools`, assistant `tool_calls` (`arguments` a JSON string or an object), `tool`
//!   messages with `tool_call_id`;
//! - Bedrock Converse: `toolConfig.tools[].toolSpec` (`inputSchema.json`), `toolUse` blocks in
//!   assistant content, `toolResult` blocks (text or json content) in user content;
//! - ShareGPT (LLaMA-Factory): `tools` (a JSON string or a list), `function_call` turns whose
//!   value is `{"name", "arguments"}` JSON (or a list of them), `observation` turns.
//!
//! Calls without an id (ShareGPT) get `call_<n>`, n counting the row's calls from 0, so that
//! results can be paired with them and written back in formats that need ids.

use super::fields::{
    array_at, index_path, key_path, object_at, optional, required, str_at, type_name, wrong_type,
    Fail, Parsed,
};
use super::turns::{text_content, Roles, Turn};
use crate::records::{ToolCall, ASSISTANT, TOOL};
use serde_json::{json, Map, Value};

/// The row's tool definitions, from the format's own field; none when absent.
pub(crate) fn definitions(obj: &Map<String, Value>, roles: Roles) -> Parsed<Vec<Value>> {
    match roles {
        Roles::Bedrock => match optional(obj, "toolConfig") {
            None => Ok(Vec::new()),
            Some(config) => {
                let config = object_at(config, "toolConfig")?;
                let list = required(config, "tools", "toolConfig")?;
                array_at(list, "toolConfig.tools")?
                    .iter()
                    .enumerate()
                    .map(|(i, t)| bedrock_tool(t, &index_path("toolConfig.tools", i)))
                    .collect()
            }
        },
        Roles::OpenAi | Roles::ShareGpt => match optional(obj, "tools") {
            None => Ok(Vec::new()),
            // LLaMA-Factory stores the list as a JSON string.
            Some(Value::String(text)) => {
                let list: Value = serde_json::from_str(text).map_err(|e| {
                    Fail::at(
                        "tools",
                        format!("is a string but not a JSON list of tools: {e}"),
                    )
                })?;
                tool_list(&list, "tools")
            }
            Some(list) => tool_list(list, "tools"),
        },
    }
}

fn tool_list(list: &Value, path: &str) -> Parsed<Vec<Value>> {
    array_at(list, path)?
        .iter()
        .enumerate()
        .map(|(i, t)| function_tool(t, &index_path(path, i)))
        .collect()
}

/// `{"type": "function", "function": {"name", ..}}`, or the bare `{"name", ..}` that
/// LLaMA-Factory writes, as the wrapped form.
fn function_tool(tool: &Value, path: &str) -> Parsed<Value> {
    let obj = object_at(tool, path)?;
    let (function, function_path) = match optional(obj, "function") {
        Some(f) => {
            if let Some(kind) = optional(obj, "type") {
                let kind = str_at(kind, &key_path(path, "type"))?;
                if kind != "function" {
                    return Err(Fail::at(
                        key_path(path, "type"),
                        format!("tool type `{kind}` is not supported (only `function`)"),
                    ));
                }
            }
            (f, key_path(path, "function"))
        }
        None => (tool, path.to_string()),
    };
    let f = object_at(function, &function_path)?;
    let name_path = key_path(&function_path, "name");
    let name = str_at(required(f, "name", &function_path)?, &name_path)?;
    if name.trim().is_empty() {
        return Err(Fail::at(name_path, "empty tool name"));
    }
    Ok(json!({"type": "function", "function": function}))
}

/// `{"toolSpec": {"name", "description"?, "inputSchema": {"json": {..}}}}`.
fn bedrock_tool(tool: &Value, path: &str) -> Parsed<Value> {
    let spec_path = key_path(path, "toolSpec");
    let spec = object_at(
        required(object_at(tool, path)?, "toolSpec", path)?,
        &spec_path,
    )?;
    let name = str_at(
        required(spec, "name", &spec_path)?,
        &key_path(&spec_path, "name"),
    )?;
    let mut function = Map::new();
    function.insert("name".into(), name.into());
    if let Some(d) = optional(spec, "description") {
        let d = str_at(d, &key_path(&spec_path, "description"))?;
        function.insert("description".into(), d.into());
    }
    let schema_path = key_path(&spec_path, "inputSchema");
    let schema = object_at(required(spec, "inputSchema", &spec_path)?, &schema_path)?;
    let parameters = required(schema, "json", &schema_path)?;
    object_at(parameters, &key_path(&schema_path, "json"))?;
    function.insert("parameters".into(), parameters.clone());
    Ok(json!({"type": "function", "function": function}))
}

/// The name a canonical tool definition declares.
pub fn tool_name(tool: &Value) -> Option<&str> {
    tool.get("function")?.get("name")?.as_str()
}

/// Arguments as a JSON object: OpenAI writes a string holding one, others an object.
fn arguments(value: &Value, path: &str) -> Parsed<Map<String, Value>> {
    let parsed;
    let value = match value {
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| Fail::at(path, format!("the arguments are not valid JSON: {e}")))?;
            &parsed
        }
        other => other,
    };
    match value {
        Value::Object(map) => Ok(map.clone()),
        other => Err(Fail::at(
            path,
            format!(
                "the arguments must be a JSON object of named arguments, found {}",
                type_name(other)
            ),
        )),
    }
}

/// OpenAI `tool_calls`: `[{"id"?, "type": "function", "function": {"name", "arguments"}}]`.
pub(crate) fn openai_calls(value: &Value, path: &str) -> Parsed<Vec<ToolCall>> {
    let list = array_at(value, path)?;
    if list.is_empty() {
        return Err(Fail::at(path, "an empty list of tool calls"));
    }
    list.iter()
        .enumerate()
        .map(|(i, call)| {
            let call_path = index_path(path, i);
            let obj = object_at(call, &call_path)?;
            let id = optional(obj, "id")
                .map(|id| str_at(id, &key_path(&call_path, "id")).map(str::to_string))
                .transpose()?;
            let f_path = key_path(&call_path, "function");
            let f = object_at(required(obj, "function", &call_path)?, &f_path)?;
            named_call(f, &f_path, id)
        })
        .collect()
}

/// `{"name", "arguments"}` as a call.
fn named_call(obj: &Map<String, Value>, path: &str, id: Option<String>) -> Parsed<ToolCall> {
    let name = str_at(required(obj, "name", path)?, &key_path(path, "name"))?;
    let args_path = key_path(path, "arguments");
    let args = arguments(required(obj, "arguments", path)?, &args_path)?;
    Ok(ToolCall::function(id, name, args))
}

/// A ShareGPT `function_call` value: `{"name", "arguments"}` as JSON text, or a list of them
/// for parallel calls.
pub(crate) fn sharegpt_calls(text: &str, path: &str) -> Parsed<Vec<ToolCall>> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Fail::at(
            path,
            format!("a function_call must be JSON {{\"name\", \"arguments\"}}: {e}"),
        )
    })?;
    let calls = match &value {
        Value::Array(list) if !list.is_empty() => list.iter().collect(),
        Value::Object(_) => vec![&value],
        other => {
            return Err(wrong_type(
                path,
                "a JSON object {\"name\", \"arguments\"} or a list of them",
                other,
            ))
        }
    };
    calls
        .into_iter()
        .map(|call| named_call(object_at(call, path)?, path, None))
        .collect()
}

/// A Bedrock `toolUse` block: `{"toolUseId", "name", "input": {..}}`.
pub(crate) fn bedrock_call(value: &Value, path: &str) -> Parsed<ToolCall> {
    let obj = object_at(value, path)?;
    let id = str_at(
        required(obj, "toolUseId", path)?,
        &key_path(path, "toolUseId"),
    )?;
    let name = str_at(required(obj, "name", path)?, &key_path(path, "name"))?;
    let input_path = key_path(path, "input");
    let args = arguments(required(obj, "input", path)?, &input_path)?;
    Ok(ToolCall::function(Some(id.to_string()), name, args))
}

/// A Bedrock `toolResult` block: `{"toolUseId", "content": [{"text"} | {"json"}], "status"?}`
/// as the id it answers and its text (json content as compact JSON text).
pub(crate) fn bedrock_result(value: &Value, path: &str) -> Parsed<(String, String)> {
    let obj = object_at(value, path)?;
    let id = str_at(
        required(obj, "toolUseId", path)?,
        &key_path(path, "toolUseId"),
    )?;
    let content_path = key_path(path, "content");
    let content = required(obj, "content", path)?;
    let parts: Vec<Value> = match content {
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| {
                let part_path = index_path(&content_path, j);
                match object_at(part, &part_path)?.get("json") {
                    Some(json) => Ok(json!({ "text": json.to_string() })),
                    None => Ok(part.clone()),
                }
            })
            .collect::<Parsed<_>>()?,
        other => vec![other.clone()],
    };
    let text = match parts.as_slice() {
        [Value::String(_)] => text_content(&parts[0], &content_path)?,
        _ => text_content(&Value::Array(parts), &content_path)?,
    };
    Ok((id.to_string(), text))
}

/// Checks the calls against the definitions and pairs each result with the call it answers:
/// every call names a defined tool, every result answers an open call of the assistant turn
/// before it (by id, or the first open one when the format has no ids), and no call is left
/// without a result when the conversation moves on (the last turn's calls may be open: the
/// model learns to make them). Fills in missing call ids and the results' ids and names.
pub(crate) fn link(turns: &mut [Turn], tools: &[Value]) -> Parsed<()> {
    let names: Vec<&str> = tools.iter().filter_map(tool_name).collect();
    let mut open: Vec<(String, String, String)> = Vec::new(); // (id, name, path of the call)
    let mut count = 0;
    for turn in turns.iter_mut() {
        if turn.role != TOOL {
            if let Some((id, name, path)) = open.first() {
                return Err(Fail::at(
                    path.clone(),
                    format!(
                        "the call of tool `{name}` (id `{id}`) gets no result before the next \
                         `{}` turn",
                        turn.raw_role
                    ),
                ));
            }
        }
        if turn.role == ASSISTANT {
            for (call, call_path) in turn.tool_calls.iter_mut().zip(&turn.call_fields) {
                let name = &call.function.name;
                if !names.contains(&name.as_str()) {
                    let defined = if names.is_empty() {
                        "the row defines no tools".to_string()
                    } else {
                        format!("defined: {}", names.join(", "))
                    };
                    return Err(Fail::at(
                        call_path,
                        format!("calls tool `{name}`, which is not in the row's tools ({defined})"),
                    ));
                }
                let id = call
                    .id
                    .get_or_insert_with(|| format!("call_{count}"))
                    .clone();
                count += 1;
                open.push((id, name.clone(), call_path.clone()));
            }
        }
        if turn.role == TOOL {
            let at = match &turn.tool_call_id {
                Some(id) => open.iter().position(|(open_id, _, _)| open_id == id),
                None => (!open.is_empty()).then_some(0),
            };
            let Some(at) = at else {
                let answers = match &turn.tool_call_id {
                    Some(id) => format!("no open call has id `{id}`"),
                    None => "no call of the assistant turn before it is left to answer".into(),
                };
                return Err(Fail::at(
                    turn.role_field.clone(),
                    format!("a tool result without a call: {answers}"),
                ));
            };
            let (id, name, _) = open.remove(at);
            turn.tool_call_id = Some(id);
            turn.name = Some(name);
        }
    }
    Ok(())
}
