//! Picture cards (issue 11): the rendered PNG decoded and read pixel by pixel — text inside its
//! box and nowhere else, wrapped lines within the box, the ellipsis at max lines, CJK drawn with
//! the configured font (and through the fallback list), fonts parsed once per daemon; end to end
//! through the daemon to the file connector (PNG next to the JSON line) and to an SMTP double
//! (inline `cid:` picture + attachment).
//!
//! Needs the fonts `.ci/fonts` installs (WenQuanYi Zen Hei, DejaVu Sans): without them these
//! tests fail, saying so.

mod common;
#[path = "common/smtp.rs"]
mod smtp_server;

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
