//! Skipping a test so that the skip shows.
//!
//! libtest captures what a passing test prints with `print!` and `eprint!`, so a test
//! that returns early because this machine cannot run it (no root, a program not
//! installed) would look like a pass. [`skipped`] writes its line straight to the
//! process's standard error, past libtest's capture, so every run's output says which
//! tests did not run and why:
//!
//! ```text
//! SKIPPED a_full_disk_leaves_no_vm_without_disk_and_no_temporary_file: mounting a small file system needs root
//! ```
//!
//! Test binaries include this file with `#[path = "…/testsupport/skip.rs"] mod skip;`.
#![allow(dead_code)]

use std::io::Write;

/// Reports on the real standard error that the running test is skipped, and why. The
/// test's name is that of its thread (libtest names each test's thread after it).
pub fn skipped(why: impl std::fmt::Display) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    let line = format!("SKIPPED {test}: {why}\n");
    let mut err = std::io::stderr().lock();
    // Nothing useful can be done if standard error is gone.
    let _ = err.write_all(line.as_bytes());
    let _ = err.flush();
}
