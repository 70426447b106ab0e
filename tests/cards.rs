//! Picture cards (issue 11): the rendered PNG decoded and read pixel by pixel — text inside its
//! box and nowhere else, wrapped lines within the box, the ellipsis at max lines, CJK drawn with
//! the configured font (and through the fallback list), fonts parsed once per daemon; end to end
//! through the daemon to the file connector (PNG next to the JSON line) and to an SMTP double
//! (inline `cid:` picture + attachment); and to the chat connectors that send pictures (WeCom
//! app and robot, DingTalk app, Telegram) through their doubles: the bytes uploaded are the
//! stored PNG, the send names the media id the double handed out, too-large pictures fail before
//! any call, upload errors retry or fail by their class, and a failed send retried does not
//! double the message.
//!
//! Needs the fonts `.ci/fonts` installs (WenQuanYi Zen Hei, DejaVu Sans): without them these
//! tests fail, saying so.

#[allow(dead_code)]
#[path = "common/chat_double.rs"]
mod chat_double;
mod common;
#[path = "common/dingtalk_double.rs"]
mod dingtalk_double;
#[path = "common/smtp.rs"]
mod smtp_server;
#[allow(dead_code)]
#[path = "common/wechat_double.rs"]
mod wechat_double;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use image::RgbImage;
use outboxd::render::card::{self, CardSpec, Cards};
use outboxd::render::fonts::{self, CardsConfig, Fonts};
use outboxd::render::Template;
use serde_json::json;

const T: Duration = Duration::from_secs(30);
const WQY: &str = "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc";
const DEJAVU: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Tests that parse fonts hold this, so that the count of parses is exact.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cards_cfg() -> CardsConfig {
    for f in [WQY, DEJAVU] {
        assert!(
            Path::new(f).is_file(),
            "font {f} is missing: run `bash .ci/fonts` (installs fonts-wqy-zenhei and fonts-dejavu-core)"
        );
    }
    CardsConfig {
        fonts: [
            ("sans".to_string(), PathBuf::from(WQY)),
            ("latin".to_string(), PathBuf::from(DEJAVU)),
        ]
        .into_iter()
        .collect(),
        fallback: vec!["sans".into()],
        default_font: Some("sans".into()),
        backgrounds: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/templates")),
    }
}

fn fonts() -> Arc<Fonts> {
    static FONTS: OnceLock<Arc<Fonts>> = OnceLock::new();
    FONTS
        .get_or_init(|| {
            let _g = SERIAL.blocking_lock();
            Arc::new(Fonts::load(&cards_cfg()).unwrap())
        })
        .clone()
}

fn cards() -> Cards {
    Cards::new(fonts(), cards_cfg().backgrounds)
}

fn template(body: serde_json::Value) -> Template {
    Template {
        name: "t".into(),
        kind: "image".into(),
        version: 1,
        subject: None,
        body: body.to_string(),
    }
}

/// Renders and decodes.
fn render(body: serde_json::Value, vars: serde_json::Value) -> RgbImage {
    let (_, img) = cards().render(&template(body), &vars, None).unwrap();
    assert_eq!(&img.bytes[1..4], b"PNG");
    image::load_from_memory(&img.bytes).unwrap().to_rgb8()
}

fn one_box(b: serde_json::Value) -> serde_json::Value {
    json!({"width": 400, "height": 240, "background": {"color": "#ffffff"}, "boxes": [b]})
}

/// Pixels that are not the white background, inside (x0, y0, x1, y1).
fn ink(img: &RgbImage, r: (u32, u32, u32, u32)) -> usize {
    let mut n = 0;
    for y in r.1..r.3 {
        for x in r.0..r.2 {
            if img.get_pixel(x, y).0 != [255, 255, 255] {
                n += 1;
            }
        }
    }
    n
}

/// Rows of the region that carry ink, grouped into bands (one per drawn line).
fn bands(img: &RgbImage, r: (u32, u32, u32, u32)) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for y in r.1..r.3 {
        if ink(img, (r.0, y, r.2, y + 1)) > 0 {
            match out.last_mut() {
                Some(b) if b.1 + 1 >= y => b.1 = y,
                _ => out.push((y, y)),
            }
        }
    }
    out
}

