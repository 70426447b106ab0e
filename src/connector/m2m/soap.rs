//! SOAP for the M2M XML API: building the `SendMessage` envelope, recognising a pre-built one,
//! and reading answers and faults. Small on purpose: the API's answers are a handful of elements,
//! so a flat list of elements in document order is all callers need.
//!
//! Invariants: every text written is escaped (CR as a character reference, so XML's end-of-line
//! normalisation keeps it); every text read has its references resolved.

use crate::connector::codes;
use quick_xml::events::{BytesDecl, BytesStart, BytesText, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use quick_xml::writer::Writer;

use super::SoapVersion;
use crate::connector::provider::{kebab, truncate};
use crate::connector::DeliveryError;

/// Namespace of the M2M XML API's operations.
pub const M2M_NS: &str = "http://mcommunicator.ru/M2M";
/// SOAP 1.1 envelope namespace.
pub const SOAP11_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// SOAP 1.2 envelope namespace.
pub const SOAP12_NS: &str = "http://www.w3.org/2003/05/soap-envelope";

/// A whole envelope for `operation` in the M2M namespace, one child element per field; every
/// value is XML-escaped.
pub fn build_envelope(version: SoapVersion, operation: &str, fields: &[(&str, &str)]) -> String {
    let (prefix, ns) = match version {
        SoapVersion::V11 => ("soap", SOAP11_NS),
        SoapVersion::V12 => ("soap12", SOAP12_NS),
    };
    let mut w = Writer::new(Vec::new());
    let xmlns = format!("xmlns:{prefix}");
    let write = |w: &mut Writer<Vec<u8>>| -> std::io::Result<()> {
        w.write_event(Event::Decl(BytesDecl::new("1.0", Some("utf-8"), None)))?;
        w.create_element(format!("{prefix}:Envelope"))
            .with_attribute(("xmlns:xsi", "http://www.w3.org/2001/XMLSchema-instance"))
            .with_attribute(("xmlns:xsd", "http://www.w3.org/2001/XMLSchema"))
            .with_attribute((xmlns.as_str(), ns))
            .write_inner_content(|w| {
                w.create_element(format!("{prefix}:Body"))
                    .write_inner_content(|w| {
                        w.create_element(operation)
                            .with_attribute(("xmlns", M2M_NS))
                            .write_inner_content(|w| {
                                for (name, value) in fields {
                                    w.create_element(*name)
                                        .write_text_content(xml_text(value))?;
                                }
                                Ok(())
                            })?;
                        Ok(())
                    })?;
                Ok(())
            })?;
        Ok(())
    };
    write(&mut w).expect("writing to a Vec cannot fail");
    String::from_utf8(w.into_inner()).expect("quick-xml writes UTF-8")
}

/// Text for an element: XML-escaped, with CR written as a character reference so that XML's
/// end-of-line normalisation (XML 1.0 §2.11) does not turn CRLF into LF on the other side.
pub(super) fn xml_text(s: &str) -> BytesText<'static> {
    BytesText::from_escaped(quick_xml::escape::escape(s).replace('\r', "&#13;"))
}

/// A pre-built envelope found in `content`.
#[derive(Debug, PartialEq)]
pub struct Envelope {
    pub version: SoapVersion,
    /// Local name of the first element of the Body (`SendMessage`).
    pub operation: String,
}

