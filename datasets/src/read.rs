//! Reading whole dataset files: JSONL (optionally gzipped), JSON arrays and Parquet, with
//! format detection, per-row validation and rejects.
//!
//! Every non-blank input row ends up in exactly one of `rows` and `rejects`; blank lines are
//! skipped and not counted. Line numbers are 1-based physical lines for JSONL, the element
//! index + 1 for JSON arrays, and the row index + 1 for Parquet.

use crate::formats::fields::type_name;
use crate::formats::parquet_rows::batch_rows;
use crate::formats::{
    classify_row, detect, parse_row, row_note, truncate_raw, Format, DETECT_ROWS,
};
use crate::records::{Origin, Reject, Row};
use crate::strict_json;
use anyhow::{anyhow, bail, Context, Result};
use flate2::read::MultiGzDecoder;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Read};
use std::path::Path;

/// What [`read_file`] found in one file.
#[derive(Debug, Clone)]
pub struct ReadOutput {
    pub format: Format,
    pub rows: Vec<Row>,
    pub rejects: Vec<Reject>,
    /// File-level remarks (an unusual `schemaVersion`, rows that do not look like the
    /// detected format), each once per file with a count.
    pub warnings: Vec<String>,
    /// Non-blank input rows: `rows.len() + rejects.len()`.
    pub rows_read: usize,
}

/// A row-level problem found before format parsing (bad UTF-8, bad JSON, an unconvertible
/// Parquet cell).
struct Fault {
    field: Option<String>,
    reason: String,
}

/// One input row before format parsing.
struct SourceRow {
    line: usize,
    value: Result<Value, Fault>,
    /// The original text of the line (JSONL only), kept for rejects.
    raw_line: Option<String>,
}

type SourceRows = Box<dyn Iterator<Item = Result<SourceRow>>>;

const BOM: &[u8] = b"\xEF\xBB\xBF";
const GZIP_MAGIC: &[u8] = b"\x1F\x8B";

/// Reads a whole file. `format = None` detects the format from the first rows.
///
/// Containers: `.parquet` is Parquet; `.jsonl`/`.ndjson` is JSON lines; anything else (`.json`
/// included) is a JSON array when its first character is `[`, one row when the whole file is
/// a single JSON object, and JSON lines otherwise.
/// Gzip is recognised by its magic bytes (so `.jsonl.gz` and `.json.gz` both work). A UTF-8
/// BOM at the start and CRLF line endings are accepted.
///
/// Fails only for file-level problems (missing or unreadable file, corrupt gzip or Parquet,
/// a JSON array that does not parse, an undetectable format), with the path in the message.
pub fn read_file(path: &Path, format: Option<Format>) -> Result<ReadOutput> {
    let mut source = open_rows(path)?;
    let cannot_read = || format!("cannot read {}", path.display());

    // Detection needs the first parsable rows; keep everything read so far to process later.
    let mut head = Vec::new();
    while head.iter().filter(|r: &&SourceRow| r.value.is_ok()).count() < DETECT_ROWS {
        match source.next() {
            Some(row) => head.push(row.with_context(cannot_read)?),
            None => break,
        }
    }
    let sample: Vec<Value> = head
        .iter()
        .filter_map(|r| r.value.as_ref().ok().cloned())
        .collect();

    let mut warnings = Vec::new();
    let format = match format {
        Some(format) => format,
        None => {
            let format = detect(&sample).map_err(|e| {
                anyhow!(
                    "cannot detect the format of {}: {e}{}",
                    path.display(),
                    unparsable_hint(&head)
                )
            })?;
            let unlike = sample
                .iter()
                .filter(|v| classify_row(v) != Some(format))
                .count();
            if unlike > 0 {
                warnings.push(format!(
                    "{}: detected {format}, but {unlike} of the first {} rows do not look like \
                     it ({})",
                    path.display(),
                    sample.len(),
                    format.shape()
                ));
            }
            format
        }
    };

    let mut out = ReadOutput {
        format,
        rows: Vec::new(),
        rejects: Vec::new(),
        warnings,
        rows_read: 0,
    };
    let mut notes: Vec<(String, usize)> = Vec::new();
    for row in head.into_iter().map(Ok).chain(source) {
        let row = row.with_context(cannot_read)?;
        out.rows_read += 1;
        let origin = Origin {
            file: path.to_path_buf(),
            line: row.line,
        };
        let raw_line = row.raw_line.as_deref().map(truncate_raw);
        let value = match row.value {
            Ok(value) => value,
            Err(fault) => {
                out.rejects.push(Reject {
                    origin,
                    field: fault.field,
                    reason: fault.reason,
                    raw: raw_line,
                });
                continue;
            }
        };
        if let Some(note) = row_note(format, &value) {
            match notes.iter_mut().find(|(n, _)| *n == note) {
                Some((_, count)) => *count += 1,
                None => notes.push((note, 1)),
            }
        }
        match parse_row(format, &value, &origin) {
            Ok(record) => out.rows.push(Row { origin, record }),
            Err(mut reject) => {
                if raw_line.is_some() {
                    reject.raw = raw_line;
                }
                out.rejects.push(reject);
            }
        }
    }
    for (note, count) in notes {
        out.warnings.push(format!(
            "{}: {count} of {} rows: {note}",
            path.display(),
            out.rows_read
        ));
    }
    Ok(out)
}

