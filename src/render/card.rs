//! Picture cards (templates of kind `image`): a background plus text boxes whose text is a
//! minijinja template, drawn with fontdue onto an `image` buffer and encoded as PNG.
//!
//! The card spec is the template body, a JSON document (README, "Picture cards"):
//!
//! ```json
//! {"width": 1080, "height": 608,
//!  "background": {"color": "#1d3557", "image": "file:card-bg.png"},
//!  "alt": "{{ title }}",
//!  "boxes": [{"x": 64, "y": 60, "width": 952, "height": 150, "text": "{{ title }}",
//!             "font": "sans", "size": 60, "color": "#ffffff", "align": "left",
//!             "wrap": true, "line_height": 1.25, "max_lines": 2, "ellipsis": "…"}]}
//! ```
//!
//! Invariants: rendering is pure (same spec, background and variables → same pixels, so a
//! retried message gets the same picture); every glyph is clipped to its box, so text never
//! leaves the box it was given; lines break where Unicode's line breaking algorithm (UAX #14)
//! allows — between CJK characters, between Latin words, never inside a Latin word unless the
//! word alone is wider than the box; text past `max_lines` (or past the box's height) ends the
//! last line with the ellipsis.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ImageEncoder, Rgb, RgbImage};
use serde::Deserialize;
use unicode_linebreak::BreakOpportunity;

use super::fonts::Fonts;
use super::{text, Kind, RenderError, Template};
use crate::connector::Image;

/// The PNG compression of rendered cards: fdeflate's fast mode with adaptive filters. Cards are
/// flat colours and anti-aliased text, which compress well even so; the `Default`/`Best` zlib
/// levels cost several times the render time for a file a few percent smaller (see
/// bench/README.md, "cards", for the figures).
pub const PNG_COMPRESSION: CompressionType = CompressionType::Fast;

/// The largest card side, in pixels (a 4096×4096 RGB buffer is 48 MB).
pub const MAX_SIDE: u32 = 4096;

