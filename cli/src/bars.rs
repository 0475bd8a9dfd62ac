//! Progress bars on a terminal (indicatif), nothing elsewhere.

use std::io::IsTerminal;
use std::sync::Mutex;

use cowherd_unify::{Phase, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Draws one bar per phase on stderr when stderr is a terminal.
pub struct Bars {
    enabled: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    /// Bars on stderr unless `quiet` or stderr is not a terminal.
    pub fn new(quiet: bool) -> Bars {
        Bars {
            enabled: !quiet && std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
        }
    }
}

impl Progress for Bars {
    fn start(&self, phase: Phase, total: Option<u64>) {
        if !self.enabled {
            return;
        }
        let bar = match total {
            Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
        };
        let template = match (total.is_some(), phase.counts_bytes()) {
            (true, true) => {
                "{prefix:>6} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
            }
            (true, false) if phase == Phase::Upgrade => {
                "{prefix:>7} [{bar:40}] {pos}/{len} guests {elapsed}"
            }
            (true, false) => "{prefix:>6} [{bar:40}] {pos}/{len} files eta {eta}",
            (false, _) => "{prefix:>6} {spinner} {pos} files {per_sec}",
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_prefix(phase.name());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        if let Some(old) = self.bar.lock().expect("bar lock").replace(bar) {
            old.finish_and_clear();
        }
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = self.bar.lock().expect("bar lock").as_ref() {
            bar.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().expect("bar lock").take() {
            bar.finish_and_clear();
        }
    }
}
