//! The font registry of picture cards: every configured font file parsed once, when the daemon
//! (or `outboxd render`) starts, then shared by every card it renders.
//!
//! A card's text box names a font; a character that font has no glyph for is drawn with the
//! first font of the fallback list that has one (a Latin font with a CJK fallback, say). A
//! character no font has is drawn with the box font's "missing glyph" box.
//!
//! Glyph bitmaps are cached by (font, glyph, pixel size): the cards of one template draw the same
//! characters at the same sizes again and again. The cache is bounded (emptied when it passes
//! [`GLYPH_CACHE_LIMIT`] entries), so odd texts cannot make it grow without end.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

/// Glyph bitmaps kept before the cache is emptied (a few MB at card sizes).
pub const GLYPH_CACHE_LIMIT: usize = 20_000;

/// Font files parsed by this process so far (every [`Fonts::load`] adds its fonts). Tests use it
/// to show that rendering never parses a font.
static FACES_PARSED: AtomicUsize = AtomicUsize::new(0);

/// How many font files this process has parsed.
pub fn faces_parsed() -> usize {
    FACES_PARSED.load(Ordering::SeqCst)
}

/// `[cards]` of the main file: fonts, the fallback list, the backgrounds directory.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardsConfig {
    /// Font name (what a text box's `font` says) → file: TrueType/OpenType (`.ttf`, `.otf`) or a
    /// collection (`.ttc`, first face; `file.ttc#2` picks another). Relative paths are relative
    /// to the main file.
    #[serde(default)]
    pub fonts: BTreeMap<String, PathBuf>,
    /// Font names tried in order for a character the box's font has no glyph for.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// The font of a box that names none. Default: the first of `fallback`, else the first font
    /// by name.
    pub default_font: Option<String>,
    /// Where `"background": {"image": "file:NAME"}` is looked up.
    pub backgrounds: Option<PathBuf>,
}

impl CardsConfig {
    /// Makes relative paths relative to `base` (the main file's directory).
    pub fn resolve(mut self, base: &Path) -> CardsConfig {
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        self.fonts = self.fonts.into_iter().map(|(k, p)| (k, abs(p))).collect();
        self.backgrounds = self.backgrounds.map(abs);
        self
    }
}

