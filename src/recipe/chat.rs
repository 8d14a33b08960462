//! `chat_template:` as mergekit 0.1.5 reads it (`merge.py::_set_chat_template`): `auto` (the
//! template most of the input models have), a template name, or a Jinja template.
//!
//! The named templates are stamerge's own text (mergekit's files are LGPL-3.0): each renders every
//! conversation exactly as mergekit's file of the same name does under transformers' chat
//! template settings, whitespace included. `benches/peers/mergekit_fixture.py` renders both on a
//! set of conversations and records the text it checked in the fixture that `tests/recipes.rs`
//! reads, so a changed template fails the tests until it is checked again.

/// The named templates: (name, Jinja text).
pub const NAMED: &[(&str, &str)] = &[
    ("alpaca", include_str!("chat_templates/alpaca.jinja")),
    ("chatml", include_str!("chat_templates/chatml.jinja")),
    ("exaone", include_str!("chat_templates/exaone.jinja")),
    ("llama3", include_str!("chat_templates/llama3.jinja")),
    ("mistral", include_str!("chat_templates/mistral.jinja")),
];

#[derive(Clone, Debug, PartialEq)]
pub enum ChatTemplate {
    /// The template most input models have (ties: the first in recipe order).
    Auto,
    /// A named template.
    Named(&'static str),
    /// A Jinja template given in the recipe.
    Jinja(String),
}

impl ChatTemplate {
    /// mergekit's rules: `auto`; a short one-line name without `{` that names a template; else a
    /// Jinja template, which must be at least 20 characters and contain `{`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        if s.len() < 256 && !s.contains('\n') && !s.contains('{') {
            if let Some((name, _)) = NAMED.iter().find(|(n, _)| *n == s) {
                return Ok(Self::Named(name));
            }
        }
        if s.len() < 20 || !s.contains('{') {
            return Err(format!(
                "`{s}` is neither a template name ({}, or `auto` for the one most input models \
                 have) nor a Jinja template",
                NAMED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(Self::Jinja(s.to_string()))
    }

    /// The template's text (None for `auto`, which the plan resolves from the models).
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::Auto => None,
            Self::Named(n) => NAMED.iter().find(|(m, _)| m == n).map(|(_, t)| *t),
            Self::Jinja(t) => Some(t),
        }
    }

    /// How the plan names it.
    pub fn describe(&self) -> String {
        match self {
            Self::Auto => "auto".into(),
            Self::Named(n) => (*n).into(),
            Self::Jinja(t) => format!("a Jinja template of {} characters", t.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_auto_and_jinja_as_mergekit_reads_them() {
        assert_eq!(
            ChatTemplate::parse("chatml"),
            Ok(ChatTemplate::Named("chatml"))
        );
        assert_eq!(ChatTemplate::parse("auto"), Ok(ChatTemplate::Auto));
        let j = "{% for m in messages %}{{ m.content }}{% endfor %}";
        assert_eq!(ChatTemplate::parse(j), Ok(ChatTemplate::Jinja(j.into())));
        assert!(ChatTemplate::parse("vicuna")
            .unwrap_err()
            .contains("chatml"));
        assert!(
            ChatTemplate::parse("{{ x }}").is_err(),
            "under 20 characters"
        );
        assert!(ChatTemplate::parse(&"x".repeat(40)).is_err(), "no `{{`");
    }
}
