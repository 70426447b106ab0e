//! Templates: messages whose subject and content are rendered from a stored template.
//!
//! A template (`sql/007_templates.sql`) has a name, a kind and immutable versions; a message built
//! from one (`api.send_template`) records the version and its variables in
//! `outbox.message_templates`. The daemon fetches those for a whole claim batch in one query
//! ([`crate::db::Db::claim`]) and renders each templated message just before its connector sees
//! it: the connector only ever gets finished text.
//!
//! Invariants: rendering is pure (same version + same variables → same text), so a retried or
//! reclaimed message is rendered identically and editing a template never changes a message
//! already built. A render error fails the message for good (it would fail the same way again):
//! `template-missing-var` names the variable, `template-syntax` the place; text with an
//! unresolved `{{ … }}` is never sent. Text kinds are here ([`text`]); picture cards (`image`)
//! in [`card`], with the font registry ([`fonts`]) the daemon loads once at start.

pub mod card;
pub mod fonts;
pub mod stage;
pub mod store;
pub mod text;

use crate::connector::{codes, DeliveryError};

/// A template kind, as stored in `outbox.templates.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Plain text: no escaping.
    Text,
    /// HTML: variables are HTML-escaped (`<`, `>`, `&`, quotes, `/`); `|safe` opts out.
    Html,
    /// Markdown: no escaping (markdown has no standard escape; give trusted values or use filters).
    Markdown,
    /// JSON (a body for the http connector): every printed value is serialized as JSON, so a
    /// string comes out quoted and escaped — write `"text": {{ name }}`, not `"{{ name }}"`.
    Json,
    /// A picture card: the body is a card spec (JSON, see [`card`]), rendered to a PNG.
    Image,
}

impl Kind {
    /// Parses a stored kind.
    pub fn parse(s: &str) -> Result<Kind, RenderError> {
        match s {
            "text" => Ok(Kind::Text),
            "html" => Ok(Kind::Html),
            "markdown" => Ok(Kind::Markdown),
            "json" => Ok(Kind::Json),
            "image" => Ok(Kind::Image),
            other => Err(RenderError::Unsupported(other.to_string())),
        }
    }

    /// Guesses the kind of a template file from its extension (`.card.json` is a picture card;
    /// `.html`, `.md`, `.json`; else text).
    pub fn from_path(path: &std::path::Path) -> Kind {
        let name = path.to_string_lossy();
        let name = name.strip_suffix(".j2").unwrap_or(&name);
        if name.ends_with(".card.json") {
            Kind::Image
        } else if name.ends_with(".html") || name.ends_with(".htm") {
            Kind::Html
        } else if name.ends_with(".md") || name.ends_with(".markdown") {
            Kind::Markdown
        } else if name.ends_with(".json") {
            Kind::Json
        } else {
            Kind::Text
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Html => "html",
            Kind::Markdown => "markdown",
            Kind::Json => "json",
            Kind::Image => "image",
        }
    }
}

/// One version of a template: what the daemon renders a message from.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub name: String,
    /// As stored (`text`, `html`, `markdown`, `json`, `image`).
    pub kind: String,
    pub version: i32,
    pub subject: Option<String>,
    pub body: String,
}

/// A claimed message's template and variables (a row of `outbox.message_templates_of`).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub template: Template,
    /// A JSON object.
    pub vars: serde_json::Value,
}

/// The rendered subject (when the template has one) and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: Option<String>,
    pub content: String,
}

/// Why a template could not be rendered (or saved). Display names the template and the place,
/// never the variables' values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The source does not parse (or uses an unknown filter/test).
    #[error("template {template}: syntax error in the {part}: {detail}")]
    Syntax {
        template: String,
        part: &'static str,
        detail: String,
    },
    /// A variable the template uses is not among the message's variables.
    #[error("template {template}: variable `{var}` is not defined (in the {part})")]
    MissingVar {
        template: String,
        part: &'static str,
        var: String,
    },
    /// Any other evaluation error (a filter given the wrong type, a loop over a number…).
    #[error("template {template}: cannot render the {part}: {detail}")]
    Render {
        template: String,
        part: &'static str,
        detail: String,
    },
    /// A kind no renderer handles.
    #[error("template kind `{0}` cannot be rendered here")]
    Unsupported(String),
    /// A picture card's spec is not valid, or names a font the daemon does not have.
    #[error("template {template}: bad picture card: {detail}")]
    Card { template: String, detail: String },
    /// A picture card's background image is missing or does not decode.
    #[error("template {template}: background: {detail}")]
    Background { template: String, detail: String },
}

