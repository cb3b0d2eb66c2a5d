//! Parquet rows as JSON objects, so that Parquet datasets go through the same row parsers as
//! JSONL. Arrow types map to JSON the obvious way (strings, numbers, booleans, lists, structs,
//! string-keyed maps); binary columns must hold UTF-8 text; other types (dates, decimals, ...)
//! become their display strings. A null value is left out of its object, as if absent.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type,
    UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::{Map, Number, Value};

/// A value of one row that cannot be turned into JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellError {
    /// The column, as a path for nested values (`conversations[1].value`).
    pub field: String,
    pub reason: String,
}

/// Every row of a batch as a JSON object, or the first cell in it that could not be converted.
pub fn batch_rows(batch: &RecordBatch) -> Vec<Result<Value, CellError>> {
    let schema = batch.schema();
    (0..batch.num_rows())
        .map(|row| {
            let mut object = Map::new();
            for (field, column) in schema.fields().iter().zip(batch.columns()) {
                let value = cell(column.as_ref(), row, field.name())?;
                if !value.is_null() {
                    object.insert(field.name().clone(), value);
                }
            }
            Ok(Value::Object(object))
        })
        .collect()
}

fn float(x: f64) -> Value {
    // NaN and infinities have no JSON form.
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn utf8(bytes: &[u8], path: &str) -> Result<Value, CellError> {
    std::str::from_utf8(bytes)
        .map(|s| Value::String(s.to_string()))
        .map_err(|e| CellError {
            field: path.to_string(),
            reason: format!(
                "binary value is not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        })
}

fn list(values: ArrayRef, path: &str) -> Result<Value, CellError> {
    (0..values.len())
        .map(|i| cell(values.as_ref(), i, &format!("{path}[{i}]")))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// One cell as JSON. `path` names it in errors.
fn cell(array: &dyn Array, row: usize, path: &str) -> Result<Value, CellError> {
    if array.is_null(row) {
        return Ok(Value::Null);
    }
    let value = match array.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
        DataType::Int8 => array.as_primitive::<Int8Type>().value(row).into(),
        DataType::Int16 => array.as_primitive::<Int16Type>().value(row).into(),
        DataType::Int32 => array.as_primitive::<Int32Type>().value(row).into(),
        DataType::Int64 => array.as_primitive::<Int64Type>().value(row).into(),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().value(row).into(),
        DataType::UInt16 => array.as_primitive::<UInt16Type>().value(row).into(),
        DataType::UInt32 => array.as_primitive::<UInt32Type>().value(row).into(),
        DataType::UInt64 => array.as_primitive::<UInt64Type>().value(row).into(),
        DataType::Float16 => float(array.as_primitive::<Float16Type>().value(row).to_f64()),
        DataType::Float32 => float(f64::from(array.as_primitive::<Float32Type>().value(row))),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => array.as_string::<i32>().value(row).into(),
        DataType::LargeUtf8 => array.as_string::<i64>().value(row).into(),
        DataType::Utf8View => array.as_string_view().value(row).into(),
        DataType::Binary => return utf8(array.as_binary::<i32>().value(row), path),
        DataType::LargeBinary => return utf8(array.as_binary::<i64>().value(row), path),
        DataType::BinaryView => return utf8(array.as_binary_view().value(row), path),
        DataType::FixedSizeBinary(_) => return utf8(array.as_fixed_size_binary().value(row), path),
        DataType::List(_) => return list(array.as_list::<i32>().value(row), path),
        DataType::LargeList(_) => return list(array.as_list::<i64>().value(row), path),
        DataType::FixedSizeList(_, _) => return list(array.as_fixed_size_list().value(row), path),
        DataType::Struct(_) => {
            let strukt = array.as_struct();
            let mut object = Map::new();
            for (name, child) in strukt.column_names().into_iter().zip(strukt.columns()) {
                let value = cell(child.as_ref(), row, &format!("{path}.{name}"))?;
                if !value.is_null() {
                    object.insert(name.to_string(), value);
                }
            }
            Value::Object(object)
        }
        DataType::Map(_, _) => {
            let entries = array.as_map().value(row);
            let mut object = Map::new();
            for i in 0..entries.len() {
                let key = match cell(entries.column(0).as_ref(), i, path)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                let value = cell(entries.column(1).as_ref(), i, &format!("{path}.{key}"))?;
                object.insert(key, value);
            }
            Value::Object(object)
        }
        DataType::Dictionary(_, value_type) => {
            // Decode just this cell: casting a one-row slice keeps the cost per cell constant.
            let one = array.slice(row, 1);
            let plain = arrow::compute::cast(&one, value_type).map_err(|e| CellError {
                field: path.to_string(),
                reason: format!("cannot decode dictionary value: {e}"),
            })?;
            return cell(plain.as_ref(), 0, path);
        }
        _ => {
            let formatter =
                ArrayFormatter::try_new(array, &FormatOptions::default()).map_err(|e| {
                    CellError {
                        field: path.to_string(),
                        reason: format!("unsupported column type {}: {e}", array.data_type()),
                    }
                })?;
            Value::String(formatter.value(row).to_string())
        }
    };
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        BinaryArray, BooleanArray, Date32Array, DictionaryArray, Float64Array, Int64Array,
        LargeStringArray,
    };
    use arrow::datatypes::Int32Type;
    use serde_json::json;
    use std::sync::Arc;

    #[test]
    fn arrow_values_become_json_and_bad_binary_is_a_cell_error() {
        let dictionary: DictionaryArray<Int32Type> =
            vec!["user", "assistant"].into_iter().collect();
        let batch = RecordBatch::try_from_iter([
            (
                "n",
                Arc::new(Int64Array::from(vec![Some(7), None])) as ArrayRef,
            ),
            (
                "x",
                Arc::new(Float64Array::from(vec![0.5, f64::NAN])) as ArrayRef,
            ),
            (
                "ok",
                Arc::new(BooleanArray::from(vec![true, false])) as ArrayRef,
            ),
            (
                "s",
                Arc::new(LargeStringArray::from(vec!["a", "b"])) as ArrayRef,
            ),
            ("role", Arc::new(dictionary) as ArrayRef),
            ("day", Arc::new(Date32Array::from(vec![0, 1])) as ArrayRef),
            (
                "bytes",
                Arc::new(BinaryArray::from(vec![&b"text"[..], &b"\xFF"[..]])) as ArrayRef,
            ),
        ])
        .expect("batch");
        let rows = batch_rows(&batch);
        assert_eq!(
            rows[0],
            Ok(
                json!({"n": 7, "x": 0.5, "ok": true, "s": "a", "role": "user",
                      "day": "1970-01-01", "bytes": "text"})
            )
        );
        assert_eq!(
            rows[1],
            Err(CellError {
                field: "bytes".into(),
                reason: "binary value is not UTF-8 text (invalid byte at offset 0)".into(),
            })
        );
    }
}
