//! The OpenAPI 3.1 document of the REST API and the DingTalk center's `/v1/dd/*` endpoints,
//! served at `/api/v1/openapi.json`. Written out here
//! (it is small); the tests check it against the handlers: every property it lists is accepted,
//! every required one is refused when missing, every error code it names exists.

use serde_json::{json, Value};

use super::envelope::ErrorKind;

pub fn document() -> Value {
    let codes: Vec<Value> = ErrorKind::ALL
        .iter()
        .map(|k| json!({"code": k.code(), "status": k.status().as_u16(), "meaning": k.meaning()}))
        .collect();
    let envelope = json!({
        "type": "object",
        "required": ["id", "ok", "code", "msg", "data", "count"],
        "properties": {
            "id": {"type": "integer", "description": "1 on success, 0 on failure"},
            "ok": {"type": "integer", "enum": [0, 1]},
            "code": {"type": "integer", "description": "0 on success, else one of x-error-codes"},
            "msg": {"type": "string"},
            "data": {},
            "count": {"type": "integer"}
        }
    });
    let failure = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}});
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "outboxd REST API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Enqueue messages into the PostgreSQL outbox (api.send_message). Every answer is the envelope {id, ok, code, msg, data, count}."
        },
        "x-error-codes": codes,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Envelope": envelope,
                "SendRequest": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["agent", "address"],
                    "properties": {
                        "agent": {"type": "string", "description": "Agent code (e.g. smtp.agent) or id"},
                        "profile": {"type": "string", "default": "default"},
                        "address": {"type": "string"},
                        "subject": {"type": "string"},
                        "content": {"description": "A string is stored as is; any other JSON value as its JSON text"},
                        "code": {"type": "string", "description": "Idempotency key; default: the Idempotency-Key header"},
                        "priority": {"type": "integer", "default": 0},
                        "send_at": {"type": "string", "format": "date-time"},
                        "label": {"type": "string"},
                        "description": {"type": "string"},
                        "parent": {"type": "string", "format": "uuid"},
                        "max_attempts": {"type": "integer", "minimum": 1}
                    }
                }
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/message/send": {
                "post": {
                    "summary": "Enqueue one message (api.send_message); it is prepared and delivered by the daemon",
                    "parameters": [{
                        "name": "Idempotency-Key", "in": "header", "required": false,
                        "schema": {"type": "string"},
                        "description": "Becomes the message code: the same key for the same agent returns the same message"
                    }, wait_parameter()],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SendRequest"}}}},
                    "responses": {
                        "200": {
                            "description": "Enqueued; data.id is the message id. With ?wait=: data.state (submitted, or prepared/sending when the wait ended first) and data.provider_id once submitted",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
                        },
                        "400": failure("Invalid body or unknown agent (codes 40001, 40002, 40003)"),
                        "401": failure("Missing or wrong bearer token (40101)"),
                        "413": failure("Body too large (41301)"),
                        "500": failure("The database refused the request (50001)"),
                        "502": failure("With ?wait=: the message failed (50201); data is \"[error code] error text\""),
                        "503": failure("The database is unavailable (50301)")
                    }
                }
            }
        }
    });
    doc["paths"]["/api/v1/task/{id}/run"] = super::task_api::openapi_path();
    let schemas = doc["components"]["schemas"]
        .as_object_mut()
        .expect("an object");
    for (name, schema) in dd_schemas() {
        schemas.insert(name.into(), schema);
    }
    for (path, op) in dd_paths() {
        doc["paths"][path] = op;
    }
    doc
}

/// `?wait=` of the send endpoints.
fn wait_parameter() -> Value {
    json!({
        "name": "wait", "in": "query", "required": false,
        "schema": {"type": "string", "examples": ["5s", "1500ms"]},
        "description": format!(
            "Wait up to this long (a duration or seconds; at most {} s) for the outcome: submitted, failed, or the state the message is in when the wait ends",
            super::outcome::MAX_WAIT.as_secs()
        )
    })
}

