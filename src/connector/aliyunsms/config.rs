//! The configuration of an `aliyunsms` profile and its AccessKey pair.

use std::path::PathBuf;

use serde::Deserialize;

use crate::settings::{Dur, Secret, SecretSource};

/// An `aliyunsms` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliyunSmsConfig {
    /// The AccessKey id, inline…
    pub access_key_id: Option<Secret>,
    /// …or the name of an environment variable holding it…
    pub access_key_id_env: Option<String>,
    /// …or the path of a file holding it. One of the three is required.
    pub access_key_id_file: Option<PathBuf>,
    /// The AccessKey secret (the HMAC key), inline…
    pub access_key_secret: Option<Secret>,
    /// …or the name of an environment variable holding it…
    pub access_key_secret_env: Option<String>,
    /// …or the path of a file holding it. One of the three is required.
    pub access_key_secret_file: Option<PathBuf>,
    /// Base URL of the SMS API (requests go to `<endpoint>/`). Default
    /// `https://dysmsapi.aliyuncs.com`.
    pub endpoint: Option<String>,
    /// `RegionId`. Default `cn-hangzhou`.
    pub region_id: Option<String>,
    /// `SignName` when the content names none (an approved sign).
    pub sign_name: Option<String>,
    /// `TemplateCode` when the content names none (an approved template, `SMS_…`).
    pub template_code: Option<String>,
    /// How long `isv.BUSINESS_LIMIT_CONTROL` holds the profile back when Aliyun's message names
    /// the minute cap or no cap (an hour cap holds 1 h, a day cap until midnight China time).
    /// Default 1m.
    pub business_limit_block: Option<Dur>,
    /// Whether the first attempt also asks QuerySendDetails before sending. Default true: a
    /// daemon killed (lease expired) or stopped (handed back) during a SendSms gives the message
    /// back with its attempt number unchanged, so `attempt > 1` alone would miss those. `false`
    /// saves one query per SMS and accepts a duplicate after such an interruption.
    pub check_first_attempt: Option<bool>,
    /// Request timeout (common key). Default 10s.
    pub timeout: Option<Dur>,
}

/// The AccessKey pair.
#[derive(Clone)]
pub(super) struct Keys {
    pub id: Secret,
    pub secret: Secret,
}

pub(super) fn load_keys(cfg: &AliyunSmsConfig) -> Result<Keys, (&'static str, String)> {
    let one = |value: &Option<Secret>, env: &Option<String>, file: &Option<PathBuf>, what| {
        SecretSource::of(value, env, file)
            .resolve(what)
            .map_err(|m| (what, m))?
            .filter(|s| !s.expose().trim().is_empty())
            .ok_or_else(|| (what, format!("required: set {what}_env or {what}_file")))
    };
    Ok(Keys {
        id: one(
            &cfg.access_key_id,
            &cfg.access_key_id_env,
            &cfg.access_key_id_file,
            "access_key_id",
        )?,
        secret: one(
            &cfg.access_key_secret,
            &cfg.access_key_secret_env,
            &cfg.access_key_secret_file,
            "access_key_secret",
        )?,
    })
}