impl RenderError {
    /// The stable error code stored in `outbox.attempts.error_code`.
    pub fn code(&self) -> &'static str {
        match self {
            RenderError::Syntax { .. } => codes::TEMPLATE_SYNTAX.code,
            RenderError::MissingVar { .. } => codes::TEMPLATE_MISSING_VAR.code,
            RenderError::Render { .. } => codes::TEMPLATE_RENDER.code,
            RenderError::Unsupported(_) => codes::TEMPLATE_UNSUPPORTED.code,
            RenderError::Card { .. } => codes::CARD_SPEC.code,
            RenderError::Background { .. } => codes::CARD_BACKGROUND.code,
        }
    }
}

/// Every stable error code of this module (all permanent), declared in `connector::codes`.
pub const ERROR_CODES: &[codes::Code] = &[
    codes::TEMPLATE_MISSING_VAR,
    codes::TEMPLATE_SYNTAX,
    codes::TEMPLATE_RENDER,
    codes::TEMPLATE_UNSUPPORTED,
    codes::CARD_SPEC,
    codes::CARD_BACKGROUND,
];

impl From<RenderError> for DeliveryError {
    fn from(e: RenderError) -> Self {
        DeliveryError::permanent(e.code(), e.to_string())
    }
}

/// Renders a job of a text kind: the subject (when the version has one) and the body. Picture
/// cards are rendered by [`card::Cards::render`], which needs the fonts.
pub fn render(job: &Job) -> Result<Rendered, RenderError> {
    let t = &job.template;
    let kind = Kind::parse(&t.kind)?;
    if kind == Kind::Image {
        return Err(RenderError::Unsupported(t.kind.clone()));
    }
    let subject = match &t.subject {
        // A subject is a header line, never escaped.
        Some(s) => Some(text::render(&t.name, "subject", Kind::Text, s, &job.vars)?),
        None => None,
    };
    let content = text::render(&t.name, "body", kind, &t.body, &job.vars)?;
    Ok(Rendered { subject, content })
}

/// Checks a template's sources before they are saved: both must parse (a card's body is its
/// spec, see [`card::CardSpec::parse`]).
pub fn check(name: &str, kind: Kind, subject: Option<&str>, body: &str) -> Result<(), RenderError> {
    if let Some(s) = subject {
        text::check(name, "subject", Kind::Text, s)?;
    }
    match kind {
        Kind::Image => card::CardSpec::parse(name, body).map(|_| ()),
        _ => text::check(name, "body", kind, body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(file: &str, kind: &str, subject: Option<&str>, body: &str, vars: &str) -> Rendered {
        render(&Job {
            template: Template {
                name: file.into(),
                kind: kind.into(),
                version: 1,
                subject: subject.map(str::to_string),
                body: body.into(),
            },
            vars: serde_json::from_str(vars).unwrap(),
        })
        .unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    /// The documented examples in conf/templates render with their vars files.
    #[test]
    fn the_examples_render() {
        let r = example(
            "welcome.html",
            "html",
            Some("Welcome, {{ user.name }}"),
            include_str!("../../conf/templates/welcome.html"),
            include_str!("../../conf/templates/welcome.vars.json"),
        );
        assert_eq!(r.subject.as_deref(), Some("Welcome, ann"));
        assert!(r.content.starts_with("<!DOCTYPE html>"), "{}", r.content);
        assert!(r.content.contains("<li>2 × Tea &amp; biscuits</li>"));
        assert!(r.content.contains("<b>NEXT10</b>"));
        let r = example(
            "notice.txt",
            "text",
            None,
            include_str!("../../conf/templates/notice.txt"),
            include_str!("../../conf/templates/notice.vars.json"),
        );
        assert_eq!(
            r.content,
            "Ann, your confirmation code is 482913. It expires in 10 minutes.\n"
        );
        let r = example(
            "hook.json",
            "json",
            None,
            include_str!("../../conf/templates/hook.json"),
            include_str!("../../conf/templates/hook.vars.json"),
        );
        let v: serde_json::Value = serde_json::from_str(&r.content).unwrap();
        assert_eq!(v["user"]["name"], "Ann \"the\" Admin");
        assert_eq!(v["tags"][1], "web");
    }

    #[test]
    fn codes_are_declared_once() {
        for e in [
            RenderError::Unsupported("video".into()),
            RenderError::Syntax {
                template: "t".into(),
                part: "body",
                detail: String::new(),
            },
        ] {
            assert!(ERROR_CODES.iter().any(|c| c.code == e.code()));
        }
        assert_eq!(
            Kind::parse("video").unwrap_err().code(),
            "template-unsupported"
        );
        assert_eq!(Kind::parse("image").unwrap(), Kind::Image);
    }

    /// The README's template code table lists every code, with its line of meaning.
    #[test]
    fn the_readme_lists_every_code() {
        let readme = include_str!("../../README.md");
        for codes::Code { code, meaning, .. } in ERROR_CODES {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{code}` | permanent |")))
                .unwrap_or_else(|| panic!("README has no row for {code}"));
            let first_words: String = meaning
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ");
            assert!(row.contains(&first_words), "{code}: {row}");
        }
    }
}
