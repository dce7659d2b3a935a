//! Reader of Mooncake-format traces: JSON lines with `timestamp` (ms), `input_length`,
//! `output_length` and `hash_ids` (one id per 512 input tokens; equal ids at the same position
//! mean a shared prefix). Errors name the line and the field.
//!
//! The reader is bounded, so a wrong file gets an error rather than exhausting memory: a line
//! may hold at most [`MAX_LINE_BYTES`], a request at most [`MAX_REQUEST_TOKENS`] prompt or
//! output tokens, and a trace at most [`MAX_REQUESTS`] requests.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

/// Tokens covered by one Mooncake hash id.
pub const MOONCAKE_BLOCK_TOKENS: u32 = 512;

/// The longest line the reader accepts, in bytes (4 MiB: a request of
/// [`MAX_REQUEST_TOKENS`] prompt tokens lists 2,048 hash ids, a few kilobytes of JSON).
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// The most prompt tokens, and separately the most output tokens, one request may have
/// (1,048,576 = 2²⁰; the longest context of a published model today is 10M tokens, but no
/// trace replay here can serve a request beyond a million tokens).
pub const MAX_REQUEST_TOKENS: u32 = 1 << 20;

/// The most requests a trace may hold (16,777,216 = 2²⁴, over a thousand times the Mooncake
/// conversation trace's 12,031).
pub const MAX_REQUESTS: usize = 1 << 24;

/// Where kvc looks for the Mooncake conversation trace when no `--trace` is given, relative to
/// the repository root (or the working directory): `../shared/traces/` beside the checkout.
///
/// The trace is the conversation workload of the Mooncake project's FAST'25 trace release
/// (kvcache-ai/Mooncake, `FAST25-release/traces/conversation_trace.jsonl`, Apache-2.0): 12,031
/// requests from an hour of production chat traffic. It is not in the repository; download it
/// to that path, or pass `--trace PATH`.
pub const DEFAULT_TRACE: &str = "../shared/traces/mooncake-conversation.jsonl";

/// The default trace if it is present: [`DEFAULT_TRACE`] from the working directory, then from
/// the repository root, as a tidy absolute path.
#[must_use]
pub fn find_default_trace() -> Option<PathBuf> {
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    [
        Path::new(".").join(DEFAULT_TRACE),
        repo_root.join(DEFAULT_TRACE),
    ]
    .into_iter()
    .find(|p| p.is_file())
    // `…/kvc-bench/../../shared/…` reads badly in messages: name the file by its real path.
    .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}

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
    /// A line is longer than [`MAX_LINE_BYTES`] (for example a binary file).
    #[error("line {line}: longer than {max} bytes; is this a Mooncake JSONL trace?")]
    LineTooLong {
        /// 1-based line number.
        line: usize,
        /// The limit.
        max: usize,
    },
    /// A line is not UTF-8 text (for example a binary file).
    #[error("line {line}: not UTF-8 text; is this a Mooncake JSONL trace?")]
    NotText {
        /// 1-based line number.
        line: usize,
    },
    /// The trace holds more than [`MAX_REQUESTS`] requests.
    #[error("line {line}: the trace holds more than {max} requests")]
    TooManyRequests {
        /// 1-based line number of the first request over the limit.
        line: usize,
        /// The limit.
        max: usize,
    },
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

/// Parses a trace from JSON lines; blank lines are skipped. An empty trace is an error, and so
/// is a line over [`MAX_LINE_BYTES`], a line that is not UTF-8, or more than [`MAX_REQUESTS`]
/// requests.
pub fn parse_trace(mut reader: impl BufRead) -> Result<Vec<TraceRequest>, TraceError> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let io = |source| TraceError::Io {
        path: PathBuf::new(),
        source,
    };
    for line_no in 1.. {
        buf.clear();
        // Reads at most one byte past the limit, so a file without newlines (a binary, or
        // /dev/zero) costs MAX_LINE_BYTES of memory and no more.
        let limit = (MAX_LINE_BYTES + 1) as u64;
        let n = reader
            .by_ref()
            .take(limit)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else if buf.len() > MAX_LINE_BYTES {
            return Err(TraceError::LineTooLong {
                line: line_no,
                max: MAX_LINE_BYTES,
            });
        }
        let text = std::str::from_utf8(&buf).map_err(|_| TraceError::NotText { line: line_no })?;
        if text.trim().is_empty() {
            continue;
        }
        if out.len() == MAX_REQUESTS {
            return Err(TraceError::TooManyRequests {
                line: line_no,
                max: MAX_REQUESTS,
            });
        }
        out.push(parse_line(text, line_no)?);
    }
    if out.is_empty() {
        return Err(TraceError::Empty);
    }
    Ok(out)
}

