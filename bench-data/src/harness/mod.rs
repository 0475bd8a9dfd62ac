//! The pure parts of the benchmark harness (`cowherd-bench`): what a guest set looks like
//! ([`manifest`]), how much disk it takes ([`du`]), and the results, targets and tables
//! ([`report`]). The binary runs the tools; everything here is testable without them.

pub mod du;
pub mod manifest;
pub mod report;
