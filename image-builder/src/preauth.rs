//! Pre-authorising a device with the control plane before it first boots:
//! `POST {server}/api/v1/tpm/preauthorizations` with an operator's API
//! token and an [`api::NewPreauthorization`] (lowercase hex; no
//! `ek_public` without a TPM: pre-authorised by serial). The server answers
//! 201 (created) or 200 (the same device and EK again: idempotent) with an
//! [`api::Preauthorization`], 409 when the device id is pre-authorised with
//! another EK, 401/403 for the token, 422 for an EK it cannot parse.
//! Before that, the batch's enrollment token is checked (`POST
//! /api/v1/enrollment-tokens/check`, [`api::TokenCheck`]); after it, a
//! single-use token for the board is made from it ([`device_token`]). The wire
//! types and paths are [`kernex_protocol::api`]'s, the ones the server
//! uses.

use std::time::Duration;

use kernex_protocol::api;
pub use kernex_protocol::api::paths::PREAUTHORIZATIONS as PATH;
pub use kernex_protocol::api::{EnrollmentToken, Preauthorization};
use serde::Serialize;

/// Largest answer read.
pub const MAX_ANSWER: u64 = 64 * 1024;

/// What is sent: the contract's request. Its
/// [`ek_fingerprint`](api::NewPreauthorization::ek_fingerprint) is what the
/// server must answer with.
pub type PreauthRequest = api::NewPreauthorization;

/// Whether the server created the pre-authorisation or already had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// 201.
    Created,
    /// 200: the same device and EK were pre-authorised before.
    AlreadyPresent,
}

/// Why pre-authorisation failed.
#[derive(Debug, thiserror::Error)]
pub enum PreauthError {
    /// Not an http(s) URL.
    #[error("server URL {0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    /// The server could not be reached or the answer not read.
    #[error("unable to reach {url}: {reason}")]
    Unreachable {
        /// The request URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// 401/403.
    #[error("the server rejected the API token (HTTP {status}): {body}")]
    Unauthorized {
        /// The status.
        status: u16,
        /// The answer.
        body: String,
    },
    /// 409.
    #[error(
        "device id {device_id:?} is already pre-authorised with a different EK (HTTP 409): {body}"
    )]
    Conflict {
        /// The device id.
        device_id: String,
        /// The answer.
        body: String,
    },
    /// The enrollment token is unknown, revoked or expired (404).
    #[error(
        "the server does not accept this enrollment token (unknown, revoked or expired): {body}"
    )]
    UnknownEnrollmentToken {
        /// The answer.
        body: String,
    },
    /// 422.
    #[error("the server rejected the EK (HTTP 422): {body}")]
    BadEk {
        /// The answer.
        body: String,
    },
    /// Any other status.
    #[error("the server refused the pre-authorisation (HTTP {status}): {body}")]
    Refused {
        /// The status.
        status: u16,
        /// The answer.
        body: String,
    },
    /// A 2xx answer that is not the contract's.
    #[error("unexpected answer from the server (HTTP {status}): {reason}")]
    BadAnswer {
        /// The status.
        status: u16,
        /// What is wrong.
        reason: String,
    },
}

/// Sends the pre-authorisation and checks the answer names the same device
/// and EK.
pub fn preauthorize(
    server: &str,
    api_token: &str,
    request: &PreauthRequest,
) -> Result<(Outcome, Preauthorization), PreauthError> {
    let (status, answer) = post_json(server, api::paths::PREAUTHORIZATIONS, api_token, request)?;
    handle_answer(request, status, &answer)
}

/// POSTs `body` as JSON to `server` + `path` with the operator's token;
/// the status and the (bounded) answer.
fn post_json<T: Serialize + ?Sized>(
    server: &str,
    path: &str,
    api_token: &str,
    body: &T,
) -> Result<(u16, Vec<u8>), PreauthError> {
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        return Err(PreauthError::BadUrl(server.to_owned()));
    }
    let url = format!("{}{path}", server.trim_end_matches('/'));
    let unreachable = |reason: String| PreauthError::Unreachable {
        url: url.clone(),
        reason,
    };
    let body = serde_json::to_vec(body).map_err(|e| unreachable(e.to_string()))?;
    let mut resp = agent()
        .post(&url)
        .header("Content-Type", "application/json")
        .header("Authorization", format!("Bearer {api_token}"))
        .send(&body[..])
        .map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status().as_u16();
    let answer = resp
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER)
        .read_to_vec()
        .map_err(|e| unreachable(format!("reading the answer: {e}")))?;
    Ok((status, answer))
}

/// How long a board's own token lives when the batch token has no expiry
/// (one made before expiries were required): 30 days.
pub const DEVICE_TOKEN_TTL_SECS: i64 = 30 * 86_400;