#[test]
fn text_is_drawn_inside_its_box_and_nowhere_else() {
    let img = render(
        one_box(
            json!({"x": 50, "y": 40, "width": 300, "height": 120, "text": "{{ t }}",
                       "size": 28, "color": "#000000"}),
        ),
        json!({"t": "Hello 世界, a card with enough words to wrap over several lines of its box"}),
    );
    let inside = ink(&img, (50, 40, 350, 160));
    assert!(inside > 2000, "little ink in the box: {inside}");
    let total = ink(&img, (0, 0, 400, 240));
    assert_eq!(total, inside, "ink outside the box");
    // Wrapped: several lines, each band within the box, at the line pitch (28 × 1.25 = 35).
    let b = bands(&img, (50, 40, 350, 160));
    assert!(b.len() >= 3, "{b:?}");
    for w in b.windows(2) {
        let pitch = w[1].0 as i32 - w[0].0 as i32;
        assert!((30..=40).contains(&pitch), "{b:?}");
    }
}

#[test]
fn right_and_center_alignment_move_the_ink() {
    let spec = |align: &str| {
        one_box(
            json!({"x": 0, "y": 0, "width": 400, "height": 60, "text": "abc", "size": 30,
                       "align": align, "font": "latin"}),
        )
    };
    let left = render(spec("left"), json!({}));
    let right = render(spec("right"), json!({}));
    let center = render(spec("center"), json!({}));
    assert!(ink(&left, (0, 0, 100, 60)) > 0 && ink(&left, (300, 0, 400, 60)) == 0);
    assert!(ink(&right, (300, 0, 400, 60)) > 0 && ink(&right, (0, 0, 100, 60)) == 0);
    assert!(ink(&center, (150, 0, 250, 60)) > 0 && ink(&center, (0, 0, 100, 60)) == 0);
    assert_eq!(ink(&center, (300, 0, 400, 60)), 0);
}

#[test]
fn lines_break_by_unicode_rules() {
    let f = fonts();
    let b = |text: &str, width: u32| card::TextBox {
        x: 0,
        y: 0,
        width,
        height: 1000,
        text: text.into(),
        font: Some("sans".into()),
        size: 20.0,
        color: None,
        align: card::Align::Left,
        wrap: None,
        line_height: None,
        max_lines: None,
        ellipsis: None,
    };
    // Latin: whole words per line.
    let text = "the quick brown fox jumps over the lazy dog again and again";
    let lines = card::layout(&f, &b(text, 120), text).unwrap();
    assert!(lines.len() > 2, "{lines:?}");
    let words: Vec<&str> = text.split(' ').collect();
    for l in &lines {
        for w in l.split(' ') {
            assert!(words.contains(&w), "a word was split: {w:?} in {lines:?}");
        }
    }
    assert_eq!(lines.join(" "), text);
    // CJK: breaks between characters (no spaces needed), and a line never starts with a
    // closing punctuation mark (UAX #14 class CL).
    let zh =
        "我们诚挚地邀请您参加本周六下午两点在上海举行的春季新品发布会，现场将展示全新的产品系列。";
    let lines = card::layout(&f, &b(zh, 200), zh).unwrap();
    assert!(lines.len() >= 4, "{lines:?}");
    assert_eq!(lines.concat(), zh);
    for l in &lines {
        assert!(!l.starts_with(['，', '。']), "{lines:?}");
        assert!(
            l.chars().count() <= 10,
            "200 px holds 10 glyphs of 20 px: {lines:?}"
        );
    }
    // A hard line break is kept.
    assert_eq!(
        card::layout(&f, &b("a\nb", 300), "a\nb").unwrap(),
        ["a", "b"]
    );
}

#[test]
fn max_lines_ends_with_an_ellipsis_and_nothing_below() {
    let long = "一二三四五六七八九十".repeat(10);
    let spec = one_box(
        json!({"x": 20, "y": 20, "width": 200, "height": 200, "text": "{{ t }}",
                              "size": 20, "line_height": 1.5, "max_lines": 2}),
    );
    let b: card::TextBox = serde_json::from_value(spec["boxes"][0].clone()).unwrap();
    let lines = card::layout(&fonts(), &b, &long).unwrap();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].ends_with('…'), "{lines:?}");
    let img = render(spec, json!({"t": long}));
    let bands = bands(&img, (20, 20, 220, 220));
    assert_eq!(bands.len(), 2, "{bands:?}");
    assert!(bands[1].1 < 20 + 60, "ink below the second line: {bands:?}");
    // The ellipsis is drawn: the last line's right end carries ink, as a full line would.
    assert!(ink(&img, (190, 50, 220, 80)) > 0);
}

