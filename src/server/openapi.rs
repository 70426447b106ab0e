//! The OpenAPI 3.1 document of the REST API, served at `/api/v1/openapi.json`. Written out here
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
                    }],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SendRequest"}}}},
                    "responses": {
                        "200": {
                            "description": "Enqueued; data.id is the message id",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
                        },
                        "400": failure("Invalid body or unknown agent (codes 40001, 40002, 40003)"),
                        "401": failure("Missing or wrong bearer token (40101)"),
                        "413": failure("Body too large (41301)"),
                        "500": failure("The database refused the request (50001)"),
                        "503": failure("The database is unavailable (50301)")
                    }
                }
            }
        }
    });
    doc["paths"]["/api/v1/task/{id}/run"] = super::task_api::openapi_path();
    doc
}
