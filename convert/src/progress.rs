use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-counting bar on stderr, drawn only when asked for and stderr is a terminal
/// (logs and pipes get no control characters).
pub fn bar(enabled: bool, total: u64, prefix: &'static str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    if enabled && std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::stderr());
    }
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {msg} {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}
