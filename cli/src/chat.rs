//! `mipha-cli chat`: an interactive conversation in the terminal. A thin client
//! of [`mipha_models::Session`]: streams answers, Ctrl-C stops the current answer
//! and keeps the conversation, errors are printed and the chat goes on.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use mipha_models::{CancelToken, Engine, GenerateOptions, Session, StopReason, TurnStats};
use rustyline::error::ReadlineError;

const HELP: &str = "\
commands:
  /image PATH   attach a picture to your next question (repeat for several)
  /reset        start a new conversation
  /stats        timings of the last answer
  /set KEY VAL  change a setting: max-tokens, temperature, top-k, top-p, min-p,
                repeat-penalty, seed
  /help         this text
  /quit         leave (also Ctrl-D)
Ctrl-C stops an answer; the conversation keeps what was said.";

pub struct ChatOptions {
    pub images: Vec<PathBuf>,
    pub gen: GenerateOptions,
}

pub fn chat(engine: Arc<Engine>, mut opts: ChatOptions) -> Result<(), Box<dyn std::error::Error>> {
    let mut session = Session::new(engine.clone());
    let mut editor = rustyline::DefaultEditor::new()?;
    let cancel = CancelToken::new();
    {
        // Ctrl-C while answering cancels the answer; at the prompt the line
        // editor reads it as a key instead (raw mode), so this never quits.
        // Installed after the editor, whose own SIGINT handler it replaces.
        let c = cancel.clone();
        ctrlc::set_handler(move || c.cancel())?;
    }
    let mut last: Option<(TurnStats, StopReason)> = None;
    eprintln!(
        "mipha chat — {} ({}). /help for commands.",
        engine.file().path().display(),
        engine.backend_name()
    );
    for path in &opts.images {
        attach(&mut session, path);
    }
    loop {
        let prompt = if session.pending_images() > 0 {
            format!("[{} image(s)] > ", session.pending_images())
        } else {
            "> ".to_string()
        };
        let line = match editor.readline(&prompt) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "quit" | "exit" | "q" => break,
                "help" | "h" | "?" => println!("{HELP}"),
                "reset" => {
                    session.reset();
                    last = None;
                    println!("(new conversation)");
                }
                "stats" => match &last {
                    Some((st, stop)) => println!("{}", crate::stats_line(st, *stop)),
                    None => println!("(no answer yet)"),
                },
                "image" if !arg.trim().is_empty() => attach(&mut session, arg.trim().as_ref()),
                "image" => println!("usage: /image PATH"),
                "set" => match set(&mut opts.gen, arg) {
                    Ok(()) => println!("({})", arg.trim()),
                    Err(e) => eprintln!("error: {e}"),
                },
                other => println!("unknown command /{other}; /help lists them"),
            }
            continue;
        }
        cancel.reset();
        let mut out = std::io::stdout();
        let reply = session.ask(line, &opts.gen, Some(&cancel), |_, piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            true
        });
        match reply {
            Ok(r) => {
                if r.stop_reason == StopReason::Cancelled {
                    println!(" [stopped]");
                } else {
                    println!();
                }
                last = Some((r.stats, r.stop_reason));
            }
            Err(e) => eprintln!("error: {e}"),
        }
    }
    Ok(())
}

fn attach(session: &mut Session, path: &std::path::Path) {
    match session.attach_image(path) {
        Ok(()) => println!("(attached {})", path.display()),
        Err(e) => eprintln!("error: {e}"),
    }
}

/// `/set KEY VALUE`: one generation setting, validated like the command line's.
fn set(gen: &mut GenerateOptions, arg: &str) -> Result<(), String> {
    let mut words = arg.split_whitespace();
    let (Some(key), Some(value), None) = (words.next(), words.next(), words.next()) else {
        return Err("usage: /set KEY VALUE".into());
    };
    let float = || {
        value
            .parse::<f32>()
            .map_err(|_| format!("{key}: `{value}` is not a number"))
    };
    let int = || {
        value
            .parse::<u64>()
            .map_err(|_| format!("{key}: `{value}` is not a whole number"))
    };
    let mut next = gen.clone();
    let s = &mut next.sampling;
    match key {
        "max-tokens" => next.max_tokens = int()? as usize,
        "temperature" => s.temperature = float()?,
        "top-k" => s.top_k = int()? as usize,
        "top-p" => s.top_p = float()?,
        "min-p" => s.min_p = float()?,
        "repeat-penalty" => s.repeat_penalty = float()?,
        "seed" => s.seed = int()?,
        other => return Err(format!("unknown setting `{other}`; /help lists them")),
    }
    next.sampling.validate()?;
    *gen = next;
    Ok(())
}