/// When detection fails because no row parsed, says why the first one did not.
fn unparsable_hint(head: &[SourceRow]) -> String {
    match head
        .iter()
        .find_map(|r| r.value.as_ref().err().map(|f| (r.line, f)))
    {
        Some((line, fault)) if head.iter().all(|r| r.value.is_err()) => {
            format!("; no row could be read (line {line}: {})", fault.reason)
        }
        _ => String::new(),
    }
}

/// The rows of a file of any container; a file without any (blank lines only, or nothing)
/// is an error saying so.
fn open_rows(path: &Path) -> Result<SourceRows> {
    let mut rows = open_container(path)?.peekable();
    if rows.peek().is_none() {
        bail!("{} is empty: it holds no rows", path.display());
    }
    Ok(Box::new(rows))
}

fn open_container(path: &Path) -> Result<SourceRows> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.ends_with(".parquet") {
        return parquet_rows(path);
    }
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let is_gzip = reader
        .fill_buf()
        .with_context(|| format!("cannot read {}", path.display()))?
        .starts_with(GZIP_MAGIC);
    let named_gzip = name.ends_with(".gz");
    if named_gzip && !is_gzip {
        bail!(
            "{} is named .gz but is not gzip-compressed (it does not start with gzip's magic bytes); \
             rename it without .gz if it is plain text",
            path.display()
        );
    }
    let mut reader: Box<dyn BufRead> = if is_gzip {
        Box::new(BufReader::new(MultiGzDecoder::new(reader)))
    } else {
        Box::new(reader)
    };
    let head = reader
        .fill_buf()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if let Some(encoding) = utf16(head) {
        bail!(
            "{} is {encoding} text; burnish reads UTF-8 (convert it with `iconv -f UTF-16 -t UTF-8`)",
            path.display()
        );
    }
    let inner = name.strip_suffix(".gz").unwrap_or(&name);
    if inner.ends_with(".jsonl") || inner.ends_with(".ndjson") {
        return Ok(Box::new(JsonLines::new(reader)));
    }
    json_or_lines(path, reader)
}

/// Names UTF-16 text from its byte-order mark, or from the NUL bytes that ASCII characters
/// carry in it.
fn utf16(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"\xFF\xFE") {
        return Some("UTF-16 (little-endian)");
    }
    if head.starts_with(b"\xFE\xFF") {
        return Some("UTF-16 (big-endian)");
    }
    let sample = &head[..head.len().min(64) & !1];
    let zeros_at = |parity: usize| {
        sample
            .iter()
            .skip(parity)
            .step_by(2)
            .filter(|&&b| b == 0)
            .count()
    };
    let half = sample.len() / 2;
    match (zeros_at(0), zeros_at(1)) {
        (_, odd) if half >= 4 && odd == half => Some("UTF-16 (little-endian)"),
        (even, _) if half >= 4 && even == half => Some("UTF-16 (big-endian)"),
        _ => None,
    }
}

/// A `.json` (or unknown) file: a JSON array if it starts with `[`, a single object if the
/// whole file is one, JSON lines otherwise. It has to be parsed whole, so it is read into
/// memory.
fn json_or_lines(path: &Path, mut reader: Box<dyn BufRead>) -> Result<SourceRows> {
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let body = bytes.strip_prefix(BOM).unwrap_or(&bytes);
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        // One pretty-printed object is a one-row file, not lines of broken JSON; JSON lines
        // fail this parse at the end of their first line.
        if let Ok(value) = strict_json::from_slice(body) {
            return Ok(Box::new(std::iter::once(Ok(SourceRow {
                line: 1,
                value: Ok(value),
                raw_line: None,
            }))));
        }
    }
    if first != Some(&b'[') {
        return Ok(Box::new(JsonLines::new(Cursor::new(bytes))));
    }
    let elements: Vec<Value> = strict_json::array_from_slice(body).with_context(|| {
        format!(
            "{} starts with `[` but is not a valid JSON array",
            path.display()
        )
    })?;
    Ok(Box::new(elements.into_iter().enumerate().map(
        |(i, value)| {
            Ok(SourceRow {
                line: i + 1,
                value: Ok(value),
                raw_line: None,
            })
        },
    )))
}

