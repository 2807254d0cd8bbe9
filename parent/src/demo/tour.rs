//! The demo's score sheet: each step says what should happen and whether it did; the demo
//! fails (exit 1) when any step did not.

use std::fmt;

use crate::error::CliError;

/// What a step did instead of what it should have: printed, and the step fails.
#[derive(Debug)]
pub(crate) struct Misbehaved(String);

impl Misbehaved {
    /// The step failed with `e`.
    pub(crate) fn because(e: impl fmt::Display) -> Self {
        Self(e.to_string())
    }

    /// Whether what happened mentions `needle`.
    pub(crate) fn says(&self, needle: &str) -> bool {
        self.0.contains(needle)
    }
}

impl From<String> for Misbehaved {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for Misbehaved {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<CliError> for Misbehaved {
    fn from(e: CliError) -> Self {
        Self(e.message)
    }
}

impl fmt::Display for Misbehaved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A step's outcome: what happened, when it behaved as it should.
pub(crate) type Outcome = Result<String, Misbehaved>;

/// Collects step outcomes and prints them as it goes.
#[derive(Debug, Default)]
pub(crate) struct Tour {
    passed: usize,
    failed: Vec<String>,
}

impl Tour {
    pub(crate) fn section(&self, title: &str) {
        println!("\n== {title}");
    }

    /// Records a step: `outcome` is Ok(what happened) when the step behaved as it should.
    pub(crate) fn step(&mut self, what: &str, outcome: Outcome) {
        match outcome {
            Ok(detail) => {
                self.passed += 1;
                println!("  ok   {what}\n         {detail}");
            }
            Err(detail) => {
                self.failed.push(what.to_owned());
                println!("  FAIL {what}\n         {detail}");
            }
        }
    }

    pub(crate) fn finish(self) -> Result<(), CliError> {
        println!();
        if self.failed.is_empty() {
            println!("demo: all {} steps behaved as they should", self.passed);
            Ok(())
        } else {
            Err(CliError::refused(format!(
                "demo: {} of {} steps did not behave as they should: {}",
                self.failed.len(),
                self.passed + self.failed.len(),
                self.failed.join("; ")
            )))
        }
    }
}