#[test]
fn cjk_glyphs_are_drawn_not_tofu_and_the_fallback_covers_latin_fonts() {
    let glyph = |font: &str, ch: &str| {
        render(
            one_box(
                json!({"x": 0, "y": 0, "width": 400, "height": 100, "text": ch, "size": 64,
                           "font": font}),
            ),
            json!({}),
        )
    };
    // Two different characters give two different pictures (tofu boxes would be equal) with
    // real ink coverage.
    let zhong = glyph("sans", "中");
    let gai = glyph("sans", "丐");
    assert!(
        zhong != gai,
        "two CJK characters drew the same picture (tofu?)"
    );
    let n = ink(&zhong, (0, 0, 400, 100));
    assert!(n > 300, "{n}");
    // A box in DejaVu (no CJK) draws 中 with the fallback font: the same glyph as in Zen Hei
    // (the same ink; the baseline is DejaVu's, so it may sit a few pixels apart).
    let fallback = glyph("latin", "中");
    assert_eq!(ink(&fallback, (0, 0, 400, 100)), n);
    // Without the fallback, DejaVu draws both as its missing-glyph box: identical pictures.
    let no_fallback = Fonts::from_faces(
        vec![fonts::Face {
            name: "latin".into(),
            font: fontdue::Font::from_bytes(std::fs::read(DEJAVU).unwrap(), Default::default())
                .unwrap(),
        }],
        &[],
        None,
    )
    .unwrap();
    let c = Cards::new(Arc::new(no_fallback), None);
    let draw = |ch: &str| {
        let t = template(one_box(
            json!({"x": 0, "y": 0, "width": 400, "height": 100, "text": ch, "size": 64}),
        ));
        c.render(&t, &json!({}), None).unwrap().1.bytes
    };
    assert!(draw("中") == draw("丐"), "tofu is the same box for both");
}

#[test]
fn bad_specs_and_missing_fonts_have_codes() {
    let e = CardSpec::parse("t", "{\"width\": 10}").unwrap_err();
    assert_eq!(e.code(), "card-spec");
    let e = cards()
        .render(
            &template(one_box(
                json!({"x": 0, "y": 0, "width": 10, "height": 10, "text": "x",
                                     "size": 9, "font": "nope"}),
            )),
            &json!({}),
            None,
        )
        .unwrap_err();
    assert_eq!(e.code(), "card-spec");
    assert!(e.to_string().contains("no font named \"nope\""), "{e}");
    let e = cards()
        .render(
            &template(json!({"width": 10, "height": 10, "background": {"image": "db:none"}})),
            &json!({}),
            None,
        )
        .unwrap_err();
    assert_eq!(e.code(), "card-background");
    let e = cards()
        .render(
            &template(one_box(json!({"x": 0, "y": 0, "width": 10, "height": 10,
                                     "text": "{{ who }}", "size": 9}))),
            &json!({}),
            None,
        )
        .unwrap_err();
    assert_eq!(e.code(), "template-missing-var");
}

/// The shipped example: 1080×608 from conf/templates/card.card.json and its file background.
#[test]
fn the_example_card_renders() {
    let body = std::fs::read_to_string("conf/templates/card.card.json").unwrap();
    let vars: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("conf/templates/card.vars.json").unwrap())
            .unwrap();
    let mut t = template(json!({}));
    t.body = body;
    let (alt, img) = cards().render(&t, &vars, None).unwrap();
    assert!(alt.starts_with("春季新品发布会"), "{alt}");
    let px = image::load_from_memory(&img.bytes).unwrap().to_rgb8();
    assert_eq!(px.dimensions(), (1080, 608));
}

fn file_cfg(db: &TestDb, spool: &Path) -> TestConfig {
    let mut tc = TestConfig::new(
        db,
        &[(
            "file",
            &format!("[default]\npath = \"{}/out.jsonl\"\n", path_str(spool)),
        )],
    );
    tc.config.cards = cards_cfg();
    tc
}