/// Whether `content` is a whole SOAP envelope: its root element is `Envelope`, with or without a
/// prefix (`<soap:Envelope`, `<soap12:Envelope`, `<Envelope`). The SOAP version comes from the
/// envelope's namespace (1.2 when it is the 1.2 one, else 1.1). An envelope that is not well-formed
/// XML is a `bad-content`: posting it would only earn a fault, and escaping it as SMS text would
/// text the recipient a page of XML.
pub fn detect_envelope(content: &str) -> Result<Option<Envelope>, DeliveryError> {
    let t = content.trim_start_matches('\u{feff}').trim_start();
    if !t.starts_with('<') {
        return Ok(None);
    }
    let mut reader = NsReader::from_str(t);
    let root_is_envelope = loop {
        match reader.read_event() {
            Ok(Event::Start(s) | Event::Empty(s)) => break local_name(&s) == "Envelope",
            Ok(Event::Decl(_) | Event::Comment(_) | Event::PI(_) | Event::DocType(_)) => {}
            Ok(Event::Text(x)) if x.iter().all(u8::is_ascii_whitespace) => {}
            _ => break false,
        }
    };
    if !root_is_envelope {
        return Ok(None);
    }
    let elements = parse_elements(t).map_err(|e| {
        DeliveryError::permanent(
            codes::BAD_CONTENT.code,
            format!("content looks like a SOAP envelope but is not well-formed XML: {e}"),
        )
    })?;
    let version = if elements[0].ns.as_deref() == Some(SOAP12_NS) {
        SoapVersion::V12
    } else {
        SoapVersion::V11
    };
    let operation = elements
        .iter()
        .find(|e| e.depth == 2 && e.parent.as_deref() == Some("Body"))
        .map_or_else(|| "SendMessage".to_string(), |e| e.name.clone());
    Ok(Some(Envelope { version, operation }))
}

/// One element of a parsed document, in document order.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Element {
    /// Namespace URI, when bound.
    pub(super) ns: Option<String>,
    /// Local name.
    pub(super) name: String,
    /// Local name of the parent element.
    pub(super) parent: Option<String>,
    /// 0 for the root.
    pub(super) depth: usize,
    /// Text directly inside the element, references resolved.
    pub(super) text: String,
}

