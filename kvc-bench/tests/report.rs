//! The `kvc-bench report` command end to end at the smallest size: it writes `index.md` with
//! every section, valid SVG plots that the markdown links, and `report.json`; a bad trace path
//! is a one-line error.

use std::path::{Path, PathBuf};
use std::process::Command;

use kvc_bench::report::{REPORT_SCENARIOS, SECTION_HEADINGS};

fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kvc-report-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn report(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvc-bench"))
        .arg("report")
        .args(args)
        .output()
        .expect("the kvc-bench binary runs")
}

/// Checks that `svg` is one well-formed element tree rooted at `<svg>` whose numeric attribute
/// values are all finite; returns the number of elements.
fn check_svg(svg: &str) -> Result<usize, String> {
    if !svg.starts_with("<svg") {
        return Err("does not start with <svg".into());
    }
    if !svg.trim_end().ends_with("</svg>") {
        return Err("does not end with </svg>".into());
    }
    let mut stack: Vec<&str> = Vec::new();
    let mut elements = 0;
    let mut rest = svg;
    while let Some(open) = rest.find('<') {
        let close = rest[open..].find('>').ok_or("unterminated tag")? + open;
        let tag = &rest[open + 1..close];
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack.pop().ok_or(format!("</{name}> closes nothing"))?;
            if top != name.trim() {
                return Err(format!("</{name}> closes <{top}>"));
            }
        } else {
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name = body.split_whitespace().next().ok_or("empty tag")?;
            check_attributes(body)?;
            elements += 1;
            if !self_closing {
                stack.push(name);
            }
        }
        if stack.is_empty() && close + 1 < rest.len() && !rest[close + 1..].trim().is_empty() {
            return Err("content after the root element".into());
        }
        rest = &rest[close + 1..];
    }
    if let Some(open) = stack.last() {
        return Err(format!("<{open}> is never closed"));
    }
    Ok(elements)
}

/// Every number inside an attribute value parses and is finite (units such as `em` allowed).
fn check_attributes(tag: &str) -> Result<(), String> {
    let mut parts = tag.split('"');
    parts.next();
    while let Some(value) = parts.next() {
        for piece in value.split(|c: char| c.is_whitespace() || ",()ML".contains(c)) {
            let numeric = piece.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '.')
                || piece.eq_ignore_ascii_case("nan")
                || piece.eq_ignore_ascii_case("inf");
            // A length may carry a CSS unit (`0.76em`, `12px`, `50%`).
            let number = piece.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == '%');
            if numeric && !number.parse::<f64>().is_ok_and(f64::is_finite) {
                return Err(format!("attribute value `{value}` holds `{piece}`"));
            }
        }
        // Skip the text between this value and the next attribute's value.
        parts.next();
    }
    Ok(())
}

#[test]
fn svg_checker_rejects_broken_documents() {
    assert!(check_svg("<svg><rect x=\"1\"/></svg>").is_ok());
    assert!(check_svg("<svg><rect x=\"NaN\"/></svg>").is_err());
    assert!(check_svg("<svg><path d=\"M0,inf L1,2\"/></svg>").is_err());
    assert!(check_svg("<svg><g></svg>").is_err());
    assert!(check_svg("<svg></svg><svg></svg>").is_err());
    assert!(check_svg("<rect/>").is_err());
    assert!(check_svg("<svg><text dy=\"0.76em\">a</text></svg>").is_ok());
    assert!(check_svg("<svg><text dy=\"-infem\">a</text></svg>").is_err());
}

#[test]
fn smallest_report_writes_every_section_and_valid_plots() {
    let out = out_dir("tiny");
    let run = report(&["--tiny", "--out", out.to_str().expect("utf-8 temp path")]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "report failed: {stderr}");
    // Long steps show progress on stderr; stdout says where the report is.
    assert!(stderr.contains("scenario memory"), "{stderr}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("index.md"), "{stdout}");

    let index = std::fs::read_to_string(out.join("index.md")).expect("index.md written");
    for heading in SECTION_HEADINGS {
        assert!(index.contains(heading), "missing `{heading}`");
    }
    for scenario in REPORT_SCENARIOS {
        assert!(
            index.contains(&format!("### {scenario}\n")),
            "missing {scenario}"
        );
    }
    // "vs baseline" compares only rows of one workload: in qos-overload, critical traffic
    // alone and the surge are two workloads, each its own baseline.
    let row = |name: &str| {
        index
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row `{name}`"))
            .to_owned()
    };
    assert!(row("critical alone (no surge)").contains("| baseline |"));
    assert!(row("surge, no pinning").contains("| baseline |"));
    assert!(row("surge, adaptive memory reserve").contains("x |"));
    assert!(!row("surge, adaptive memory reserve").contains("| baseline |"));
    // QoS classes by name, and the one definition of the utilisation column under its table.
    assert!(index.contains("| critical |") && index.contains("| standard |"));
    assert!(index.contains("*Running tokens / slots in use:*"));
    // Every figure says where, when and how: the host's CPU, a date, the command.
    assert!(index.contains("**Machine:**") && index.contains("logical cores"));
    assert!(index.contains("**Measured:** 20") && index.contains(" UTC"));
    assert!(index.contains("**Reproduce:** `cargo run -p kvc-bench -- report --tiny`"));
    // The hit-rate section either has its curve or says why it was skipped; under CI=true a
    // missing trace fails, since a skipped section there would never be tested.
    if std::env::var("CI").as_deref() == Ok("true") {
        assert!(
            index.contains("hit-rate.svg"),
            "CI=true but no trace was found"
        );
    }
    assert!(index.contains("hit-rate.svg") || index.contains("Skipped: no trace"));

    // Every linked plot exists and is a well-formed SVG with finite numbers.
    let mut linked = 0;
    for line in index.lines().filter(|l| l.starts_with("![")) {
        let file = line
            .split_once("](")
            .and_then(|(_, rest)| rest.strip_suffix(')'))
            .expect("an image link");
        let svg = std::fs::read_to_string(out.join(file)).expect("linked plot exists");
        let elements = check_svg(&svg).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(elements > 5, "{file} draws almost nothing");
        linked += 1;
    }
    // Two or more per scenario, plus the bandwidth chart.
    assert!(linked > 2 * REPORT_SCENARIOS.len(), "{linked} plots");

    let json = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
    let data: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(data["mode"], "Tiny");
    assert_eq!(
        data["scenarios"].as_array().map(Vec::len),
        Some(REPORT_SCENARIOS.len())
    );
    let read = data["bandwidth"]["read_bytes_per_s"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(read > 0.0 && read.is_finite());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn an_unreadable_trace_is_a_one_line_error() {
    let out = out_dir("bad-trace");
    let run = report(&[
        "--tiny",
        "--trace",
        "/nonexistent/trace.jsonl",
        "--out",
        out.to_str().expect("utf-8 temp path"),
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("kvc-bench: trace /nonexistent/trace.jsonl"),
        "{stderr}"
    );
    assert!(!out.join("index.md").exists());
    let _ = std::fs::remove_dir_all(&out);
}
