//! The pure parts of the benchmark harness (`cowherd-bench`): what a guest set looks like
//! ([`manifest`]), how much disk it takes ([`du`]), the order of the interleaved rounds
//! ([`schedule`]), the scale set's clones and changes ([`scale`]), the results, targets and
//! tables ([`report`]), and the build table of guests made from a template ([`build`]). The
//! binary runs the tools; everything here is testable without them.

pub mod build;
pub mod du;
pub mod manifest;
pub mod report;
pub mod scale;
pub mod schedule;
