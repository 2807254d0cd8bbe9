//! The demo's score sheet: each step says what should happen and whether it did; the demo
//! fails (exit 1) when any step did not.

use crate::error::CliError;

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
    pub(crate) fn step(&mut self, what: &str, outcome: Result<String, String>) {
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
