//! The conversation template (`phi` in the authors' code: style TWO, `sep = " "`,
//! `sep2 = "<|endoftext|>"`), rendered as text segments and image slots.

use mipha_runtime::{Metadata, Result};

/// A piece of a rendered prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// text, in which a special token's spelling is just text: what users
    /// write cannot end a turn or the answer
    Text(String),
    /// a control string the template itself inserts (`<|endoftext|>` after an
    /// answer): tokenized with special tokens recognised
    Special(String),
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
        let mut messages = Vec::with_capacity(2 * turns.len());
        for turn in turns {
            let mut content = vec![Part::Image; turn.images];
            content.push(Part::Text(turn.user.clone()));
            messages.push(Message {
                role: Role::User,
                content,
            });
            if let Some(answer) = &turn.assistant {
                messages.push(Message {
                    role: Role::Assistant,
                    content: vec![Part::Text(answer.clone())],
                });
            }
        }
        // A transcript may end with an answer (a restored conversation): it
        // renders whole, ready for the next question.
        self.render_chat(&messages, false)
            .expect("turns alternate user and assistant, pictures in user turns")
    }

    /// Renders a whole chat in the OpenAI message shape. System messages
    /// replace the default system prompt (several are joined by newlines);
    /// user and assistant messages alternate, consecutive messages of one role
    /// joining into one turn; the chat starts with a user message (after any
    /// system ones) and, since the model answers next, ends with one. Pictures
    /// go where they appear in a user message, each the next [`Segment::Image`];
    /// those that open a message are followed by a newline, as the authors
    /// prepend `"<image>\n"` (so a picture then a question renders exactly as
    /// [`ChatTemplate::render`] does). Says what is wrong with a chat it cannot
    /// render.
    pub fn render_messages(
        &self,
        messages: &[Message],
    ) -> std::result::Result<Vec<Segment>, String> {
        self.render_chat(messages, true)
    }

    fn render_chat(
        &self,
        messages: &[Message],
        user_last: bool,
    ) -> std::result::Result<Vec<Segment>, String> {
        let mut system: Option<String> = None;
        let mut turns: Vec<(Role, Vec<Part>)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::User && m.content.iter().any(|p| matches!(p, Part::Image)) {
                return Err(format!(
                    "message {i}: only user messages may hold pictures, not {} ones",
                    m.role.as_str()
                ));
            }
            match m.role {
                Role::System => {
                    let text = Part::text_of(&m.content);
                    match &mut system {
                        Some(s) => {
                            s.push('\n');
                            s.push_str(&text);
                        }
                        None => system = Some(text),
                    }
                }
                role => match turns.last_mut() {
                    Some((r, parts)) if *r == role => {
                        parts.push(Part::Text("\n".into()));
                        parts.extend(m.content.iter().cloned());
                    }
                    _ => turns.push((role, m.content.clone())),
                },
            }
        }
        match turns.first() {
            None => return Err("the chat has no user message".into()),
            Some((Role::Assistant, _)) => {
                return Err("the chat must start with a user message, not an assistant one".into())
            }
            _ => {}
        }
        if let (true, Some((Role::Assistant, _))) = (user_last, turns.last()) {
            return Err("the last message must be the user's (the model answers it)".into());
        }
        let mut out = Vec::new();
        let mut text = format!("{}{}", system.as_deref().unwrap_or(&self.system), self.sep);
        let mut image = 0;
        for (role, parts) in &turns {
            match role {
                Role::User => {
                    text.push_str(&self.user_role);
                    text.push_str(": ");
                    let mut leading = true;
                    for part in parts {
                        match part {
                            Part::Image => {
                                out.push(Segment::Text(std::mem::take(&mut text)));
                                out.push(Segment::Image(image));
                                image += 1;
                                if leading {
                                    text.push('\n');
                                }
                            }
                            Part::Text(t) => {
                                leading = false;
                                text.push_str(t);
                            }
                        }
                    }
                    text.push_str(&self.sep);
                    text.push_str(&self.assistant_role);
                    text.push(':');
                }
                Role::Assistant => {
                    text.push(' ');
                    text.push_str(&Part::text_of(parts));
                    out.push(Segment::Text(std::mem::take(&mut text)));
                    out.push(Segment::Special(self.sep2.clone()));
                }
                Role::System => unreachable!("system messages are taken out above"),
            }
        }
        out.push(Segment::Text(text));
        out.retain(|s| !matches!(s, Segment::Text(t) | Segment::Special(t) if t.is_empty()));
        Ok(out)
    }
}

/// Who wrote a [`Message`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A piece of a message: text, or the place of the chat's next picture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Image,
}

impl Part {
    fn text_of(parts: &[Part]) -> String {
        parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                Part::Image => None,
            })
            .collect()
    }
}

/// One message of a chat, for [`ChatTemplate::render_messages`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Part>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(parts: Vec<Part>) -> Message {
        Message {
            role: Role::User,
            content: parts,
        }
    }

    fn text(t: &str) -> Part {
        Part::Text(t.into())
    }

    #[test]
    fn a_picture_then_a_question_renders_as_a_turn_does() {
        let t = ChatTemplate::phi();
        let turns = [Turn {
            user: "What is it?".into(),
            images: 2,
            assistant: Some("A cat.".into()),
        }];
        let messages = [
            user(vec![Part::Image, Part::Image, text("What is it?")]),
            Message {
                role: Role::Assistant,
                content: vec![text("A cat.")],
            },
            user(vec![text("And?")]),
        ];
        let mut with_next = turns.to_vec();
        with_next.push(Turn {
            user: "And?".into(),
            ..Default::default()
        });
        assert_eq!(t.render_messages(&messages).unwrap(), t.render(&with_next));
    }

    #[test]
    fn pictures_go_where_they_appear_and_a_system_message_replaces_the_prompt() {
        let t = ChatTemplate::phi();
        let messages = [
            Message {
                role: Role::System,
                content: vec![text("Be brief.")],
            },
            user(vec![
                text("Compare "),
                Part::Image,
                text(" and "),
                Part::Image,
            ]),
        ];
        let s = t.render_messages(&messages).unwrap();
        assert_eq!(
            s,
            vec![
                Segment::Text("Be brief. USER: Compare ".into()),
                Segment::Image(0),
                Segment::Text(" and ".into()),
                Segment::Image(1),
                Segment::Text(" ASSISTANT:".into()),
            ]
        );
    }

    #[test]
    fn consecutive_messages_of_one_role_join() {
        let t = ChatTemplate::phi();
        let s = t
            .render_messages(&[user(vec![text("a")]), user(vec![text("b")])])
            .unwrap();
        assert_eq!(
            s,
            t.render(&[Turn {
                user: "a\nb".into(),
                ..Default::default()
            }])
        );
    }

    #[test]
    fn chats_that_cannot_be_rendered_say_why() {
        let t = ChatTemplate::phi();
        let assistant = Message {
            role: Role::Assistant,
            content: vec![text("hi")],
        };
        let system_picture = Message {
            role: Role::System,
            content: vec![Part::Image],
        };
        for (messages, why) in [
            (vec![], "no user message"),
            (
                vec![assistant.clone(), user(vec![text("x")])],
                "start with a user",
            ),
            (vec![user(vec![text("x")]), assistant], "last message"),
            (
                vec![system_picture, user(vec![text("x")])],
                "only user messages",
            ),
        ] {
            let e = t.render_messages(&messages).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