/// A card spec, as written in the template body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardSpec {
    pub width: u32,
    pub height: u32,
    #[serde(default)]
    pub background: Background,
    /// The message's text (the e-mail's text part, the file connector's `content`): a template.
    /// Default: the boxes' texts, one per line.
    pub alt: Option<String>,
    /// The attachment's file name. Default `card.png`.
    pub file_name: Option<String>,
    #[serde(default)]
    pub boxes: Vec<TextBox>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Background {
    /// Fill colour under the image (or alone). Default `#ffffff`.
    pub color: Option<String>,
    /// `db:NAME` (outbox.card_backgrounds, see sql/014_cards.sql) or `file:NAME` (in `[cards]
    /// backgrounds`), PNG or JPEG, scaled to cover the card and centred.
    pub image: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Align {
    #[default]
    Left,
    Center,
    Right,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextBox {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    /// A minijinja template (plain text, no escaping) filled from the message's variables.
    pub text: String,
    /// A font of `[cards] fonts`. Default: `[cards] default_font`.
    pub font: Option<String>,
    /// Pixel size of the em square.
    pub size: f32,
    /// `#rgb`, `#rrggbb` or `#rrggbbaa`. Default `#000000`.
    pub color: Option<String>,
    #[serde(default)]
    pub align: Align,
    /// Wrap at Unicode line break opportunities. Default true; false: one line per `\n`.
    pub wrap: Option<bool>,
    /// Line pitch as a multiple of `size`. Default 1.25.
    pub line_height: Option<f32>,
    /// At most this many lines (also never more than fit in `height`).
    pub max_lines: Option<u32>,
    /// Ends the last line when text is cut. Default `…`.
    pub ellipsis: Option<String>,
}

/// Where a background image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackgroundRef {
    Db(String),
    File(String),
}

impl CardSpec {
    /// Parses and checks a card spec (geometry, colours, box templates' syntax). Fonts are
    /// checked when rendering (the daemon's fonts, not the saving client's, are the ones used).
    pub fn parse(name: &str, body: &str) -> Result<CardSpec, RenderError> {
        let bad = |detail: String| RenderError::Card {
            template: name.to_string(),
            detail,
        };
        let spec: CardSpec = serde_json::from_str(body).map_err(|e| bad(e.to_string()))?;
        if spec.width == 0 || spec.height == 0 || spec.width > MAX_SIDE || spec.height > MAX_SIDE {
            return Err(bad(format!(
                "width and height must be 1..={MAX_SIDE}, not {}×{}",
                spec.width, spec.height
            )));
        }
        if let Some(c) = &spec.background.color {
            parse_color(c).map_err(&bad)?;
        }
        spec.background_ref().map_err(|e| bad(e.to_string()))?;
        for (i, b) in spec.boxes.iter().enumerate() {
            let n = i + 1;
            if b.width == 0 || b.height == 0 || !(b.size > 0.0 && b.size <= 1000.0) {
                return Err(bad(format!(
                    "box {n}: width, height and size (1..1000) must be positive"
                )));
            }
            if b.x.saturating_add(b.width) > spec.width
                || b.y.saturating_add(b.height) > spec.height
            {
                return Err(bad(format!("box {n} does not fit in the card")));
            }
            if let Some(c) = &b.color {
                parse_color(c).map_err(|e| bad(format!("box {n}: {e}")))?;
            }
            if matches!(b.line_height, Some(h) if !(h > 0.0 && h <= 10.0)) {
                return Err(bad(format!("box {n}: line_height must be in (0, 10]")));
            }
            text::check(name, "card box", Kind::Text, &b.text)?;
        }
        if let Some(a) = &spec.alt {
            text::check(name, "card alt", Kind::Text, a)?;
        }
        Ok(spec)
    }

    /// The background image this card needs, if any.
    pub fn background_ref(&self) -> Result<Option<BackgroundRef>, String> {
        let Some(s) = &self.background.image else {
            return Ok(None);
        };
        let (scheme, name) = s
            .split_once(':')
            .ok_or_else(|| format!("background image \"{s}\" must be db:NAME or file:NAME"))?;
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !plain {
            return Err(format!(
                "background image name \"{name}\" must be letters, digits, \".\", \"_\" or \"-\""
            ));
        }
        match scheme {
            "db" => Ok(Some(BackgroundRef::Db(name.to_string()))),
            "file" => Ok(Some(BackgroundRef::File(name.to_string()))),
            _ => Err(format!(
                "background image \"{s}\" must be db:NAME or file:NAME"
            )),
        }
    }
}

/// Renders cards with one font registry; keeps decoded backgrounds (at card size) for reuse.
/// Backgrounds are never changed once stored (sql/014), so the cache cannot go stale for `db:`
/// images; `file:` images are read once per process (restart to pick up a changed file — or,
/// better, give it a new name, so messages already built keep theirs).
pub struct Cards {
    pub fonts: Arc<Fonts>,
    dir: Option<PathBuf>,
    backgrounds: Mutex<HashMap<(BackgroundRef, u32, u32), Arc<RgbImage>>>,
}

impl Cards {
    pub fn new(fonts: Arc<Fonts>, backgrounds_dir: Option<PathBuf>) -> Cards {
        Cards {
            fonts,
            dir: backgrounds_dir,
            backgrounds: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this card's background is decoded already (else give its bytes to
    /// [`Cards::render`]: `db:` images come from the database, which only the caller can reach).
    pub fn has_background(&self, spec: &CardSpec, r: &BackgroundRef) -> bool {
        self.backgrounds
            .lock()
            .unwrap()
            .contains_key(&(r.clone(), spec.width, spec.height))
    }

    /// Renders `job` (a template of kind image) to a PNG. `db_background` carries the bytes of a
    /// `db:` background not yet decoded (see [`Cards::has_background`]). CPU-bound (tens of
    /// milliseconds): the daemon runs it on a blocking thread.
    pub fn render(
        &self,
        template: &Template,
        vars: &serde_json::Value,
        db_background: Option<Vec<u8>>,
    ) -> Result<(String, Image), RenderError> {
        let name = &template.name;
        let spec = CardSpec::parse(name, &template.body)?;
        let mut canvas = self.background(name, &spec, db_background)?;
        let mut texts = Vec::new();
        for (i, b) in spec.boxes.iter().enumerate() {
            let t = text::render(name, "card box", Kind::Text, &b.text, vars)?;
            draw_box(&self.fonts, &mut canvas, b, &t).map_err(|detail| RenderError::Card {
                template: name.clone(),
                detail: format!("box {}: {detail}", i + 1),
            })?;
            texts.push(t);
        }
        let alt = match &spec.alt {
            Some(a) => text::render(name, "card alt", Kind::Text, a, vars)?,
            None => texts.join("\n"),
        };
        let bytes = encode_png(&canvas, PNG_COMPRESSION);
        Ok((
            alt,
            Image {
                file_name: spec.file_name.clone().unwrap_or_else(|| "card.png".into()),
                mime: "image/png".into(),
                width: spec.width,
                height: spec.height,
                bytes: bytes.into(),
            },
        ))
    }

    /// The message's text of a card: its `alt` template, else its boxes' texts, one per line.
    pub fn alt(
        &self,
        name: &str,
        spec: &CardSpec,
        vars: &serde_json::Value,
    ) -> Result<String, RenderError> {
        match &spec.alt {
            Some(a) => text::render(name, "card alt", Kind::Text, a, vars),
            None => Ok(spec
                .boxes
                .iter()
                .map(|b| text::render(name, "card box", Kind::Text, &b.text, vars))
                .collect::<Result<Vec<_>, _>>()?
                .join("\n")),
        }
    }

    fn background(
        &self,
        name: &str,
        spec: &CardSpec,
        db_bytes: Option<Vec<u8>>,
    ) -> Result<RgbImage, RenderError> {
        let color = parse_color(spec.background.color.as_deref().unwrap_or("#ffffff"))
            .expect("checked by parse");
        let r = spec
            .background_ref()
            .expect("checked by parse")
            .map(|r| (r, spec.width, spec.height));
        let Some(key) = r else {
            let px = Rgb([color[0], color[1], color[2]]);
            return Ok(RgbImage::from_pixel(spec.width, spec.height, px));
        };
        if let Some(hit) = self.backgrounds.lock().unwrap().get(&key) {
            return Ok((**hit).clone());
        }
        let missing = |detail: String| RenderError::Background {
            template: name.to_string(),
            detail,
        };
        let bytes = match (&key.0, db_bytes) {
            (BackgroundRef::Db(_), Some(b)) => b,
            (BackgroundRef::Db(n), None) => {
                return Err(missing(format!("db:{n} is not in outbox.card_backgrounds")))
            }
            (BackgroundRef::File(n), _) => {
                let dir = self.dir.as_deref().ok_or_else(|| {
                    missing(format!("file:{n} needs [cards] backgrounds (a directory)"))
                })?;
                let path = dir.join(n);
                std::fs::read(&path)
                    .map_err(|e| missing(format!("cannot read {}: {e}", path.display())))?
            }
        };
        let img = compose_background(&bytes, color, spec.width, spec.height)
            .map_err(|e| missing(format!("the image does not decode: {e}")))?;
        let img = Arc::new(img);
        let mut cache = self.backgrounds.lock().unwrap();
        if cache.len() >= 64 {
            cache.clear();
        }
        cache.insert(key, Arc::clone(&img));
        Ok((*img).clone())
    }
}

/// Where `file:` backgrounds of a template file are looked up by `outboxd render`: `[cards]
/// backgrounds`, else the template file's own directory.
pub fn preview_dir(configured: Option<&Path>, template_file: Option<&Path>) -> Option<PathBuf> {
    configured
        .map(Path::to_path_buf)
        .or_else(|| template_file.and_then(Path::parent).map(Path::to_path_buf))
}

/// Decodes a PNG/JPEG, scales it to cover `w`×`h` (centred crop) and lays it over `color`.
fn compose_background(
    bytes: &[u8],
    color: [u8; 4],
    w: u32,
    h: u32,
) -> Result<RgbImage, image::ImageError> {
    let src = image::load_from_memory(bytes)?.to_rgba8();
    let (sw, sh) = src.dimensions();
    let scale = f64::max(w as f64 / sw as f64, h as f64 / sh as f64);
    let (tw, th) = (
        ((sw as f64 * scale).ceil() as u32).max(w),
        ((sh as f64 * scale).ceil() as u32).max(h),
    );
    let scaled = if (tw, th) == (sw, sh) {
        src
    } else {
        image::imageops::resize(&src, tw, th, image::imageops::FilterType::Triangle)
    };
    let (ox, oy) = ((tw - w) / 2, (th - h) / 2);
    let mut out = RgbImage::new(w, h);
    for (x, y, px) in out.enumerate_pixels_mut() {
        let s = scaled.get_pixel(x + ox, y + oy).0;
        let a = s[3] as u32;
        for c in 0..3 {
            px.0[c] = ((s[c] as u32 * a + color[c] as u32 * (255 - a) + 127) / 255) as u8;
        }
    }
    Ok(out)
}

/// Encodes an RGB buffer as PNG at `level` (adaptive filters).
pub fn encode_png(img: &RgbImage, level: CompressionType) -> Vec<u8> {
    let mut out = Vec::with_capacity(img.as_raw().len() / 8);
    PngEncoder::new_with_quality(Cursor::new(&mut out), level, FilterType::Adaptive)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .expect("encoding into memory does not fail");
    out
}

/// `#rgb`, `#rrggbb`, `#rrggbbaa` → RGBA.
pub fn parse_color(s: &str) -> Result<[u8; 4], String> {
    let bad = || format!("colour \"{s}\" must be #rgb, #rrggbb or #rrggbbaa");
    let hex = s.strip_prefix('#').ok_or_else(bad)?;
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| bad());
    match hex.len() {
        3 => {
            let d = |i: usize| u8::from_str_radix(&hex[i..i + 1], 16).map(|v| v * 17);
            Ok([d(0).unwrap(), d(1).unwrap(), d(2).unwrap(), 255])
        }
        6 => Ok([byte(0)?, byte(2)?, byte(4)?, 255]),
        8 => Ok([byte(0)?, byte(2)?, byte(4)?, byte(6)?]),
        _ => Err(bad()),
    }
}

/// One character placed on a line: which font draws it, its glyph, its advance (with kerning).
#[derive(Debug, Clone, Copy)]
struct Placed {
    ch: char,
    face: usize,
    glyph: u16,
    advance: f32,
}

/// A laid-out line: its characters without the trailing spaces and break.
type Line = Vec<Placed>;

fn width(line: &[Placed]) -> f32 {
    line.iter().map(|p| p.advance).sum()
}

fn shape(fonts: &Fonts, primary: usize, text: &str, px: f32) -> Vec<Placed> {
    let mut out: Vec<Placed> = Vec::with_capacity(text.len());
    for ch in text.chars() {
        let (face, glyph) = fonts.glyph_for(primary, ch);
        let advance = if ch == '\n' || ch == '\r' {
            0.0
        } else {
            fonts.face(face).metrics_indexed(glyph, px).advance_width
        };
        if let Some(prev) = out.last_mut() {
            if prev.face == face {
                if let Some(k) = fonts
                    .face(face)
                    .horizontal_kern_indexed(prev.glyph, glyph, px)
                {
                    prev.advance += k;
                }
            }
        }
        out.push(Placed {
            ch,
            face,
            glyph,
            advance,
        });
    }
    out
}

fn trim_end(line: &mut Line) {
    while line.last().is_some_and(|p| p.ch.is_whitespace()) {
        line.pop();
    }
}

/// Breaks `text` into lines of at most `max_w` pixels at UAX #14 opportunities (`wrap`), or at
/// its line feeds only. A segment wider than a whole line is cut between characters.
fn break_lines(
    fonts: &Fonts,
    primary: usize,
    text: &str,
    px: f32,
    max_w: f32,
    wrap: bool,
) -> Vec<Line> {
    let placed = shape(fonts, primary, text, px);
    // Byte offset → index into `placed`.
    let mut at: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    at.push(text.len());
    let mut lines = Vec::new();
    let mut cur: Line = Vec::new();
    let mut start = 0usize;
    let index_of = |byte: usize| at.partition_point(|&b| b < byte);
    for (end, op) in unicode_linebreak::linebreaks(text) {
        let mandatory = op == BreakOpportunity::Mandatory;
        if !wrap && !mandatory {
            continue;
        }
        let (a, b) = (index_of(start), index_of(end));
        start = end;
        let mut seg: Line = placed[a..b].to_vec();
        let hard = mandatory
            && seg.last().is_some_and(|p| {
                matches!(
                    p.ch,
                    '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}' | '\u{b}' | '\u{c}'
                )
            });
        if hard {
            while seg.last().is_some_and(|p| matches!(p.ch, '\n' | '\r')) {
                seg.pop();
            }
        }
        if wrap {
            let mut core = seg.clone();
            trim_end(&mut core);
            if !cur.is_empty() && width(&cur) + width(&core) > max_w {
                trim_end(&mut cur);
                lines.push(std::mem::take(&mut cur));
            }
            if cur.is_empty() && width(&core) > max_w {
                // One word wider than the box: cut it between characters.
                for p in seg {
                    if !cur.is_empty() && !p.ch.is_whitespace() && width(&cur) + p.advance > max_w {
                        lines.push(std::mem::take(&mut cur));
                    }
                    cur.push(p);
                }
            } else {
                cur.extend(seg);
            }
        } else {
            cur.extend(seg);
        }
        if hard {
            trim_end(&mut cur);
            lines.push(std::mem::take(&mut cur));
        }
    }
    trim_end(&mut cur);
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
}

/// The lines box `b` shows for `text` (after wrapping, `max_lines` and the ellipsis), as strings:
/// what [`Cards::render`] draws, for tests and previews.
pub fn layout(fonts: &Fonts, b: &TextBox, text: &str) -> Result<Vec<String>, String> {
    Ok(lay_out(fonts, b, text)?
        .1
        .iter()
        .map(|l| l.iter().map(|p| p.ch).collect())
        .collect())
}

/// Cuts `line` so that it and the ellipsis fit in `max_w`, then appends the ellipsis.
fn ellipsize(
    fonts: &Fonts,
    primary: usize,
    mut line: Line,
    ellipsis: &str,
    px: f32,
    max_w: f32,
) -> Line {
    let ell = shape(fonts, primary, ellipsis, px);
    let ew = width(&ell);
    trim_end(&mut line);
    while !line.is_empty() && width(&line) + ew > max_w {
        line.pop();
        trim_end(&mut line);
    }
    line.extend(ell);
    line
}

/// The box's font and its lines.
fn lay_out(fonts: &Fonts, b: &TextBox, text: &str) -> Result<(usize, Vec<Line>), String> {
    let primary = fonts
        .index(b.font.as_deref())
        .ok_or_else(|| match &b.font {
            Some(f) => format!("no font named \"{f}\" in [cards] fonts"),
            None => "no font configured ([cards] fonts)".to_string(),
        })?;
    let px = b.size;
    let pitch = px * b.line_height.unwrap_or(1.25);
    let max_w = b.width as f32;
    let fit = ((b.height as f32 / pitch).floor() as u32).max(1);
    let visible = b.max_lines.map_or(fit, |m| m.clamp(1, fit)) as usize;
    let ellipsis = b.ellipsis.as_deref().unwrap_or("…");
    let wrap = b.wrap.unwrap_or(true);
    let mut lines = break_lines(fonts, primary, text, px, max_w, wrap);
    if lines.len() > visible {
        lines.truncate(visible);
        let last = lines.pop().expect("visible >= 1");
        lines.push(ellipsize(fonts, primary, last, ellipsis, px, max_w));
    }
    for l in lines.iter_mut() {
        if width(l) > max_w {
            let cut = std::mem::take(l);
            *l = ellipsize(fonts, primary, cut, ellipsis, px, max_w);
        }
    }
    Ok((primary, lines))
}

/// Lays out and draws one box's text, clipped to the box.
fn draw_box(fonts: &Fonts, canvas: &mut RgbImage, b: &TextBox, text: &str) -> Result<(), String> {
    let (primary, lines) = lay_out(fonts, b, text)?;
    let px = b.size;
    let pitch = px * b.line_height.unwrap_or(1.25);
    let max_w = b.width as f32;
    let color = parse_color(b.color.as_deref().unwrap_or("#000000"))?;
    let (ascent, descent) = fonts
        .face(primary)
        .horizontal_line_metrics(px)
        .map_or((px * 0.8, -px * 0.2), |m| (m.ascent, m.descent));
    let clip = (
        b.x as i32,
        b.y as i32,
        (b.x + b.width) as i32,
        (b.y + b.height) as i32,
    );
    for (i, line) in lines.iter().enumerate() {
        let top = b.y as f32 + i as f32 * pitch;
        let baseline = (top + (pitch - (ascent - descent)) / 2.0 + ascent).round() as i32;
        let w = width(line);
        let mut pen = b.x as f32
            + match b.align {
                Align::Left => 0.0,
                Align::Center => (max_w - w) / 2.0,
                Align::Right => max_w - w,
            };
        for p in line {
            if !p.ch.is_whitespace() {
                let g = fonts.raster(p.face, p.glyph, px);
                let gx = pen.round() as i32 + g.metrics.xmin;
                let gy = baseline - g.metrics.ymin - g.metrics.height as i32;
                blend(canvas, &g.coverage, g.metrics.width, gx, gy, color, clip);
            }
            pen += p.advance;
        }
    }
    Ok(())
}

/// Lays coverage (`w` wide) at (`x`, `y`) in `color`, inside `clip` (x0, y0, x1, y1).
fn blend(
    canvas: &mut RgbImage,
    cov: &[u8],
    w: usize,
    x: i32,
    y: i32,
    color: [u8; 4],
    clip: (i32, i32, i32, i32),
) {
    if w == 0 {
        return;
    }
    let (cw, ch) = (canvas.width() as i32, canvas.height() as i32);
    let (x0, y0) = (clip.0.max(0), clip.1.max(0));
    let (x1, y1) = (clip.2.min(cw), clip.3.min(ch));
    let stride = cw as usize * 3;
    let buf: &mut [u8] = canvas;
    for (row, line) in cov.chunks_exact(w).enumerate() {
        let py = y + row as i32;
        if py < y0 || py >= y1 {
            continue;
        }
        for (col, &c) in line.iter().enumerate() {
            let pxx = x + col as i32;
            if c == 0 || pxx < x0 || pxx >= x1 {
                continue;
            }
            let a = c as u32 * color[3] as u32 / 255;
            let o = py as usize * stride + pxx as usize * 3;
            for k in 0..3 {
                let d = buf[o + k] as u32;
                buf[o + k] = ((color[k] as u32 * a + d * (255 - a) + 127) / 255) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours() {
        assert_eq!(parse_color("#fff").unwrap(), [255, 255, 255, 255]);
        assert_eq!(parse_color("#102030").unwrap(), [16, 32, 48, 255]);
        assert_eq!(parse_color("#10203080").unwrap(), [16, 32, 48, 128]);
        assert!(parse_color("red").is_err());
        assert!(parse_color("#12345").is_err());
    }

    #[test]
    fn specs_are_checked() {
        let ok = r##"{"width": 100, "height": 50, "boxes": [{"x": 0, "y": 0, "width": 100, "height": 50, "text": "{{ t }}", "size": 20}]}"##;
        CardSpec::parse("c", ok).unwrap();
        for (bad, says) in [
            (r#"{"width": 0, "height": 50}"#, "width and height"),
            (
                r#"{"width": 10, "height": 10, "boxes": [{"x": 5, "y": 0, "width": 10, "height": 5, "text": "", "size": 9}]}"#,
                "does not fit",
            ),
            (
                r#"{"width": 10, "height": 10, "background": {"image": "http:x"}}"#,
                "db:NAME or file:NAME",
            ),
            (
                r#"{"width": 10, "height": 10, "background": {"image": "file:../etc"}}"#,
                "must be letters",
            ),
            (
                r#"{"width": 10, "height": 10, "colour": 1}"#,
                "unknown field",
            ),
        ] {
            let e = CardSpec::parse("c", bad).unwrap_err();
            assert_eq!(e.code(), "card-spec", "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
        let e = CardSpec::parse("c", &ok.replace("{{ t }}", "{{ t ")).unwrap_err();
        assert_eq!(e.code(), "template-syntax");
    }
}