async fn add_card(c: &tokio_postgres::Client, name: &str, agent: &str, body: &str) {
    c.execute(
        "SELECT api.add_template($1, 'image', $2, 'Card for {{ title }}', $3)",
        &[&name, &body, &agent],
    )
    .await
    .unwrap();
}

async fn send_card(c: &tokio_postgres::Client, name: &str, address: &str) -> uuid::Uuid {
    let vars: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("conf/templates/card.vars.json").unwrap())
            .unwrap();
    c.query_one(
        "SELECT api.send_template(NULL, NULL, NULL, $1, $2, $3)",
        &[&address, &name, &vars],
    )
    .await
    .unwrap()
    .get(0)
}

/// Through the daemon: the picture is stored with the message, the file connector writes it next
/// to the JSON line, which names it; fonts are parsed once for the daemon, not per card; a
/// background stored in the database is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_renders_stores_and_the_file_connector_writes_the_png() {
    let _g = SERIAL.lock().await;
    let db = TestDb::new().await;
    let c = db.client().await;
    let spool = tempfile::tempdir().unwrap();
    let tc = file_cfg(&db, spool.path());
    // A background in the database: a 4×4 red PNG, scaled to cover.
    let red = card::encode_png(
        &RgbImage::from_pixel(4, 4, image::Rgb([200, 0, 0])),
        image::codecs::png::CompressionType::Fast,
    );
    c.execute("SELECT api.add_card_background('red', $1)", &[&red])
        .await
        .unwrap();
    let body = std::fs::read_to_string("conf/templates/card.card.json").unwrap();
    add_card(&c, "card", "file.agent", &body).await;
    add_card(
        &c,
        "redcard",
        "file.agent",
        &body.replace("file:card-bg.png", "db:red"),
    )
    .await;
    let before = fonts::faces_parsed();
    let daemon = Daemon::start(tc.config.clone());
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(send_card(&c, if i == 0 { "redcard" } else { "card" }, "someone").await);
    }
    for id in &ids {
        wait_state(&c, *id, "submitted", T).await;
    }
    daemon.stop().await;
    assert_eq!(
        fonts::faces_parsed() - before,
        2,
        "the daemon parses its two fonts once, not per card"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(spool.path().join("out.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (n, id) in ids.iter().enumerate() {
        let line = lines.iter().find(|l| l["id"] == id.to_string()).unwrap();
        assert_eq!(line["subject"], "Card for 春季新品发布会 Spring launch");
        assert!(line["content"]
            .as_str()
            .unwrap()
            .starts_with("春季新品发布会"));
        let file = line["images"][0]["file"].as_str().unwrap();
        assert_eq!(
            Path::new(file).parent().unwrap(),
            spool.path(),
            "next to the line"
        );
        assert!(file.ends_with(&format!("{id}.card.png")), "{file}");
        let bytes = std::fs::read(file).unwrap();
        assert_eq!(line["images"][0]["bytes"], bytes.len());
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1080, 608));
        // The stored picture is the one written.
        let stored: Vec<u8> = c
            .query_one("SELECT bytes FROM api.message_image($1)", &[id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, bytes);
        // The db: background shows in a corner no text reaches.
        let corner = img.get_pixel(5, 300).0;
        if n == 0 {
            assert_eq!(corner, [200, 0, 0]);
        } else {
            assert_ne!(corner, [200, 0, 0]);
        }
    }
}

