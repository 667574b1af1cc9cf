//! `mipha-cli chat` driven end to end in a pseudo-terminal, as a person would:
//! attach an image, ask, watch the answer stream, Ctrl-C mid-answer, ask again,
//! `/stats`, `/reset`, `/quit`. The pty is the child's controlling terminal, so
//! Ctrl-C travels the real path (tty line discipline → SIGINT).

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod tiny_common;
use tiny_common::{fixture, tiny_a, BIN};

struct Pty {
    master: std::fs::File,
    rx: mpsc::Receiver<Vec<u8>>,
    seen: String,
    child: std::process::Child,
}

impl Pty {
    fn spawn(args: &[&std::ffi::OsStr]) -> Pty {
        let (mut m, mut s) = (0, 0);
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two fds into the locals; null name/termios are allowed.
        let rc =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(rc, 0, "openpty failed");
        // SAFETY: both fds were just opened and are owned here.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let master = std::fs::File::from(master);
        let mut reader = master.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.send(format!("\n<pty read error: {e}>").into_bytes());
                        break;
                    }
                }
            }
        });
        Pty {
            master,
            rx,
            seen: String::new(),
            child,
        }
    }

    /// Waits until `needle` appears after everything already consumed; returns
    /// the text up to and including it.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(at) = self.seen.find(needle) {
                let upto = at + needle.len();
                let out = self.seen[..upto].to_string();
                self.seen.drain(..upto);
                return out;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(bytes) => self.seen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => {
                    let pid = self.child.id();
                    let wchan = std::fs::read_dir(format!("/proc/{pid}/task"))
                        .map(|d| {
                            d.filter_map(|t| t.ok())
                                .map(|t| {
                                    std::fs::read_to_string(t.path().join("wchan"))
                                        .unwrap_or_default()
                                })
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    panic!(
                        "timed out waiting for {needle:?} (child {:?}, threads in {wchan}); screen so far:\n{}",
                        self.child.try_wait(),
                        self.seen
                    )
                }
            }
        }
    }

    /// Waits until at least `n` more characters have arrived.
    fn wait_chars(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.seen.chars().count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(bytes) => self.seen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => panic!("timed out waiting for output; so far:\n{}", self.seen),
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
        self.master.flush().unwrap();
    }

    fn line(&mut self, text: &str) {
        self.send(text.as_bytes());
        self.send(b"\r");
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        // a failed test must not leave the chat running
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn chat_in_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_a(dir.path());
    let image = fixture("chelsea.png");
    let mut t = Pty::spawn(&[
        "chat".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--max-tokens".as_ref(),
        "1500".as_ref(),
        "--ignore-eos".as_ref(),
    ]);
    t.expect("/help");
    t.expect("> ");

    t.line("/image /no/such/picture.png");
    t.expect("error:");
    t.expect("> ");
    t.line(&format!("/image {}", image.display()));
    t.expect("(attached");
    t.expect("[1 image(s)] > ");

    // A long answer, stopped with Ctrl-C once it is streaming.
    t.line("What is shown in this image?");
    // past the echo of the question, once the answer is streaming
    t.expect("image?");
    t.expect("\n");
    t.wait_chars(40);
    t.send(&[0x03]);
    t.expect("[stopped]");
    t.expect("> ");
    t.line("/stats");
    let stats = t.expect("stop: cancelled");
    assert!(stats.contains("1 image(s)"), "{stats}");

    // The conversation goes on: a short follow-up answers in full and reuses
    // the cache.
    t.line("/set max-tokens 5");
    t.expect("(max-tokens 5)");
    t.line("/set top-p 7");
    t.expect("error: top-p");
    t.line("Tell me more.");
    t.expect("more.");
    // the greedy 5-token answer holds no "> ", so this is the next prompt
    t.expect("> ");
    t.line("/stats");
    let stats = t.expect("stop: ");
    assert!(stats.contains("5 tokens"), "{stats}");
    assert!(stats.contains("reused"), "{stats}");
    assert!(!stats.contains(" 0 reused"), "{stats}");
    t.expect("max_tokens");

    t.line("/reset");
    t.expect("(new conversation)");
    t.expect("> ");
    t.line("/nonsense");
    t.expect("unknown command");
    t.line("/quit");
    let status = t.child.wait().unwrap();
    assert!(status.success(), "{status}");
}
