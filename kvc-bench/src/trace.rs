//! Reader of Mooncake-format traces: JSON lines with `timestamp` (ms), `input_length`,
//! `output_length` and `hash_ids` (one id per 512 input tokens; equal ids at the same position
//! mean a shared prefix). Errors name the line and the field.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

/// Tokens covered by one Mooncake hash id.
pub const MOONCAKE_BLOCK_TOKENS: u32 = 512;

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRequest {
    /// Arrival, in milliseconds from the start of the trace.
    pub timestamp_ms: u64,
    /// Prompt tokens.
    pub input_length: u32,
    /// Generated tokens.
    pub output_length: u32,
    /// Prefix block ids, one per [`MOONCAKE_BLOCK_TOKENS`] prompt tokens (the last may be
    /// partial).
    pub hash_ids: Vec<u32>,
}

/// Why a trace could not be read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The file could not be opened or read.
    #[error("cannot read trace {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A line is not a JSON object.
    #[error("line {line}: not a JSON object: {message}")]
    NotJson {
        /// 1-based line number.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A required field is missing.
    #[error("line {line}: missing field `{field}`")]
    MissingField {
        /// 1-based line number.
        line: usize,
        /// The field.
        field: &'static str,
    },
    /// A field has the wrong type or an impossible value.
    #[error("line {line}: field `{field}`: {problem}")]
    BadField {
        /// 1-based line number.
        line: usize,
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The trace holds no request.
    #[error("the trace holds no request")]
    Empty,
}

/// Reads a trace file.
pub fn read_trace(path: &Path) -> Result<Vec<TraceRequest>, TraceError> {
    let file = File::open(path).map_err(|source| TraceError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_trace(BufReader::new(file)).map_err(|e| match e {
        TraceError::Io { source, .. } => TraceError::Io {
            path: path.to_owned(),
            source,
        },
        other => other,
    })
}

/// Parses a trace from JSON lines; blank lines are skipped. An empty trace is an error.
pub fn parse_trace(reader: impl BufRead) -> Result<Vec<TraceRequest>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let text = line.map_err(|source| TraceError::Io {
            path: PathBuf::new(),
            source,
        })?;
        if text.trim().is_empty() {
            continue;
        }
        out.push(parse_line(&text, line_no)?);
    }
    if out.is_empty() {
        return Err(TraceError::Empty);
    }
    Ok(out)
}

fn parse_line(text: &str, line: usize) -> Result<TraceRequest, TraceError> {
    let value: Value = serde_json::from_str(text).map_err(|e| TraceError::NotJson {
        line,
        message: e.to_string(),
    })?;
    let Value::Object(obj) = value else {
        return Err(TraceError::NotJson {
            line,
            message: "a JSON value that is not an object".into(),
        });
    };
    let field = |name: &'static str| {
        obj.get(name)
            .ok_or(TraceError::MissingField { line, field: name })
    };
    let uint = |name: &'static str, max: u64| -> Result<u64, TraceError> {
        let v = field(name)?;
        v.as_u64()
            .filter(|&n| n <= max)
            .ok_or_else(|| TraceError::BadField {
                line,
                field: name,
                problem: format!("expected an integer from 0 to {max}, found {v}"),
            })
    };
    let timestamp_ms = uint("timestamp", u64::MAX)?;
    let input_length = uint("input_length", u64::from(u32::MAX))? as u32;
    let output_length = uint("output_length", u64::from(u32::MAX))? as u32;
    let Value::Array(ids) = field("hash_ids")? else {
        return Err(TraceError::BadField {
            line,
            field: "hash_ids",
            problem: "expected an array of integers".into(),
        });
    };
    let mut hash_ids = Vec::with_capacity(ids.len());
    for (k, v) in ids.iter().enumerate() {
        let id = v
            .as_u64()
            .filter(|&n| n <= u64::from(u32::MAX))
            .ok_or_else(|| TraceError::BadField {
                line,
                field: "hash_ids",
                problem: format!(
                    "element {k} is {v}, expected an integer from 0 to {}",
                    u32::MAX
                ),
            })?;
        hash_ids.push(id as u32);
    }
    let covered = hash_ids.len() as u64 * u64::from(MOONCAKE_BLOCK_TOKENS);
    if u64::from(input_length) > covered {
        return Err(TraceError::BadField {
            line,
            field: "input_length",
            problem: format!(
                "{input_length} tokens but `hash_ids` covers only {covered} ({} ids of {MOONCAKE_BLOCK_TOKENS})",
                hash_ids.len()
            ),
        });
    }
    Ok(TraceRequest {
        timestamp_ms,
        input_length,
        output_length,
        hash_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<TraceRequest>, TraceError> {
        parse_trace(text.as_bytes())
    }

    #[test]
    fn reads_requests_and_skips_blank_lines() {
        let t = parse(
            "{\"timestamp\": 5, \"input_length\": 600, \"output_length\": 3, \"hash_ids\": [1, 2]}\n\n\
             {\"timestamp\": 9, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [7]}\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].hash_ids, [1, 2]);
        assert_eq!(t[1].timestamp_ms, 9);
    }

    #[test]
    fn errors_name_line_and_field() {
        let good =
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [0]}";
        let cases = [
            (
                "{\"timestamp\": 0, \"output_length\": 1, \"hash_ids\": [0]}",
                "input_length",
            ),
            (
                "{\"timestamp\": -1, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [0]}",
                "timestamp",
            ),
            (
                "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [\"x\"]}",
                "hash_ids",
            ),
            (
                "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": 3}",
                "hash_ids",
            ),
            (
                "{\"timestamp\": 0, \"input_length\": 513, \"output_length\": 1, \"hash_ids\": [0]}",
                "input_length",
            ),
        ];
        for (bad, want) in cases {
            let err = parse(&format!("{good}\n{bad}\n")).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("line 2:"), "{msg}");
            assert!(msg.contains(want), "{msg} should name {want}");
        }
        let err = parse(&format!("{good}\n{{not json\n")).unwrap_err();
        assert!(matches!(err, TraceError::NotJson { line: 2, .. }), "{err}");
    }

    #[test]
    fn empty_trace_is_an_error() {
        assert!(matches!(parse("\n  \n"), Err(TraceError::Empty)));
    }
}