/// Parses XML into a flat list of elements. Small on purpose: the answers of the M2M API are a
/// handful of elements, and a flat list lets callers ask "the first `SendMessageResult`".
pub(super) fn parse_elements(xml: &str) -> Result<Vec<Element>, String> {
    let mut reader = NsReader::from_str(xml);
    let mut out: Vec<Element> = Vec::new();
    let mut stack: Vec<usize> = Vec::new();
    loop {
        let (ns, ev) = reader.read_resolved_event().map_err(|e| e.to_string())?;
        let ns = match ns {
            ResolveResult::Bound(n) => Some(String::from_utf8_lossy(n.as_ref()).into_owned()),
            _ => None,
        };
        match ev {
            Event::Start(ref s) | Event::Empty(ref s) => {
                let idx = out.len();
                out.push(Element {
                    ns,
                    name: local_name(s),
                    parent: stack.last().map(|&i| out[i].name.clone()),
                    depth: stack.len(),
                    text: String::new(),
                });
                if matches!(ev, Event::Start(_)) {
                    stack.push(idx);
                }
            }
            Event::End(_) => {
                stack.pop();
            }
            Event::Text(t) => {
                let s = t.xml10_content().map_err(|e| e.to_string())?;
                if let Some(&i) = stack.last() {
                    out[i].text.push_str(&s);
                } else if !s.trim().is_empty() {
                    return Err("text outside the root element".into());
                }
            }
            Event::CData(t) => {
                if let Some(&i) = stack.last() {
                    out[i]
                        .text
                        .push_str(&t.xml10_content().map_err(|e| e.to_string())?);
                }
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref().map_err(|e| e.to_string())? {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.decode().map_err(|e| e.to_string())?;
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| format!("unknown entity &{name};"))?
                            .to_string()
                    }
                };
                if let Some(&i) = stack.last() {
                    out[i].text.push_str(&resolved);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if out.is_empty() {
        return Err("no root element".into());
    }
    if !stack.is_empty() {
        return Err("unclosed element".into());
    }
    Ok(out)
}

fn local_name(s: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(s.local_name().as_ref()).into_owned()
}

/// What a SOAP fault says.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Fault {
    /// `faultcode` (1.1) or `Code/Value` (1.2), e.g. `soap:Server`.
    pub(super) code: String,
    /// `faultstring` (1.1) or `Reason/Text` (1.2).
    pub(super) reason: String,
    /// Every text inside the fault, detail included, where the MTS code may also be.
    pub(super) all_text: String,
}

pub(super) fn find_fault(elements: &[Element]) -> Option<Fault> {
    let start = elements.iter().position(|e| {
        e.name == "Fault" && matches!(e.ns.as_deref(), Some(SOAP11_NS | SOAP12_NS))
    })?;
    let depth = elements[start].depth;
    let mut f = Fault::default();
    for e in elements[start + 1..].iter().take_while(|e| e.depth > depth) {
        let t = e.text.trim();
        match (e.parent.as_deref(), e.name.as_str()) {
            (_, "faultcode") | (Some("Code"), "Value") if f.code.is_empty() => f.code = t.into(),
            (_, "faultstring") | (Some("Reason"), "Text") if f.reason.is_empty() => {
                f.reason = t.into()
            }
            _ => {}
        }
        if !t.is_empty() {
            f.all_text.push_str(t);
            f.all_text.push(' ');
        }
    }
    Some(f)
}

/// The fault strings of the M2M API and whether each is worth retrying (providers.md §2.9, 3.3).
pub(super) const FAULTS: &[(&str, bool)] = &[
    ("SYSTEM_FAILURE", true),
    ("TOO_MANY_PARAMETERS", false),
    ("INCORRECT_PASSWORD", false),
    ("MSID_FORMAT_ERROR", false),
    ("MESSAGE_FORMAT_ERROR", false),
    ("WRONG_ID", false),
    ("MESSAGE_HANDLING_ERROR", false),
    ("NO_SUCH_SUBSCRIBER", false),
    ("TEST_LIMIT_EXCEEDED", false),
    ("TRUSTED_LIMIT_EXCEEDED", false),
    ("IP_NOT_ALLOWED", false),
    ("MAX_LENGTH_EXCEEDED", false),
    ("OPERATION_NOT_ALLOWED", false),
    ("EMPTY_MESSAGE_NOT_ALLOWED", false),
    ("ACCOUNT_IS_BLOCKED", false),
    ("OBJECT_ALREADY_EXISTS", false),
    ("MSID_IS_IN_BLACKLIST", false),
    ("MSIDS_ARE_IN_BLACKLIST", false),
    ("TIME_IS_IN_THE_PAST", false),
];

/// The stable error code of an M2M fault string: `m2m-` and the string in kebab case.
pub fn fault_code(fault: &str) -> String {
    codes::family(codes::M2M_FAULT_NAME, &kebab(fault))
}

pub(super) fn classify_fault(f: &Fault) -> DeliveryError {
    let reason = format!(
        "SOAP fault {}: {}",
        if f.code.is_empty() {
            "(no code)"
        } else {
            &f.code
        },
        truncate(
            if f.reason.is_empty() {
                &f.all_text
            } else {
                &f.reason
            },
            512
        )
    );
    // ASMX wraps the code in prose ("Server was unable to process request. ---> X"): look for a
    // whole word, so MSID_IS_IN_BLACKLIST and MSIDS_ARE_IN_BLACKLIST stay apart.
    let known = format!("{} {}", f.reason, f.all_text)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .find_map(|w| FAULTS.iter().find(|(name, _)| *name == w).copied());
    match known {
        Some((name, true)) => DeliveryError::retry(fault_code(name), reason),
        Some((name, false)) => DeliveryError::permanent(fault_code(name), reason),
        None => {
            // SOAP 1.1 `Client` / 1.2 `Sender`: the request itself is wrong, sending it again
            // will not help. Anything else may be the server's passing trouble.
            let local = f.code.rsplit(':').next().unwrap_or_default();
            if matches!(local, "Client" | "Sender") {
                DeliveryError::permanent(codes::M2M_FAULT.code, reason)
            } else {
                DeliveryError::retry(codes::M2M_FAULT.code, reason)
            }
        }
    }
}
