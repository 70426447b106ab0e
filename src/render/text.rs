//! Text rendering with minijinja: variables, conditionals, loops, filters.
//!
//! One environment per call, configured the same way every time: strict undefined (a variable
//! missing from the message's variables is an error, also in `{% if %}` — test with `is defined`),
//! and auto-escaping chosen by the kind, not by a file name: HTML for `html`, JSON serialization
//! for `json`, none for `text` and `markdown`. Templates are small and rendered once per
//! delivery; compiling per call keeps this free of caches that an edit could make stale.

use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};

use super::{Kind, RenderError};

fn environment<'s>(kind: Kind) -> Environment<'s> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    let escape = match kind {
        Kind::Html => AutoEscape::Html,
        Kind::Json => AutoEscape::Json,
        Kind::Text | Kind::Markdown | Kind::Image => AutoEscape::None,
    };
    env.set_auto_escape_callback(move |_| escape);
    env
}

/// Parses `source` (the `part` — subject or body — of template `name`) without rendering it.
pub fn check(name: &str, part: &'static str, kind: Kind, source: &str) -> Result<(), RenderError> {
    let env = environment(kind);
    env.template_from_named_str(name, source)
        .map(|_| ())
        .map_err(|e| classify(name, part, source, &e))
}

/// Renders `source` with `vars` (a JSON object).
pub fn render(
    name: &str,
    part: &'static str,
    kind: Kind,
    source: &str,
    vars: &serde_json::Value,
) -> Result<String, RenderError> {
    let env = environment(kind);
    let tmpl = env
        .template_from_named_str(name, source)
        .map_err(|e| classify(name, part, source, &e))?;
    tmpl.render(Value::from_serialize(vars))
        .map_err(|e| classify(name, part, source, &e))
}

fn classify(name: &str, part: &'static str, source: &str, e: &minijinja::Error) -> RenderError {
    let at = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
    match e.kind() {
        ErrorKind::SyntaxError
        | ErrorKind::UnknownFilter
        | ErrorKind::UnknownTest
        | ErrorKind::UnknownFunction
        | ErrorKind::UnknownBlock
        | ErrorKind::BadEscape => RenderError::Syntax {
            template: name.to_string(),
            part,
            detail: format!("{}{at}", e.detail().unwrap_or("invalid syntax")),
        },
        ErrorKind::UndefinedError => RenderError::MissingVar {
            template: name.to_string(),
            part,
            // The span of the failing expression (`user.name`, `items | length`).
            var: e
                .range()
                .and_then(|r| source.get(r))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("?{at}")),
        },
        _ => RenderError::Render {
            template: name.to_string(),
            part,
            detail: format!("{}{at}", e.detail().unwrap_or("evaluation failed")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn variables_loops_filters() {
        let out = render(
            "t",
            "body",
            Kind::Text,
            "Hi {{ name | upper }}{% for i in items %} {{ i }}{% endfor %}{% if vip is defined %}!{% endif %}",
            &json!({"name": "ann", "items": [1, 2]}),
        )
        .unwrap();
        assert_eq!(out, "Hi ANN 1 2");
    }

    #[test]
    fn html_escapes_and_text_does_not() {
        let vars = json!({"x": "<script>a&b</script>"});
        let html = render("t", "body", Kind::Html, "<p>{{ x }}</p>", &vars).unwrap();
        assert_eq!(html, "<p>&lt;script&gt;a&amp;b&lt;&#x2f;script&gt;</p>");
        let text = render("t", "body", Kind::Text, "{{ x }}", &vars).unwrap();
        assert_eq!(text, "<script>a&b</script>");
    }

    #[test]
    fn json_serializes_values() {
        let vars = json!({"x": "say \"hi\"\n\\", "n": 3});
        let out = render(
            "t",
            "body",
            Kind::Json,
            r#"{"text": {{ x }}, "n": {{ n }}}"#,
            &vars,
        )
        .unwrap();
        let back: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back, json!({"text": "say \"hi\"\n\\", "n": 3}));
    }

    #[test]
    fn a_missing_variable_is_named() {
        let e = render("t", "body", Kind::Text, "Hi {{ user.name }}!", &json!({})).unwrap_err();
        assert_eq!(e.code(), "template-missing-var");
        assert!(e.to_string().contains("`user.name`"), "{e}");
        let e = render(
            "t",
            "body",
            Kind::Text,
            "{% if vip %}x{% endif %}",
            &json!({}),
        )
        .unwrap_err();
        assert_eq!(e.code(), "template-missing-var");
        assert!(e.to_string().contains("vip"), "{e}");
    }

    #[test]
    fn syntax_errors_are_refused() {
        let e = check("t", "body", Kind::Text, "Hi {{ name ").unwrap_err();
        assert_eq!(e.code(), "template-syntax");
        // minijinja looks filters up when rendering: still a syntax error, not a missing var.
        let e = render(
            "t",
            "body",
            Kind::Text,
            "{{ x | nosuchfilter }}",
            &json!({"x": 1}),
        )
        .unwrap_err();
        assert_eq!(e.code(), "template-syntax", "{e}");
        check(
            "t",
            "body",
            Kind::Html,
            "{% for a in b %}{{ a }}{% endfor %}",
        )
        .unwrap();
    }
}
