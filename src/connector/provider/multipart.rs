//! `multipart/form-data` (RFC 7578) with one file part, as media upload endpoints take it
//! (WeCom `media/upload`, DingTalk `media/upload`: field `media`), optionally after text fields
//! (Telegram `sendPhoto`: `chat_id`, `caption`, then `photo`). Built by hand: one file does not
//! justify reqwest's multipart feature and its dependencies.

/// The `Content-Type` header value and the body of a form whose only part is the file `bytes`
/// in field `field`, named `filename` (quotes, CR and LF in it are replaced by `_`), with a
/// `filelength` parameter as WeCom documents it and the part's `content_type`.
pub fn file_form(
    field: &str,
    filename: &str,
    content_type: &str,
    bytes: &[u8],
) -> (String, Vec<u8>) {
    form(&[], field, filename, content_type, bytes)
}

/// As [`file_form`], with text `fields` (name, value) before the file part. Names and values are
/// the caller's (field names are constants; values may hold anything but the boundary, which is
/// random).
pub fn form(
    fields: &[(&str, &str)],
    field: &str,
    filename: &str,
    content_type: &str,
    bytes: &[u8],
) -> (String, Vec<u8>) {
    let boundary = format!("outboxd-{}", uuid::Uuid::new_v4().simple());
    let name: String = filename
        .chars()
        .map(|c| {
            if matches!(c, '"' | '\r' | '\n' | '\\') {
                '_'
            } else {
                c
            }
        })
        .collect();
    let mut body = Vec::with_capacity(bytes.len() + 256);
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; \
             filename=\"{name}\"; filelength={}\r\nContent-Type: {content_type}\r\n\r\n",
            bytes.len()
        )
        .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_part_framed_by_the_boundary() {
        let (ct, body) = file_form("media", "a\"b.png", "image/png", b"\x89PNG");
        let boundary = ct.strip_prefix("multipart/form-data; boundary=").unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with(&format!("--{boundary}\r\n")), "{text}");
        assert!(text.contains(
            "Content-Disposition: form-data; name=\"media\"; filename=\"a_b.png\"; filelength=4\r\n"
        ));
        assert!(text.contains("Content-Type: image/png\r\n\r\n"));
        assert!(body.ends_with(format!("\r\n--{boundary}--\r\n").as_bytes()));
    }

    #[test]
    fn text_fields_come_before_the_file() {
        let (ct, body) = form(
            &[("chat_id", "42"), ("caption", "春")],
            "photo",
            "c.png",
            "image/png",
            b"P",
        );
        let boundary = ct.strip_prefix("multipart/form-data; boundary=").unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.starts_with(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"chat_id\"\r\n\r\n42\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"caption\"\r\n\r\n春\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"c.png\""
            )),
            "{text}"
        );
    }
}