/// The request bodies of `/v1/dd/*`, with DingTalk's field names.
fn dd_schemas() -> Vec<(&'static str, Value)> {
    let ids = json!({"oneOf": [
        {"type": "string", "description": "Comma-separated, as DingTalk takes it"},
        {"type": "array", "items": {"type": ["string", "integer"]}}
    ]});
    let msg = json!({
        "description": "DingTalk's msg object ({\"msgtype\": \"text\", \"text\": {\"content\": …}}, markdown, link, action_card, oa, image/file/voice with a media_id), or a string holding it",
        "type": ["object", "string"]
    });
    vec![
        (
            "DdTopapiMessage",
            json!({
                "type": "object",
                "required": ["msg"],
                "description": "At least one of userid_list, dept_id_list and to_all_user",
                "properties": {
                    "userid_list": ids, "dept_id_list": ids,
                    "to_all_user": {"type": ["boolean", "string"]},
                    "agent_id": {"description": "Accepted and ignored: the profile's agent_id is used"},
                    "msg": msg
                }
            }),
        ),
        (
            "DdChatSend",
            json!({
                "type": "object",
                "required": ["chatid", "msg"],
                "properties": {"chatid": {"type": "string"}, "msg": msg}
            }),
        ),
        (
            "DdChatCreate",
            json!({
                "type": "object",
                "required": ["name", "owner", "useridlist"],
                "properties": {"name": {"type": "string"}, "owner": {"type": "string", "description": "userid"}, "useridlist": ids}
            }),
        ),
        (
            "DdMediaUploadJson",
            json!({
                "type": "object",
                "required": ["media"],
                "properties": {
                    "type": {"enum": super::dd::MEDIA_TYPES},
                    "media": {"type": "object", "required": ["base64"], "properties": {
                        "base64": {"type": "string"}, "filename": {"type": "string"}
                    }}
                }
            }),
        ),
        (
            "DdMediaUploadForm",
            json!({
                "type": "object",
                "required": ["media"],
                "properties": {
                    "type": {"enum": super::dd::MEDIA_TYPES},
                    "media": {"type": "string", "format": "binary"}
                }
            }),
        ),
    ]
}

/// The DingTalk message center's endpoints.
fn dd_paths() -> Vec<(&'static str, Value)> {
    let profile = json!({
        "name": "profile", "in": "query", "required": false,
        "schema": {"type": "string", "default": "default"},
        "description": "The dingtalk connector profile"
    });
    let answers = |ok: &str| {
        json!({
            "200": {"description": ok, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}},
            "400": {"description": "code 1; data \"[40001|40002|40004] …\" (bad JSON, a bad or missing field, unknown profile)"},
            "401": {"description": "code 1; data \"[40101] missing or wrong bearer token\""},
            "502": {"description": "code 1; DingTalk refused (or, with ?wait=, the message failed): data \"[<DingTalk errcode>] <errmsg>\""}
        })
    };
    let body = |schema: &str| json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let send = |summary: &str, schema: &str, id_name: &str| {
        json!({"post": {
            "summary": summary,
            "description": "The DingTalk message center's endpoint. Failures: code 1 and data \"[errcode] errmsg\".",
            "parameters": [profile.clone(), wait_parameter(), {
                "name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string"}
            }],
            "requestBody": body(schema),
            "responses": answers(&format!("Enqueued: data.id is the message id; with ?wait=, data.state and, once submitted, data.{id_name}"))
        }})
    };
    vec![
        (
            "/v1/dd/topapi/message",
            send(
                "A work notification (asyncsend_v2) through the outbox",
                "DdTopapiMessage",
                "task_id",
            ),
        ),
        (
            "/v1/dd/chat/send",
            send(
                "A group chat message (chat/send) through the outbox",
                "DdChatSend",
                "messageId",
            ),
        ),
        (
            "/v1/dd/chat/create",
            json!({"post": {
                "summary": "chat/create, called directly and recorded in outbox.dingtalk_calls",
                "parameters": [profile.clone()],
                "requestBody": body("DdChatCreate"),
                "responses": answers("data.chatid is the new chat")
            }}),
        ),
        (
            "/v1/dd/media/upload",
            json!({"post": {
                "summary": "media/upload, called directly and recorded in outbox.dingtalk_calls",
                "parameters": [profile, {
                    "name": "type", "in": "query", "required": false, "schema": {"enum": super::dd::MEDIA_TYPES},
                    "description": "The media type, when the body does not give it"
                }],
                "requestBody": {"required": true, "content": {
                    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/DdMediaUploadForm"}},
                    "application/json": {"schema": {"$ref": "#/components/schemas/DdMediaUploadJson"}}
                }},
                "responses": answers("data.media_id is the upload, data.type its type")
            }}),
        ),
    ]
}
