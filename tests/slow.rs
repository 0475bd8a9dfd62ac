//! The long tests, in one binary so that they run side by side: the test harness runs the
//! tests of a binary in parallel (one a core), and the binaries one after another. The SIGKILL
//! loop of `unify` (`unify_crash`, the longest test) runs on one core while the other runs
//! the tests that mostly wait on the network — templates bootstrapped with mmdebstrap
//! (`build`), the fleet upgrade against the real archive (`upgrade`) — and the other writers'
//! kill loops (`kill_loops`).

mod common;

mod build;
mod kill_loops;
mod unify_crash;
mod upgrade;