/// The smtp connector sends the card inline (multipart/related, `cid:`) and as an attachment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_sends_the_card_inline_and_attached() {
    use mail_parser::{MessageParser, MimeHeaders};
    let _g = SERIAL.lock().await;
    let server = smtp_server::SmtpServer::start(smtp_server::ServerTls::None, None).await;
    let db = TestDb::new().await;
    let c = db.client().await;
    let conf = format!(
        "[default]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nfrom = \"noreply@example.com\"\n\
         retry = [\"20ms\"]\nmax_attempts = 3\ntimeout = \"5s\"\n",
        server.port
    );
    let mut tc = TestConfig::new(&db, &[("smtp", &conf)]);
    tc.config.cards = cards_cfg();
    let body = std::fs::read_to_string("conf/templates/card.card.json").unwrap();
    add_card(&c, "card", "smtp.agent", &body).await;
    let daemon = Daemon::start(tc.config.clone());
    let id = send_card(&c, "card", "ann@example.com").await;
    wait_state(&c, id, "submitted", T).await;
    daemon.stop().await;
    let mails = server.mails();
    assert_eq!(mails.len(), 1);
    let m = MessageParser::default().parse(&mails[0].data).unwrap();
    assert_eq!(m.subject(), Some("Card for 春季新品发布会 Spring launch"));
    let html = m.body_html(0).unwrap();
    let cid = html
        .split("cid:")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("the HTML shows the picture by cid")
        .to_string();
    assert!(m.body_text(0).unwrap().contains("春季新品发布会"));
    let stored: Vec<u8> = c
        .query_one("SELECT bytes FROM api.message_image($1)", &[&id])
        .await
        .unwrap()
        .get(0);
    let mut inline = 0;
    let mut attached = 0;
    for part in m.parts.iter() {
        if part.content_type().is_some_and(|t| t.c_type == "image") {
            assert_eq!(part.contents(), stored.as_slice());
            let img = image::load_from_memory(part.contents()).unwrap();
            assert_eq!((img.width(), img.height()), (1080, 608));
            if part.content_id() == Some(cid.as_str()) {
                inline += 1;
            } else if part.attachment_name() == Some("card.png") {
                attached += 1;
            }
        }
    }
    assert_eq!(
        (inline, attached),
        (1, 1),
        "{}",
        String::from_utf8_lossy(&mails[0].data[..2000.min(mails[0].data.len())])
    );
    let raw = String::from_utf8_lossy(&mails[0].data);
    assert!(raw.contains("multipart/related"), "{raw:.1500}");
}

// ------------------------------------------------------------------------------------------------
// Chat connectors
// ------------------------------------------------------------------------------------------------

const RETRY_FAST: &str = "retry = [\"20ms\", \"20ms\", \"20ms\"]\ntimeout = \"5s\"\n";

/// The stored picture of a message: it is what every connector must have sent.
async fn stored_png(c: &tokio_postgres::Client, id: uuid::Uuid) -> Vec<u8> {
    let bytes: Vec<u8> = c
        .query_one("SELECT bytes FROM api.message_image($1)", &[&id])
        .await
        .unwrap()
        .get(0);
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (1080, 608), "the shipped card");
    bytes
}

/// A message built from the shipped card whose picture is already stored — `bytes` claimed to
/// be `w`×`h` — so the daemon sends that instead of rendering (a picture too large to render
/// cheaply). The message waits (send_at in the future) until the row is in.
async fn send_stored_card(
    c: &tokio_postgres::Client,
    name: &str,
    address: &str,
    bytes: &[u8],
    (w, h): (i32, i32),
) -> uuid::Uuid {
    let vars: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("conf/templates/card.vars.json").unwrap())
            .unwrap();
    let id: uuid::Uuid = c
        .query_one(
            "SELECT api.send_template(NULL, NULL, NULL, $1, $2, $3, pSendAt => now() + interval '1 hour')",
            &[&address, &name, &vars],
        )
        .await
        .unwrap()
        .get(0);
    c.execute(
        "INSERT INTO outbox.message_images (message_id, file_name, mime, width, height, bytes) \
         VALUES ($1, 'card.png', 'image/png', $2, $3, $4)",
        &[&id, &w, &h, &bytes],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE outbox.messages SET send_at = NULL, next_attempt_at = now() WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    // The daemon's wake-up (as submitting sends it).
    c.execute("SELECT pg_notify('outbox', $1::text)", &[&id.to_string()])
        .await
        .unwrap();
    id
}

/// A PNG signature followed by `n` bytes in all: looks like a PNG to a provider's type check.
fn png_like(n: usize) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.resize(n, 0);
    b
}

async fn final_state(c: &tokio_postgres::Client, id: uuid::Uuid) -> String {
    wait_for(
        T,
        &format!("message {id} to be submitted or failed"),
        || async {
            let s = state_of(c, id).await;
            (s == "submitted" || s == "failed").then_some(s)
        },
    )
    .await
}

fn card_body() -> String {
    std::fs::read_to_string("conf/templates/card.card.json").unwrap()
}