fn parquet_rows(path: &Path) -> Result<SourceRows> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let batches = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|builder| builder.build())
        .with_context(|| format!("cannot read {} as Parquet", path.display()))?;
    let shown = path.display().to_string();
    let mut next_line = 0usize;
    let rows = batches.flat_map(move |batch| {
        let converted: Vec<Result<SourceRow>> = match batch {
            Err(e) => vec![Err(anyhow!("{shown} is not valid Parquet: {e}"))],
            Ok(batch) => batch_rows(&batch)
                .into_iter()
                .map(|value| {
                    next_line += 1;
                    Ok(SourceRow {
                        line: next_line,
                        value: value.map_err(|e| Fault {
                            field: Some(e.field),
                            reason: e.reason,
                        }),
                        raw_line: None,
                    })
                })
                .collect(),
        };
        converted
    });
    Ok(Box::new(rows))
}

/// JSON lines, read as bytes so that one line of bad UTF-8 rejects that line only.
struct JsonLines<R> {
    reader: R,
    line: usize,
    buf: Vec<u8>,
    /// `\n`, or `\r` for a file with bare carriage returns (classic Mac line endings).
    end: u8,
}

impl<R: BufRead> JsonLines<R> {
    fn new(mut reader: R) -> Self {
        // A CR inside JSON text is whitespace or a line end (strings escape it), so one
        // followed by anything but LF means the lines end with CR alone.
        let end = match reader.fill_buf() {
            Ok(head) => match head.iter().position(|&b| b == b'\r') {
                Some(at) if head.get(at + 1).is_some_and(|&b| b != b'\n') => b'\r',
                _ => b'\n',
            },
            Err(_) => b'\n',
        };
        Self {
            reader,
            line: 0,
            buf: Vec::new(),
            end,
        }
    }
}

impl<R: BufRead> Iterator for JsonLines<R> {
    type Item = Result<SourceRow>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            match self.reader.read_until(self.end, &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    return Some(Err(anyhow!(e).context(format!("at line {}", self.line + 1))))
                }
            }
            self.line += 1;
            let mut bytes = self.buf.as_slice();
            bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
            bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
            if self.end == b'\r' {
                bytes = bytes.strip_prefix(b"\n").unwrap_or(bytes);
            }
            if self.line == 1 {
                bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(Ok(parse_line(self.line, bytes)));
        }
    }
}

fn parse_line(line: usize, bytes: &[u8]) -> SourceRow {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            return SourceRow {
                line,
                value: Err(Fault {
                    field: None,
                    reason: format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1),
                }),
                raw_line: Some(String::from_utf8_lossy(bytes).into_owned()),
            }
        }
    };
    SourceRow {
        line,
        value: strict_json::from_str(text).map_err(|e| Fault {
            field: None,
            reason: json_error(&e),
        }),
        raw_line: Some(text.to_string()),
    }
}

/// serde's message with the column up front (its line is always 1 within one JSONL line).
fn json_error(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let message = full
        .rsplit_once(" at line ")
        .map_or(full.as_str(), |(message, _)| message);
    format!("invalid JSON at column {}: {message}", e.column())
}

/// One raw input row: its 1-based line (or element/row index + 1) and its JSON.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub line: usize,
    pub value: Value,
}

/// A file's rows as JSON objects, and the rows that are not.
#[derive(Debug, Clone, Default)]
pub struct RawRead {
    pub rows: Vec<RawRow>,
    pub rejects: Vec<Reject>,
}

/// Reads a file's rows as JSON objects without format parsing (for stages such as dedup that
/// keep rows as they are). Same containers and file-level errors as [`read_file`]; a row
/// that is not valid JSON, or not an object, is a reject with its line and reason.
pub fn read_raw(path: &Path) -> Result<RawRead> {
    let mut out = RawRead::default();
    for row in open_rows(path)? {
        let row = row.with_context(|| format!("cannot read {}", path.display()))?;
        let origin = Origin {
            file: path.to_path_buf(),
            line: row.line,
        };
        let raw = row.raw_line.as_deref().map(truncate_raw);
        match row.value {
            Ok(value) if value.is_object() => out.rows.push(RawRow {
                line: row.line,
                value,
            }),
            Ok(value) => out.rejects.push(Reject {
                origin,
                field: None,
                reason: format!("a row must be a JSON object, found {}", type_name(&value)),
                raw: raw.or_else(|| Some(truncate_raw(&value.to_string()))),
            }),
            Err(fault) => out.rejects.push(Reject {
                origin,
                field: fault.field,
                reason: fault.reason,
                raw,
            }),
        }
    }
    Ok(out)
}
