//! How every `keygate` verb prints: its result as text, or, under the global `--json`, as
//! exactly one JSON document on one line of stdout; a warning as a text line or a
//! `{"warning":{"message":…}}` line on stderr; a failure as `keygate: error: …` or as one
//! `{"error":{"code":…,"kind":…,"message":…}}` line on stderr. It decides only the format; what
//! a result holds is the verb's own serde struct, which carries no key material beyond the
//! public keys and fingerprints a verb exists to print. The format is chosen once, in `main`,
//! before any verb runs.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::error::CliError;

/// Set once by `main` from the global `--json` flag.
static JSON: AtomicBool = AtomicBool::new(false);

/// The two formats a verb's output can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Human-readable lines, as each verb words them.
    Text,
    /// One JSON document per result (per event for long-running verbs), one line each.
    Json,
}

/// Chooses the format for the rest of the process (`main`, from `--json`).
pub(crate) fn set_format(f: Format) {
    JSON.store(f == Format::Json, Ordering::Relaxed);
}

/// The format chosen by `main`.
pub(crate) fn format() -> Format {
    if JSON.load(Ordering::Relaxed) {
        Format::Json
    } else {
        Format::Text
    }
}

/// A verb's result: its JSON is the serde serialization, its text what `text` returns.
pub(crate) trait Report: Serialize {
    /// The result as human-readable text, each line ending in a newline.
    fn text(&self) -> String;
}

/// A result whose JSON and text are built apart: a verb whose JSON shape predates `--json`
/// (and is pinned by its tests and docs) keeps building it, and prints it through here.
pub(crate) struct Shown<J> {
    /// The JSON document.
    pub(crate) json: J,
    /// The text, each line ending in a newline.
    pub(crate) text: String,
}

impl<J: Serialize> Serialize for Shown<J> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(s)
    }
}

impl<J: Serialize> Report for Shown<J> {
    fn text(&self) -> String {
        self.text.clone()
    }
}

/// Prints a JSON document as one line in either format: for a verb's branch that runs only
/// under `--json` (a verb's own `--json` and the global one are one flag: clap sets both), such
/// as the `{"ok":false,…}` document `audit verify` prints beside its failure.
pub(crate) fn print_json(v: &impl Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string(v).map_err(|e| CliError::io("rendering the JSON output", e))? + "\n";
    print(&Shown { json: v, text })
}

/// `r` in format `f`: its text, or its JSON on one line ending in a newline.
pub(crate) fn render(r: &impl Report, f: Format) -> Result<String, CliError> {
    match f {
        Format::Text => Ok(r.text()),
        Format::Json => serde_json::to_string(r)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| CliError::io("rendering the JSON output", e)),
    }
}

/// Prints a verb's result (or one event of a long-running verb) on stdout and flushes it.
pub(crate) fn print(r: &impl Report) -> Result<(), CliError> {
    let s = render(r, format())?;
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes()).and_then(|()| out.flush()).map_err(|e| CliError::io("writing to stdout", e))
}

/// Prints, as text only, a step of a verb whose `--json` document comes at its end (and holds
/// the step): the line an operator wants as soon as it happens.
pub(crate) fn step(text: &str) -> Result<(), CliError> {
    match format() {
        Format::Json => Ok(()),
        Format::Text => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| CliError::io("writing to stdout", e))
        }
    }
}

/// Prints on stderr, as text only, a line that details a failure (the error line follows);
/// under `--json` the verb's document on stdout holds the same details.
pub(crate) fn detail(text: &str) {
    if format() == Format::Text {
        eprintln!("{text}");
    }
}

/// A warning line for stderr, without its newline: `text` as the verb words it, or
/// `{"warning":{"message":…}}` with `message`.
pub(crate) fn warning_line(text: &str, message: &str, f: Format) -> String {
    match f {
        Format::Text => text.to_owned(),
        Format::Json => serde_json::json!({ "warning": { "message": message } }).to_string(),
    }
}

/// Prints a warning on stderr: the verb's own `text`, or `message` in a JSON object.
pub(crate) fn warn(text: &str, message: &str) {
    eprintln!("{}", warning_line(text, message, format()));
}

/// The failure object `--json` prints on stderr.
#[derive(Serialize)]
struct ErrorObject<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: u8,
    kind: &'static str,
    message: &'a str,
}

/// A failure's line for stderr, without its newline.
pub(crate) fn error_line(e: &CliError, f: Format) -> String {
    match f {
        Format::Text => format!("keygate: error: {}", e.message),
        Format::Json => {
            let o = ErrorObject { error: ErrorBody { code: e.code, kind: e.kind(), message: &e.message } };
            // A struct of an integer and strings always serializes.
            serde_json::to_string(&o).unwrap_or_else(|_| String::from(r#"{"error":{"code":1,"kind":"refused"}}"#))
        }
    }
}

/// Prints a failure on stderr in the chosen format.
pub(crate) fn print_error(e: &CliError) {
    eprintln!("{}", error_line(e, format()));
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[derive(Serialize)]
    struct Example {
        path: String,
        count: u32,
    }

    impl Report for Example {
        fn text(&self) -> String {
            format!("wrote {} ({} entries)\n", self.path, self.count)
        }
    }

    #[test]
    fn a_result_is_its_text_or_one_line_of_json() {
        let r = Example { path: "a \"b\"\n".into(), count: 3 };
        assert_eq!(render(&r, Format::Text).expect("text"), "wrote a \"b\"\n (3 entries)\n");
        let j = render(&r, Format::Json).expect("json");
        assert_eq!(j.matches('\n').count(), 1, "{j}");
        assert!(j.ends_with('\n'));
        let v: Value = serde_json::from_str(&j).expect("one JSON document");
        assert_eq!(v, serde_json::json!({"path": "a \"b\"\n", "count": 3}));

        let shown = Shown { json: serde_json::json!({"ok": true}), text: "fine\n".into() };
        assert_eq!(render(&shown, Format::Text).expect("text"), "fine\n");
        assert_eq!(render(&shown, Format::Json).expect("json"), "{\"ok\":true}\n");
    }

    #[test]
    fn a_failure_is_one_line_or_one_json_object_with_its_code_and_kind() {
        let cases = [
            (CliError::refused("bundle refused: \"x\"\nsecond line"), 1, "refused"),
            (CliError::input("--pcr 99: no such PCR"), 2, "input"),
            (CliError::io("reading /x", "No such file"), 3, "io"),
            (CliError { code: 4, message: "the KRE is not serving: sealed".into() }, 4, "not_serving"),
            (CliError { code: 9, message: "other".into() }, 9, "error"),
        ];
        for (e, code, kind) in cases {
            assert_eq!(error_line(&e, Format::Text), format!("keygate: error: {}", e.message));
            let line = error_line(&e, Format::Json);
            assert!(!line.contains('\n'), "{line}");
            let v: Value = serde_json::from_str(&line).expect("one JSON object");
            assert_eq!(v, serde_json::json!({"error": {"code": code, "kind": kind, "message": e.message}}));
        }
    }

    #[test]
    fn a_warning_is_the_verbs_line_or_a_json_object() {
        assert_eq!(warning_line("warning: no --store", "no --store", Format::Text), "warning: no --store");
        let v: Value = serde_json::from_str(&warning_line("warning: no --store", "no --store", Format::Json))
            .expect("one JSON object");
        assert_eq!(v, serde_json::json!({"warning": {"message": "no --store"}}));
    }
}
