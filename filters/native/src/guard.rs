//! No unwinding across the FFI boundary: every hook Envoy calls runs its body through
//! [`guarded`], which turns a panic into the hook's fail-open answer.
//!
//! A Rust panic unwinding into Envoy's C++ frames is undefined behaviour; `catch_unwind` stops
//! it at the hook. The fallback itself runs guarded too, and so does the report (a log line),
//! so a panicking fallback or report ends in the hook's `last_resort` answer rather than an
//! unwind. This relies
//! on the crate being built with `panic = "unwind"` (Rust's default; the workspace sets no
//! other): under `panic = "abort"` a panic would abort Envoy instead.

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs `body`; if it panics, reports `hook` through `report` and answers `fallback()`, or
/// `last_resort` should the fallback panic as well.
pub fn guarded<R>(
    hook: &str,
    body: impl FnOnce() -> R,
    fallback: impl FnOnce() -> R,
    last_resort: R,
    report: impl FnOnce(&str),
) -> R {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            report(&format!("fulcrum_native: {hook} panicked; failing open"))
        }));
        catch_unwind(AssertUnwindSafe(fallback)).unwrap_or(last_resort)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_that_returns_answers_its_value() {
        let answer = guarded("hook", || 7, || 0, 0, |_| panic!("no report expected"));
        assert_eq!(answer, 7);
    }

    #[test]
    fn a_panicking_body_answers_the_fallback_and_is_reported() {
        let mut reported = String::new();
        let answer = guarded(
            "on_lb_choose_host",
            || -> Option<u32> { panic!("a bug") },
            || Some(0),
            None,
            |message| reported = message.to_owned(),
        );
        assert_eq!(answer, Some(0));
        assert_eq!(
            reported,
            "fulcrum_native: on_lb_choose_host panicked; failing open"
        );
    }

    #[test]
    fn a_panicking_fallback_and_report_answer_the_last_resort() {
        let answer = guarded(
            "hook",
            || -> u32 { panic!("body") },
            || panic!("fallback"),
            9,
            |_| panic!("report"),
        );
        assert_eq!(answer, 9);
    }
}