fn weixin_confs(d: &wechat_double::WeixinDouble) -> Vec<(&'static str, String)> {
    let common = format!("base_url = \"{}\"\n{RETRY_FAST}", d.url);
    vec![
        (
            "wecom",
            format!(
                "[default]\ncorpid = \"{}\"\ncorpsecret = \"{}\"\nagentid = {}\n{common}",
                d.corpid, d.corpsecret, d.agentid
            ),
        ),
        (
            "wecombot",
            format!("[default]\nkey = \"{}\"\n{common}", d.bot_key),
        ),
    ]
}

async fn weixin_daemon(db: &TestDb, d: &wechat_double::WeixinDouble) -> (TestConfig, Daemon) {
    let confs = weixin_confs(d);
    let list: Vec<(&str, &str)> = confs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut tc = TestConfig::new(db, &list);
    tc.config.cards = cards_cfg();
    let daemon = Daemon::start(tc.config.clone());
    (tc, daemon)
}

/// WeCom app: the card is uploaded (`media/upload?type=image`, field `media`, the stored PNG
/// with its name, type and length) and sent as `msgtype: image` with the media id the double
/// returned, to the address; the alt text is not sent separately. A send that fails with a
/// retryable errcode after a good upload is retried with the same media id: one upload, one
/// message. Upload errors: -1 retries (`wecom-busy`), 48001 fails for good with nothing sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wecom_uploads_the_card_and_sends_it_by_media_id_once() {
    let _g = SERIAL.lock().await;
    let db = TestDb::new().await;
    let c = db.client().await;
    let d = wechat_double::WeixinDouble::start().await;
    add_card(&c, "card", "wecom.agent", &card_body()).await;
    let (_tc, daemon) = weixin_daemon(&db, &d).await;

    // The send after the upload fails once (-1, busy), then goes.
    d.script_wecom(&[-1]);
    let id = send_card(&c, "card", "zhangsan").await;
    assert_eq!(
        final_state(&c, id).await,
        "submitted",
        "{:?}",
        attempts(&c, id).await
    );
    assert_eq!(
        attempts(&c, id).await,
        vec![
            (1, "retry".into(), Some("wecom-busy".into()), Some(200)),
            (2, "done".into(), None, Some(200))
        ]
    );
    let png = stored_png(&c, id).await;
    let uploads = d.uploads();
    assert_eq!(
        uploads.len(),
        1,
        "the retry reused the media id: one upload"
    );
    assert_eq!(uploads[0].kind, "image");
    assert_eq!(uploads[0].filename, "card.png");
    assert_eq!(uploads[0].content_type, "image/png");
    assert_eq!(uploads[0].filelength, Some(png.len()));
    assert_eq!(uploads[0].bytes, png, "the stored picture, byte for byte");
    let sent = d.wecom_sent();
    assert_eq!(sent.len(), 1, "one message delivered: {sent:?}");
    assert_eq!(sent[0]["msgtype"], "image");
    assert_eq!(sent[0]["touser"], "zhangsan");
    assert_eq!(sent[0]["agentid"], d.agentid);
    assert_eq!(sent[0]["enable_duplicate_check"], 1);
    let media_id = sent[0]["image"]["media_id"].as_str().unwrap();
    assert!(media_id.starts_with("MEDIA-"), "{media_id}");

    // Upload errors: -1 retries (then the upload and the send go), 48001 is permanent.
    d.script_upload(&[-1]);
    let retried = send_card(&c, "card", "lisi").await;
    assert_eq!(final_state(&c, retried).await, "submitted");
    assert_eq!(
        attempts(&c, retried).await[0],
        (1, "retry".into(), Some("wecom-busy".into()), Some(200))
    );
    assert_eq!(d.uploads().len(), 2);
    d.script_upload(&[48001]);
    let refused = send_card(&c, "card", "lisi").await;
    assert_eq!(final_state(&c, refused).await, "failed");
    assert_eq!(
        attempts(&c, refused).await,
        vec![(1, "failed".into(), Some("wecom-48001".into()), Some(200))]
    );
    assert_eq!(
        d.wecom_sent().len(),
        2,
        "nothing sent for the refused upload"
    );
    daemon.stop().await;
}