/// The parser's message with its position as a column: each trace line is parsed alone, so
/// serde_json's own "line 1" would contradict the trace's line number beside it.
fn json_problem(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    match message.strip_suffix(&position) {
        Some(problem) if e.line() == 1 => format!("{problem} at column {}", e.column()),
        _ => message,
    }
}

fn parse_line(text: &str, line: usize) -> Result<TraceRequest, TraceError> {
    let value: Value = serde_json::from_str(text).map_err(|e| TraceError::NotJson {
        line,
        message: json_problem(&e),
    })?;
    let Value::Object(obj) = value else {
        let found = match value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        };
        return Err(TraceError::NotJson {
            line,
            message: format!("found {found}"),
        });
    };
    let field = |name: &'static str| {
        obj.get(name)
            .ok_or(TraceError::MissingField { line, field: name })
    };
    let uint = |name: &'static str, max: u64| -> Result<u64, TraceError> {
        let v = field(name)?;
        match v.as_u64() {
            Some(n) if n <= max => Ok(n),
            Some(n) => Err(TraceError::BadField {
                line,
                field: name,
                problem: format!("{n} is over the limit of {max}"),
            }),
            None => Err(TraceError::BadField {
                line,
                field: name,
                problem: format!("expected an integer from 0 to {max}, found {v}"),
            }),
        }
    };
    let timestamp_ms = uint("timestamp", u64::MAX)?;
    let max_tokens = u64::from(MAX_REQUEST_TOKENS);
    let input_length = uint("input_length", max_tokens)? as u32;
    let output_length = uint("output_length", max_tokens)? as u32;
    let Value::Array(ids) = field("hash_ids")? else {
        return Err(TraceError::BadField {
            line,
            field: "hash_ids",
            problem: "expected an array of integers".into(),
        });
    };
    let mut hash_ids = Vec::with_capacity(ids.len().min(MAX_LINE_BYTES / 2));
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
        // One position per message: the trace's line, and the column within it.
        assert_eq!(
            err.to_string(),
            "line 2: not a JSON object: key must be a string at column 2"
        );
        let err = parse(&format!("{good}\n[1, 2]\n")).unwrap_err();
        assert_eq!(err.to_string(), "line 2: not a JSON object: found an array");
    }

    #[test]
    fn oversized_requests_and_binary_input_are_errors_with_a_line_number() {
        let good =
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [0]}";
        let huge = format!(
            "{{\"timestamp\": 0, \"input_length\": {}, \"output_length\": 1, \"hash_ids\": [0]}}",
            u32::MAX
        );
        let msg = parse(&format!("{good}\n{huge}\n")).unwrap_err().to_string();
        assert!(
            msg.starts_with("line 2:") && msg.contains("input_length") && msg.contains("1048576"),
            "{msg}"
        );
        let long_output = good.replace("\"output_length\": 1", "\"output_length\": 1048577");
        let msg = parse(&long_output).unwrap_err().to_string();
        assert!(
            msg.contains("output_length") && msg.contains("limit"),
            "{msg}"
        );

        let mut binary = format!("{good}\n").into_bytes();
        binary.extend_from_slice(&[0xff, 0xfe, 0x00, b'{', b'\n']);
        let err = parse_trace(&binary[..]).unwrap_err();
        assert!(matches!(err, TraceError::NotText { line: 2 }), "{err}");

        // A file without newlines (a binary, /dev/zero) stops at the line limit.
        let zeros = std::io::repeat(0).take(3 * MAX_LINE_BYTES as u64);
        let err = parse_trace(BufReader::new(zeros)).unwrap_err();
        assert!(
            matches!(err, TraceError::LineTooLong { line: 1, .. }),
            "{err}"
        );
        // A line of exactly the limit is read (and then judged as JSON).
        let mut exact = vec![b' '; MAX_LINE_BYTES - good.len()];
        exact.extend_from_slice(good.as_bytes());
        assert_eq!(parse_trace(&exact[..]).unwrap().len(), 1);
    }

    #[test]
    fn empty_trace_is_an_error() {
        assert!(matches!(parse("\n  \n"), Err(TraceError::Empty)));
    }
}