/// Makes the single-use enrollment token one board carries (`POST
/// /api/v1/enrollment-tokens`): the batch token's tags, allowed tags,
/// policy and expiry, `max_uses` 1, labelled with the batch's label and
/// the device id. Read off the board, it enrolls at most one device,
/// where the batch token enrolled any number.
pub fn device_token(
    server: &str,
    api_token: &str,
    batch: &EnrollmentToken,
    device_id: &str,
) -> Result<EnrollmentToken, PreauthError> {
    let mut label = format!("{} / {device_id}", batch.label);
    let mut cut = label.len().min(200);
    while !label.is_char_boundary(cut) {
        cut -= 1;
    }
    label.truncate(cut);
    let request = api::NewEnrollmentToken {
        label,
        tags: batch.tags.clone(),
        allowed_tags: batch.allowed_tags.clone(),
        expires_at: batch.expires_at,
        expires_in_secs: batch.expires_at.is_none().then_some(DEVICE_TOKEN_TTL_SECS),
        max_uses: Some(1),
        link_class: batch.link_class.clone(),
        site: batch.site.clone(),
        time_zone: batch.time_zone.clone(),
        require_preauthorization: batch.require_preauthorization,
        require_tpm: batch.require_tpm,
    };
    let (status, answer) = post_json(server, api::paths::ENROLLMENT_TOKENS, api_token, &request)?;
    let text = || -> String { String::from_utf8_lossy(&answer).chars().take(500).collect() };
    match status {
        201 => {
            let token: EnrollmentToken =
                serde_json::from_slice(&answer).map_err(|e| PreauthError::BadAnswer {
                    status,
                    reason: format!("{e}: {}", text()),
                })?;
            if token.token.is_none() {
                return Err(PreauthError::BadAnswer {
                    status,
                    reason: "the new enrollment token has no secret".into(),
                });
            }
            Ok(token)
        }
        401 | 403 => Err(PreauthError::Unauthorized {
            status,
            body: text(),
        }),
        _ => Err(PreauthError::Refused {
            status,
            body: text(),
        }),
    }
}

/// Revokes enrollment token `id` (`DELETE /api/v1/enrollment-tokens/{id}`):
/// what `provision` does with the board's own token when it failed to
/// write the board. 404 (already gone) is success.
pub fn revoke_token(server: &str, api_token: &str, id: &str) -> Result<(), PreauthError> {
    delete(server, api_token, &api::paths::enrollment_token(id))
}

/// Withdraws the pre-authorisation of `device_id` (`DELETE
/// /api/v1/tpm/preauthorizations/{device_id}`): what `provision` does when
/// it created one and then failed to write the board. 404 (already gone)
/// is success.
pub fn withdraw(server: &str, api_token: &str, device_id: &str) -> Result<(), PreauthError> {
    delete(server, api_token, &api::paths::preauthorization(device_id))
}

/// DELETEs `server` + `path` with the operator's token; 2xx and 404 are
/// success.
fn delete(server: &str, api_token: &str, path: &str) -> Result<(), PreauthError> {
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        return Err(PreauthError::BadUrl(server.to_owned()));
    }
    let url = format!("{}{path}", server.trim_end_matches('/'));
    let mut resp = agent()
        .delete(&url)
        .header("Authorization", format!("Bearer {api_token}"))
        .call()
        .map_err(|e| PreauthError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let status = resp.status().as_u16();
    let body: String = resp
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER)
        .read_to_string()
        .unwrap_or_default()
        .chars()
        .take(500)
        .collect();
    match status {
        200..=299 | 404 => Ok(()),
        401 | 403 => Err(PreauthError::Unauthorized { status, body }),
        _ => Err(PreauthError::Refused { status, body }),
    }
}

fn agent() -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_global(Some(Duration::from_secs(60)))
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .provider(ureq::tls::TlsProvider::NativeTls)
                .build(),
        )
        .build();
    ureq::Agent::new_with_config(config)
}

/// Asks the server whether devices can enroll with `token` now (`POST
/// /api/v1/enrollment-tokens/check`): a token the server does not know,
/// revoked or expired must not be written onto a board.
pub fn check_enrollment_token(
    server: &str,
    api_token: &str,
    token: &str,
) -> Result<EnrollmentToken, PreauthError> {
    let check = api::TokenCheck {
        token: token.to_owned(),
    };
    let (status, answer) = post_json(
        server,
        api::paths::ENROLLMENT_TOKEN_CHECK,
        api_token,
        &check,
    )?;
    let text = || -> String { String::from_utf8_lossy(&answer).chars().take(500).collect() };
    match status {
        200 => serde_json::from_slice(&answer).map_err(|e| PreauthError::BadAnswer {
            status,
            reason: format!("{e}: {}", text()),
        }),
        401 | 403 => Err(PreauthError::Unauthorized {
            status,
            body: text(),
        }),
        404 => Err(PreauthError::UnknownEnrollmentToken { body: text() }),
        _ => Err(PreauthError::Refused {
            status,
            body: text(),
        }),
    }
}

