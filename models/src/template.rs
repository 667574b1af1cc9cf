//! The conversation template (`phi` in the authors' code: style TWO, `sep = " "`,
//! `sep2 = "<|endoftext|>"`), rendered as text segments and image slots.

use mipha_runtime::{Metadata, Result};

/// A piece of a rendered prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Text(String),
    /// the n-th image attached to the conversation
    Image(usize),
}

/// One exchange: a user message (with the images attached to it) and, once
/// answered, the assistant's reply.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Turn {
    pub user: String,
    /// how many images the user attached to this message
    pub images: usize,
    pub assistant: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChatTemplate {
    pub system: String,
    pub user_role: String,
    pub assistant_role: String,
    pub sep: String,
    pub sep2: String,
    pub image_placeholder: String,
}

impl ChatTemplate {
    /// Mipha's `phi` template.
    pub fn phi() -> Self {
        ChatTemplate {
            system: "A chat between a curious user and an artificial intelligence assistant. \
                     The assistant gives helpful, detailed, and polite answers to the user's questions."
                .into(),
            user_role: "USER".into(),
            assistant_role: "ASSISTANT".into(),
            sep: " ".into(),
            sep2: "<|endoftext|>".into(),
            image_placeholder: "<image>".into(),
        }
    }

    pub fn from_metadata(m: &Metadata) -> Result<Self> {
        let roles = m.get_str_array("chat.roles")?;
        if roles.len() != 2 {
            return Err(mipha_runtime::Error::Config(format!(
                "chat.roles must name 2 roles, found {}",
                roles.len()
            )));
        }
        Ok(ChatTemplate {
            system: m.get_str("chat.system")?.to_string(),
            user_role: roles[0].to_string(),
            assistant_role: roles[1].to_string(),
            sep: m.get_str("chat.sep")?.to_string(),
            sep2: m.get_str("chat.sep2")?.to_string(),
            image_placeholder: m
                .get_str("tokenizer.image_placeholder")
                .unwrap_or("<image>")
                .to_string(),
        })
    }

    /// `system sep ROLE: msg sep ROLE: answer sep2 … ASSISTANT:`; each image of a
    /// message becomes a slot followed by a newline before the message text, as
    /// the authors prepend `"<image>\n"`. The open assistant turn ends at the colon.
    pub fn render(&self, turns: &[Turn]) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut text = format!("{}{}", self.system, self.sep);
        let mut image = 0;
        for turn in turns {
            text.push_str(&self.user_role);
            text.push_str(": ");
            for _ in 0..turn.images {
                out.push(Segment::Text(std::mem::take(&mut text)));
                out.push(Segment::Image(image));
                image += 1;
                text.push('\n');
            }
            text.push_str(&turn.user);
            text.push_str(&self.sep);
            text.push_str(&self.assistant_role);
            text.push(':');
            if let Some(answer) = &turn.assistant {
                text.push(' ');
                text.push_str(answer);
                text.push_str(&self.sep2);
            }
        }
        out.push(Segment::Text(text));
        out.retain(|s| !matches!(s, Segment::Text(t) if t.is_empty()));
        out
    }
}
