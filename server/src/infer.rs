//! From a checked request to the engine and back: the generation options,
//! the submission, and the answer's text with stop strings cut out.

use std::time::Instant;

use mipha_models::{GenerateOptions, StopReason};

use crate::validation::ChatRequest;

/// The engine's options for `r`, ending at `deadline`.
pub fn options(r: &ChatRequest, deadline: Option<Instant>) -> GenerateOptions {
    GenerateOptions {
        // Without a limit, until the context ends (the engine stops there).
        max_tokens: r.max_tokens.unwrap_or(usize::MAX),
        sampling: r.sampling.clone(),
        ignore_eos: r.ignore_eos,
        deadline,
        // Clients' text is text: `<|endoftext|>` in a message cannot end a turn.
        parse_special: false,
    }
}

/// OpenAI's `finish_reason` for how a generation ended (`None`: it was
/// cancelled or timed out, which is not an answer).
pub fn finish_reason(stop: StopReason, by_stop_string: bool) -> Option<&'static str> {
    if by_stop_string {
        return Some("stop");
    }
    match stop {
        StopReason::Eos => Some("stop"),
        StopReason::MaxTokens | StopReason::ContextFull => Some("length"),
        StopReason::Cancelled | StopReason::Deadline => None,
    }
}

/// Streams text while cutting it at the first stop string: text that could
/// still turn out to start one is held back until it cannot.
#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        StopFilter {
            stops,
            pending: String::new(),
            stopped: false,
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds `piece`; returns the text that is now safe to send. After a stop
    /// string was found, returns nothing more.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.stopped = true;
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return out;
        }
        let hold = self
            .stops
            .iter()
            .map(|s| held_back(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        out
    }

    /// The text held back at the end (no stop string came).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Bytes at the end of `text` that are a proper prefix of `stop`.
fn held_back(text: &str, stop: &str) -> usize {
    stop.char_indices()
        .skip(1)
        .map(|(k, _)| k)
        .filter(|&k| text.ends_with(&stop[..k]))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            out.push_str(&f.push(p));
        }
        out.push_str(&f.finish());
        (out, f.stopped())
    }

    #[test]
    fn a_stop_string_across_pieces_is_cut() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
        assert_eq!(run(&["END"], &["hello E", "ND"]), ("hello ".into(), true));
    }

    #[test]
    fn text_that_only_looked_like_a_stop_comes_through() {
        assert_eq!(run(&["END"], &["a E", "x", "N"]), ("a ExN".into(), false));
        assert_eq!(run(&["END"], &["a EN"]), ("a EN".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_unicode_is_kept_whole() {
        assert_eq!(
            run(&["zz", "é!"], &["caf", "é", "! zz"]),
            ("caf".into(), true)
        );
        assert_eq!(run(&[], &["any", "thing"]), ("anything".into(), false));
    }

    #[test]
    fn nothing_is_held_back_that_cannot_start_a_stop() {
        let mut f = StopFilter::new(vec!["\n\nUSER".into()]);
        assert_eq!(f.push("word"), "word");
        assert_eq!(f.push(" more\n"), " more");
        assert_eq!(f.push("x"), "\nx");
    }
}