/// WeCom robot: the card goes inline (`image.base64` of the stored PNG + its MD5, which the
/// double checks); a picture over the robot's 2 MB — and one over WeCom's 10 MB for the app —
/// fails with `image-too-large` before any request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wecombot_sends_the_card_inline_and_too_large_pictures_never_leave() {
    use base64::Engine as _;
    let _g = SERIAL.lock().await;
    let db = TestDb::new().await;
    let c = db.client().await;
    let d = wechat_double::WeixinDouble::start().await;
    add_card(&c, "botcard", "wecombot.agent", &card_body()).await;
    add_card(&c, "appcard", "wecom.agent", &card_body()).await;
    let (_tc, daemon) = weixin_daemon(&db, &d).await;
    let id = send_card(&c, "botcard", "ignored").await;
    assert_eq!(
        final_state(&c, id).await,
        "submitted",
        "{:?}",
        attempts(&c, id).await
    );
    let png = stored_png(&c, id).await;
    let sent = d.bot_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["msgtype"], "image");
    let got = base64::engine::general_purpose::STANDARD
        .decode(sent[0]["image"]["base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(got, png);
    let img = image::load_from_memory(&got).unwrap();
    assert_eq!((img.width(), img.height()), (1080, 608));

    let hits = d.wecom_hits();
    let big_bot = send_stored_card(
        &c,
        "botcard",
        "x",
        &png_like(2 * 1024 * 1024 + 1),
        (1080, 608),
    )
    .await;
    let big_app = send_stored_card(
        &c,
        "appcard",
        "zhangsan",
        &png_like(10 * 1024 * 1024 + 1),
        (1080, 608),
    )
    .await;
    for id in [big_bot, big_app] {
        assert_eq!(final_state(&c, id).await, "failed");
        assert_eq!(
            attempts(&c, id).await,
            vec![(1, "failed".into(), Some("image-too-large".into()), None)]
        );
    }
    assert_eq!(
        d.wecom_hits(),
        hits,
        "no request for a picture that is too large"
    );
    daemon.stop().await;
}

/// DingTalk app: the card is uploaded (`media/upload?type=image`, field `media`) and sent as a
/// work notification `msgtype: image` with the returned media id; a send that fails with a
/// retryable errcode is retried with the same media id (one upload, one task); an upload error
/// retries (-1) or fails (40004 and other codes); over 20 MB is `image-too-large` with no call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dingtalk_uploads_the_card_and_sends_it_by_media_id_once() {
    use dingtalk_double::*;
    let _g = SERIAL.lock().await;
    let db = TestDb::new().await;
    let c = db.client().await;
    let dd = DingtalkDouble::start().await;
    let conf = format!(
        "[default]\nappkey = \"{APP_KEY}\"\nappsecret = \"{APP_SECRET}\"\nagent_id = {AGENT_ID}\n\
         endpoint = \"{}\"\nresult_polls = []\n{RETRY_FAST}",
        dd.url
    );
    let mut tc = TestConfig::new(&db, &[("dingtalk", &conf)]);
    tc.config.cards = cards_cfg();
    add_card(&c, "card", "dingtalk.agent", &card_body()).await;
    let daemon = Daemon::start(tc.config.clone());

    dd.fail_sends(&[-1]);
    let id = send_card(&c, "card", "users:alice,bob").await;
    assert_eq!(
        final_state(&c, id).await,
        "submitted",
        "{:?}",
        attempts(&c, id).await
    );
    let a = attempts(&c, id).await;
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[0].1, "retry");
    let png = stored_png(&c, id).await;
    let uploads = dd.calls("/media/upload");
    assert_eq!(uploads.len(), 1, "the retry reused the media id");
    assert_eq!(uploads[0].query["type"], "image");
    assert_eq!(uploads[0].media.as_deref(), Some(png.as_slice()));
    let media_id = uploads[0].answer["media_id"].as_str().unwrap().to_string();
    let sends: Vec<_> = dd
        .calls("/topapi/message/corpconversation/asyncsend_v2")
        .into_iter()
        .filter(|c| c.answer["errcode"] == 0)
        .collect();
    assert_eq!(sends.len(), 1, "one task accepted");
    assert_eq!(
        sends[0].body["msg"],
        json!({"msgtype": "image", "image": {"media_id": media_id}})
    );
    assert_eq!(sends[0].body["userid_list"], "alice,bob");

    dd.fail_uploads(&[-1]);
    let retried = send_card(&c, "card", "users:carol").await;
    assert_eq!(final_state(&c, retried).await, "submitted");
    assert_eq!(attempts(&c, retried).await[0].1, "retry");
    dd.fail_uploads(&[40004]);
    let refused = send_card(&c, "card", "users:carol").await;
    assert_eq!(final_state(&c, refused).await, "failed");
    assert_eq!(
        attempts(&c, refused).await,
        vec![(1, "failed".into(), Some("dingtalk-40004".into()), None)]
    );

    let calls = dd.all_calls().len();
    let big = send_stored_card(
        &c,
        "card",
        "users:dave",
        &png_like(20 * 1024 * 1024 + 1),
        (1080, 608),
    )
    .await;
    assert_eq!(final_state(&c, big).await, "failed");
    assert_eq!(
        attempts(&c, big).await,
        vec![(1, "failed".into(), Some("image-too-large".into()), None)]
    );
    assert_eq!(
        dd.all_calls().len(),
        calls,
        "no request for a picture that is too large"
    );
    daemon.stop().await;
}

