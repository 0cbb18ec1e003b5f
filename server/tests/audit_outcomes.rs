//! The audit log records a failed operator action as `error: <status>
//! <reason>`. The service layer writes that outcome without knowing HTTP;
//! this pins it to the status the API answers for the same error.

use kernex_server::http;
use kernex_server::service::{self, audit};

fn cases() -> Vec<service::Error> {
    vec![
        service::Error::Invalid("devices: 1 to 10000 device ids".into()),
        service::Error::Unauthorized,
        service::Error::Forbidden,
        service::Error::Refused("prove your TPM first".into()),
        service::Error::NotFound("no such device"),
        service::Error::Conflict("release 1.2.3 already exists".into()),
        service::Error::TooLarge(1024),
        service::Error::Unprocessable("bad signature".into()),
        service::Error::TooManyRequests(7),
        service::Error::Internal(anyhow::anyhow!("disk on fire")),
    ]
}

#[test]
fn outcomes_match_the_api_status() {
    for (a, b) in cases().into_iter().zip(cases()) {
        let from_service = audit::summary(&a);
        let from_http = http::Error::from(b).summary();
        assert_eq!(from_service, from_http);
    }
}

#[test]
fn internals_never_reach_the_log() {
    let e = service::Error::Internal(anyhow::anyhow!("disk on fire"));
    assert_eq!(audit::summary(&e), "500");
}