/// Why the font registry cannot be built (the daemon does not start).
#[derive(Debug, thiserror::Error)]
pub enum FontError {
    #[error("[cards] fonts.{name}: cannot read {path}: {source}")]
    Read {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("[cards] fonts.{name}: {path} is not a font: {detail}")]
    Parse {
        name: String,
        path: String,
        detail: String,
    },
    #[error("[cards] {key}: no font named \"{name}\" in [cards] fonts")]
    Unknown { key: &'static str, name: String },
}

/// One parsed font.
pub struct Face {
    pub name: String,
    pub font: fontdue::Font,
}

/// A rasterized glyph: coverage bytes, `width` × `height`, placed at `xmin`/`ymin` from the pen.
pub struct Glyph {
    pub metrics: fontdue::Metrics,
    pub coverage: Vec<u8>,
}

/// The parsed fonts, shared (`Arc`) by every renderer of the process.
pub struct Fonts {
    faces: Vec<Face>,
    by_name: HashMap<String, usize>,
    fallback: Vec<usize>,
    default: Option<usize>,
    glyphs: RwLock<HashMap<(usize, u16, u32), Arc<Glyph>>>,
}

impl std::fmt::Debug for Fonts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fonts")
            .field(
                "faces",
                &self.faces.iter().map(|x| &x.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Fonts {
    /// Reads and parses every configured font (once; this is the slow part: a CJK font has tens
    /// of thousands of glyphs).
    pub fn load(cfg: &CardsConfig) -> Result<Fonts, FontError> {
        let mut faces = Vec::new();
        for (name, path) in &cfg.fonts {
            let (file, index) = split_index(path);
            let shown = path.display().to_string();
            let data = std::fs::read(&file).map_err(|source| FontError::Read {
                name: name.clone(),
                path: shown.clone(),
                source,
            })?;
            let settings = fontdue::FontSettings {
                collection_index: index,
                ..fontdue::FontSettings::default()
            };
            let font =
                fontdue::Font::from_bytes(data, settings).map_err(|detail| FontError::Parse {
                    name: name.clone(),
                    path: shown,
                    detail: detail.to_string(),
                })?;
            FACES_PARSED.fetch_add(1, Ordering::SeqCst);
            faces.push(Face {
                name: name.clone(),
                font,
            });
        }
        Self::from_faces(faces, &cfg.fallback, cfg.default_font.as_deref())
    }

    /// A registry of fonts already parsed (tests, embedding programs).
    pub fn from_faces(
        faces: Vec<Face>,
        fallback: &[String],
        default_font: Option<&str>,
    ) -> Result<Fonts, FontError> {
        let by_name: HashMap<String, usize> = faces
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect();
        let find = |key: &'static str, n: &str| {
            by_name.get(n).copied().ok_or_else(|| FontError::Unknown {
                key,
                name: n.to_string(),
            })
        };
        let fallback = fallback
            .iter()
            .map(|n| find("fallback", n))
            .collect::<Result<Vec<_>, _>>()?;
        let default = match default_font {
            Some(n) => Some(find("default_font", n)?),
            None => fallback
                .first()
                .copied()
                .or((!faces.is_empty()).then_some(0)),
        };
        Ok(Fonts {
            faces,
            by_name,
            fallback,
            default,
            glyphs: RwLock::new(HashMap::new()),
        })
    }

    /// The index of a font by name; `None` names the default font.
    pub fn index(&self, name: Option<&str>) -> Option<usize> {
        match name {
            Some(n) => self.by_name.get(n).copied(),
            None => self.default,
        }
    }

    pub fn face(&self, i: usize) -> &fontdue::Font {
        &self.faces[i].font
    }

    pub fn is_empty(&self) -> bool {
        self.faces.is_empty()
    }

    /// The font (the box's own, else the first fallback that has it) and glyph index that draw `c`.
    pub fn glyph_for(&self, primary: usize, c: char) -> (usize, u16) {
        let g = self.faces[primary].font.lookup_glyph_index(c);
        if g != 0 || c.is_whitespace() {
            return (primary, g);
        }
        for &f in &self.fallback {
            let g = self.faces[f].font.lookup_glyph_index(c);
            if g != 0 {
                return (f, g);
            }
        }
        (primary, 0)
    }

    /// The bitmap of glyph `g` of font `f` at `px` pixels, from the cache or rasterized now.
    pub fn raster(&self, f: usize, g: u16, px: f32) -> Arc<Glyph> {
        let key = (f, g, px.to_bits());
        if let Some(hit) = self.glyphs.read().unwrap().get(&key) {
            return Arc::clone(hit);
        }
        let (metrics, coverage) = self.faces[f].font.rasterize_indexed(g, px);
        let glyph = Arc::new(Glyph { metrics, coverage });
        let mut cache = self.glyphs.write().unwrap();
        if cache.len() >= GLYPH_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, Arc::clone(&glyph));
        glyph
    }
}

/// `file.ttc#2` → (`file.ttc`, 2); no `#N`: index 0.
fn split_index(path: &Path) -> (PathBuf, u32) {
    let s = path.to_string_lossy();
    if let Some((file, n)) = s.rsplit_once('#') {
        if let Ok(i) = n.parse() {
            return (PathBuf::from(file), i);
        }
    }
    (path.to_path_buf(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_index() {
        assert_eq!(
            split_index(Path::new("/f/a.ttc#2")),
            (PathBuf::from("/f/a.ttc"), 2)
        );
        assert_eq!(
            split_index(Path::new("/f/a.ttf")),
            (PathBuf::from("/f/a.ttf"), 0)
        );
    }

    #[test]
    fn unknown_fallback_is_named() {
        let e = Fonts::from_faces(Vec::new(), &["cjk".into()], None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "[cards] fallback: no font named \"cjk\" in [cards] fonts"
        );
    }
}