/// Interprets the server's answer (separate from the HTTP exchange so it
/// can be tested on its own).
pub fn handle_answer(
    request: &PreauthRequest,
    status: u16,
    answer: &[u8],
) -> Result<(Outcome, Preauthorization), PreauthError> {
    let text = || -> String { String::from_utf8_lossy(answer).chars().take(500).collect() };
    let outcome = match status {
        201 => Outcome::Created,
        200 => Outcome::AlreadyPresent,
        401 | 403 => {
            return Err(PreauthError::Unauthorized {
                status,
                body: text(),
            });
        }
        409 => {
            return Err(PreauthError::Conflict {
                device_id: request.device_id.clone(),
                body: text(),
            });
        }
        422 => return Err(PreauthError::BadEk { body: text() }),
        _ => {
            return Err(PreauthError::Refused {
                status,
                body: text(),
            });
        }
    };
    let pre: Preauthorization =
        serde_json::from_slice(answer).map_err(|e| PreauthError::BadAnswer {
            status,
            reason: format!("{e}: {}", text()),
        })?;
    if pre.device_id != request.device_id {
        return Err(PreauthError::BadAnswer {
            status,
            reason: format!(
                "it names device {:?}, not {:?}",
                pre.device_id, request.device_id
            ),
        });
    }
    let expected = request.ek_fingerprint();
    let found = pre.ek_fingerprint.as_ref().map(|f| f.to_ascii_lowercase());
    if expected != found {
        return Err(PreauthError::BadAnswer {
            status,
            reason: format!("its EK fingerprint is {found:?}, the TPM's is {expected:?}"),
        });
    }
    Ok((outcome, pre))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use sha2::{Digest, Sha256};

    use super::*;

    fn request(ek: Option<&[u8]>) -> PreauthRequest {
        PreauthRequest {
            device_id: "SN-1".into(),
            ek_public: ek.map(hex::encode),
            ek_certificate: None,
        }
    }

    #[test]
    fn request_body_is_the_contract() {
        let body = serde_json::to_value(request(Some(b"\x00\x01\xab"))).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"device_id": "SN-1", "ek_public": "0001ab"})
        );
        let body = serde_json::to_value(request(None)).unwrap();
        assert_eq!(body, serde_json::json!({"device_id": "SN-1"}));
        let check = api::TokenCheck {
            token: "kxe_1".into(),
        };
        assert_eq!(
            serde_json::to_value(check).unwrap(),
            serde_json::json!({"token": "kxe_1"})
        );
    }

    #[test]
    fn answers_map_to_outcomes_and_named_errors() {
        let ek = b"ek-bytes";
        let fp = hex::encode(Sha256::digest(ek));
        let ok = format!(
            r#"{{"id":"p1","device_id":"SN-1","ek_fingerprint":"{fp}","ek_certificate":false,"created_at":1}}"#
        );
        let r = request(Some(ek));
        assert_eq!(
            handle_answer(&r, 201, ok.as_bytes()).unwrap().0,
            Outcome::Created
        );
        assert_eq!(
            handle_answer(&r, 200, ok.as_bytes()).unwrap().0,
            Outcome::AlreadyPresent
        );
        let serial = request(None);
        let by_serial = br#"{"id":"p2","device_id":"SN-1","ek_fingerprint":null,"ek_certificate":false,"created_at":1,"extra":1}"#;
        assert!(handle_answer(&serial, 201, by_serial).is_ok());
        assert!(matches!(
            handle_answer(&r, 201, by_serial),
            Err(PreauthError::BadAnswer { .. })
        ));
        let other = br#"{"id":"p1","device_id":"SN-2","ek_fingerprint":null,"ek_certificate":false,"created_at":1}"#;
        assert!(matches!(
            handle_answer(&serial, 200, other),
            Err(PreauthError::BadAnswer { .. })
        ));
        assert!(matches!(
            handle_answer(&r, 409, b"{}"),
            Err(PreauthError::Conflict { .. })
        ));
        assert!(matches!(
            handle_answer(&r, 422, br#"{"error":"bad EK"}"#),
            Err(PreauthError::BadEk { .. })
        ));
        for status in [401, 403] {
            assert!(matches!(
                handle_answer(&r, status, b""),
                Err(PreauthError::Unauthorized { .. })
            ));
        }
        assert!(matches!(
            handle_answer(&r, 500, b"oops"),
            Err(PreauthError::Refused { status: 500, .. })
        ));
        assert!(matches!(
            handle_answer(&r, 201, b"not json"),
            Err(PreauthError::BadAnswer { .. })
        ));
    }
}