/// Telegram: `sendPhoto` with the stored PNG as `photo` and the alt text as the caption, one
/// call; 429 retries after `retry_after`, a blocked chat fails (`telegram-403`); a photo whose
/// sides exceed the Bot API's 10000 is `image-too-large` with no call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_sends_the_card_as_a_photo_with_its_caption() {
    use chat_double::*;
    let _g = SERIAL.lock().await;
    let db = TestDb::new().await;
    let c = db.client().await;
    let tg = ChatDouble::start().await;
    let conf = format!(
        "[default]\nbot_token = \"{}\"\napi_url = \"{}\"\nparse_mode = \"MarkdownV2\"\n\
         disable_notification = true\n{RETRY_FAST}",
        tg.telegram_token, tg.url
    );
    let mut tc = TestConfig::new(&db, &[("telegram", &conf)]);
    tc.config.cards = cards_cfg();
    add_card(&c, "card", "telegram.agent", &card_body()).await;
    let daemon = Daemon::start(tc.config.clone());

    tg.script(Platform::Telegram, [Trouble::TelegramTooMany(1)]);
    let id = send_card(&c, "card", "123456").await;
    assert_eq!(
        final_state(&c, id).await,
        "submitted",
        "{:?}",
        attempts(&c, id).await
    );
    let a = attempts(&c, id).await;
    assert_eq!(
        a[0],
        (1, "retry".into(), Some("telegram-429".into()), Some(429)),
        "{a:?}"
    );
    let png = stored_png(&c, id).await;
    let got = tg.got(Platform::Telegram);
    assert_eq!(got.len(), 2, "the 429 and the photo");
    let ok = &got[1];
    assert!(ok.path.ends_with("/sendPhoto"), "{}", ok.path);
    assert!(ok
        .content_type
        .starts_with("multipart/form-data; boundary="));
    assert_eq!(ok.status, 200, "{}", ok.answer);
    assert_eq!(ok.file.as_deref(), Some(png.as_slice()));
    assert_eq!(ok.body["chat_id"], "123456");
    assert_eq!(ok.body["disable_notification"], "true");
    assert!(ok.body.get("parse_mode").is_none(), "alt text is plain");
    let caption = ok.body["caption"].as_str().unwrap();
    assert!(
        caption.starts_with("春季新品发布会"),
        "the card's alt text: {caption}"
    );
    let answer: serde_json::Value = serde_json::from_str(&ok.answer).unwrap();
    let provider_id: Option<String> = c
        .query_one(
            "SELECT provider_message_id FROM outbox.attempts WHERE message_id = $1 AND outcome = 'done'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        provider_id,
        Some(answer["result"]["message_id"].to_string())
    );

    let blocked = send_card(&c, "card", &BLOCKED_CHAT.to_string()).await;
    assert_eq!(final_state(&c, blocked).await, "failed");
    assert_eq!(
        attempts(&c, blocked).await,
        vec![(1, "failed".into(), Some("telegram-403".into()), Some(403))]
    );

    let n = tg.got(Platform::Telegram).len();
    let huge = send_stored_card(&c, "card", "123456", &png_like(1000), (9000, 1001)).await;
    assert_eq!(final_state(&c, huge).await, "failed");
    assert_eq!(
        attempts(&c, huge).await,
        vec![(1, "failed".into(), Some("image-too-large".into()), None)]
    );
    assert_eq!(
        tg.got(Platform::Telegram).len(),
        n,
        "no call for a photo too large"
    );
    daemon.stop().await;
}
