//! The device list at fleet scale, on SQLite and PostgreSQL: keyset pages
//! that walk the whole fleet (the `Link: rel="next"` header), counts from
//! the database (`X-Total-Count`), server-side search and filters, and the
//! web UI built on them: the overview's counts and search at 5,001
//! devices, bulk actions on a filter that reach the rollout selector,
//! device edits with the error next to the field, and rollout buttons that
//! follow the state.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use common::{Harness, upload_sim_releases};
use serde_json::{Value, json};

/// Inserts `n` devices `dev-0000000`.. of class `sim-x86` running 1.0.0,
/// seen now, hostname `host-{i}`, tag `even` on even ones, in one
/// transaction (enrolling thousands through the API would take minutes).
async fn seed(h: &Harness, n: usize) -> String {
    let pool = h.state.store.pool();
    let (org,): (String,) = sqlx::query_as("SELECT id FROM organizations WHERE name = 'default'")
        .fetch_one(pool)
        .await
        .unwrap();
    let now = kernex_server::store::now_ms();
    let mut tx = pool.begin().await.unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut sql = String::from(
            "INSERT INTO devices (id, org_id, device_id, hardware_class, hardware_metadata, current_version, status, credential_hash, revoked, registered_at, last_seen_at) VALUES ",
        );
        let rows: Vec<String> = chunk
            .iter()
            .map(|i| {
                format!(
                    "('pk{i:07}', '{org}', 'dev-{i:07}', 'sim-x86', '{{\"hostname\":\"host-{i}\"}}', '1.0.0', 'online', 'cred{i}', 0, 0, {now})"
                )
            })
            .collect();
        sql.push_str(&rows.join(", "));
        sqlx::query(&sql).execute(&mut *tx).await.unwrap();
        let tags: Vec<String> = chunk
            .iter()
            .filter(|i| *i % 2 == 0)
            .map(|i| format!("('pk{i:07}', '{org}', 'even')"))
            .collect();
        if !tags.is_empty() {
            sqlx::query(&format!(
                "INSERT INTO device_tags (device_pk, org_id, tag) VALUES {}",
                tags.join(", ")
            ))
            .execute(&mut *tx)
            .await
            .unwrap();
        }
    }
    tx.commit().await.unwrap();
    org
}

/// `GET path` with the admin token: status, headers, JSON.
async fn get(h: &Harness, path: &str) -> (StatusCode, HeaderMap, Value) {
    let (s, hd, bytes) = h
        .raw(Method::GET, path, Some(&h.admin), &[], Body::empty())
        .await;
    (s, hd, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn total(hd: &HeaderMap) -> i64 {
    hd.get("x-total-count")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The URL of the `rel="next"` link, if any.
fn next(hd: &HeaderMap) -> Option<String> {
    let v = hd.get("link")?.to_str().unwrap();
    let url = v.strip_prefix('<')?.split_once('>')?.0.to_string();
    assert!(v.ends_with("rel=\"next\""), "{v}");
    Some(url)
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_string())
        .collect()
}

/// Follows the Link headers from `first`; every page's ids and count.
async fn walk(h: &Harness, first: &str) -> (Vec<Vec<String>>, Vec<i64>) {
    let mut url = Some(first.to_string());
    let (mut pages, mut totals) = (Vec::new(), Vec::new());
    while let Some(u) = url {
        let (s, hd, v) = get(h, &u).await;
        assert_eq!(s, StatusCode::OK, "{u}: {v}");
        pages.push(ids(&v));
        totals.push(total(&hd));
        url = next(&hd);
        assert!(pages.len() < 100, "the pages do not end");
    }
    (pages, totals)
}

async fn pages_walk_the_whole_fleet(h: Arc<Harness>) {
    seed(&h, 1203).await;
    // No parameter: a plain array of the first 500, as before paging.
    let (s, hd, v) = get(&h, "/api/v1/devices").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), 500);
    assert_eq!(total(&hd), 1203);
    let (pages, totals) = walk(&h, "/api/v1/devices?limit=500").await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [500, 500, 203]
    );
    assert!(totals.iter().all(|t| *t == 1203), "{totals:?}");
    let all: Vec<String> = pages.concat();
    let expected: Vec<String> = (0..1203).map(|i| format!("dev-{i:07}")).collect();
    assert_eq!(all, expected, "every device once, in device id order");

    // A filter is kept from page to page, and counted as a whole.
    let (pages, totals) = walk(&h, "/api/v1/devices?tag=even&limit=250").await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [250, 250, 102]
    );
    assert!(totals.iter().all(|t| *t == 602), "{totals:?}");
    assert!(pages.concat().iter().all(|d| {
        let n: usize = d.trim_start_matches("dev-").parse().unwrap();
        n.is_multiple_of(2)
    }));

    // Limits: at most 5000, at least 1.
    let (_, hd, v) = get(&h, "/api/v1/devices?limit=99999").await;
    assert_eq!(v.as_array().unwrap().len(), 1203);
    assert!(next(&hd).is_none());
    let (_, hd, v) = get(&h, "/api/v1/devices?limit=0").await;
    assert_eq!(ids(&v), ["dev-0000000"]);
    assert!(next(&hd).unwrap().contains("limit=0"));

    // A cursor this server did not issue is a 400 that says so.
    for bad in ["zz", "not-hex", &"ab".repeat(600)] {
        let (s, _, v) = get(&h, &format!("/api/v1/devices?after={bad}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert!(v["detail"].as_str().unwrap().contains("after"), "{v}");
    }
}

async fn search_matches_ids_hostnames_and_tags(h: Arc<Harness>) {
    seed(&h, 1203).await;
    let find = |q: &str| format!("/api/v1/devices?q={q}&limit=5000");
    // The device id, in any case.
    let (_, hd, v) = get(&h, &find("DEV-000119")).await;
    assert_eq!(
        ids(&v),
        (1190..1200)
            .map(|i| format!("dev-{i:07}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(total(&hd), 10);
    // The hostname of its hardware metadata.
    let (_, hd, v) = get(&h, &find("host-1201")).await;
    assert_eq!(ids(&v), ["dev-0001201"]);
    assert_eq!(total(&hd), 1);
    // A tag.
    let (_, hd, _) = get(&h, &find("eve")).await;
    assert_eq!(total(&hd), 602);
    // LIKE's wildcards are plain characters.
    for q in ["%25", "_", "dev-%25"] {
        let (s, hd, v) = get(&h, &find(q)).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(total(&hd), 0, "{q}: {v}");
    }
    // Search with a filter.
    let (_, hd, _) = get(&h, "/api/v1/devices?q=dev-00011&tag=even").await;
    assert_eq!(total(&hd), 50);
    // Bounded input.
    let (s, _, v) = get(&h, &find(&"x".repeat(129))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("q:"), "{v}");
    let (s, _, v) = get(&h, "/api/v1/devices?status=sleeping").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("status"), "{v}");
    let (s, _, _) = get(&h, "/api/v1/devices?surprise=1").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// A browser session on the UI: cookie and CSRF token.
struct Ui {
    cookie: String,
    csrf: String,
}

async fn page(h: &Harness, ui: &Ui, path: &str) -> (StatusCode, String) {
    let (s, _, bytes) = h
        .raw(
            Method::GET,
            path,
            None,
            &[("cookie", &ui.cookie)],
            Body::empty(),
        )
        .await;
    (s, String::from_utf8(bytes).unwrap())
}

async fn post(
    h: &Harness,
    ui: &Ui,
    path: &str,
    fields: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut all = vec![("csrf", ui.csrf.as_str())];
    all.extend_from_slice(fields);
    let (s, hd, bytes) = h
        .raw(
            Method::POST,
            path,
            None,
            &[
                ("cookie", &ui.cookie),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            Body::from(serde_urlencoded::to_string(&all).unwrap()),
        )
        .await;
    (s, hd, String::from_utf8(bytes).unwrap())
}

async fn ui(h: &Harness) -> Ui {
    let cookie = format!("kernex_session={}", h.admin);
    let mut ui = Ui {
        cookie,
        csrf: String::new(),
    };
    let (s, body) = page(h, &ui, "/ui/devices").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let marker = "name=\"csrf\" value=\"";
    let start = body.find(marker).unwrap() + marker.len();
    ui.csrf = body[start..start + body[start..].find('"').unwrap()].to_string();
    ui
}

/// The value of `attr="..."` on the element that has `marker`.
fn attr_after(html: &str, marker: &str, attr: &str) -> String {
    let at = html.find(marker).unwrap_or_else(|| panic!("no {marker}"));
    let rest = &html[at..];
    let key = format!("{attr}=\"");
    let start = rest.find(&key).unwrap() + key.len();
    rest[start..start + rest[start..].find('"').unwrap()].to_string()
}

async fn ui_counts_and_search_at_5001(h: Arc<Harness>) {
    seed(&h, 5001).await;
    let ui = ui(&h).await;
    let (s, body) = page(&h, &ui, "/ui/").await;
    assert_eq!(s, StatusCode::OK);
    let t = attr_after(&body, "data-count=\"total\"", "data-count");
    assert_eq!(t, "total");
    let cards = body.split("data-count=\"total\"").nth(1).unwrap();
    assert!(cards.contains(">5001<"), "the overview counts every device");
    let (_, body) = page(&h, &ui, "/ui/devices").await;
    assert_eq!(
        attr_after(&body, "id=\"device-count\"", "data-total"),
        "5001"
    );
    assert_eq!(body.matches("data-device=\"").count(), 100, "one page");
    let next = attr_after(&body, "id=\"next-page\"", "href").replace("&amp;", "&");
    let (s, body) = page(&h, &ui, &next).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        body.contains("data-device=\"dev-0000100\""),
        "the second page"
    );
    // Search finds a device beyond the first 5,000 and the 4,999th.
    for (q, want) in [("dev-0004999", "dev-0004999"), ("host-5000", "dev-0005000")] {
        let (_, body) = page(&h, &ui, &format!("/ui/devices?q={q}")).await;
        assert_eq!(
            attr_after(&body, "id=\"device-count\"", "data-total"),
            "1",
            "{q}"
        );
        assert!(body.contains(&format!("data-device=\"{want}\"")), "{q}");
    }
    // A bad address is said in the page's words, not the parser's.
    let (s, body) = page(&h, &ui, "/ui/devices?colour=red").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body.contains("filters are q, status"), "{body}");
    assert!(!body.contains("unknown field"), "{body}");
}

async fn bulk_tag_on_a_filter_reaches_the_rollout_selector(h: Arc<Harness>) {
    let releases = upload_sim_releases(&h).await;
    seed(&h, 300).await;
    let ui = ui(&h).await;
    // Tag the devices whose id contains "dev-000001": dev-0000010 to
    // dev-0000019.
    let (s, _, body) = post(
        &h,
        &ui,
        "/ui/devices/bulk",
        &[
            ("f_q", "dev-000001"),
            ("scope", "filter"),
            ("action", "tag"),
            ("value", "canary"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains("Tagged 10 device(s) with canary."), "{body}");
    let (_, hd, _) = get(&h, "/api/v1/devices?tag=canary").await;
    assert_eq!(total(&hd), 10);
    // A selection, and a refused value shown with the values kept.
    let (s, _, body) = post(
        &h,
        &ui,
        "/ui/devices/bulk",
        &[
            ("scope", "selected"),
            ("device", "pk0000001"),
            ("device", "pk0000003"),
            ("action", "link_class"),
            ("value", "metered-4g"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("Changed the link of 2 device(s)."), "{body}");
    let (s, _, body) = post(
        &h,
        &ui,
        "/ui/devices/bulk",
        &[
            ("scope", "selected"),
            ("device", "pk0000001"),
            ("action", "time_zone"),
            ("value", "Mars/Olympus"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("Not done: time_zone"), "{body}");
    assert!(body.contains("value=\"Mars/Olympus\""), "the value is kept");
    // The rollout selector sees the tag and the link class.
    let spec = json!({
        "release_id": releases[1],
        "selector": {"tags": ["canary"]},
        "waves": [{"percent": 100, "soak_secs": 0}],
    });
    let (s, p) = h
        .call(
            Method::POST,
            "/api/v1/rollouts/preview",
            Some(&h.admin),
            Some(spec),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(p["targets"], 10);
    let (s, link) = h
        .call(
            Method::GET,
            "/api/v1/devices/pk0000003/link",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(link["link"]["link_class"], "metered-4g", "{link}");
    // Untag on the same filter, audited once.
    let (_, _, body) = post(
        &h,
        &ui,
        "/ui/devices/bulk",
        &[
            ("f_tag", "canary"),
            ("scope", "filter"),
            ("action", "untag"),
            ("value", "canary"),
        ],
    )
    .await;
    assert!(
        body.contains("Removed tag canary from 10 device(s)."),
        "{body}"
    );
    let (n,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM audit_log WHERE action = 'device.bulk_untag'")
            .fetch_one(h.state.store.pool())
            .await
            .unwrap();
    assert_eq!(n, 1);
}

async fn device_edits_keep_the_values_and_say_what_is_wrong(h: Arc<Harness>) {
    seed(&h, 3).await;
    let ui = ui(&h).await;
    let (s, _, body) = post(
        &h,
        &ui,
        "/ui/devices/pk0000001/tags",
        &[("tags", "lab, bad!tag")],
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body.contains("id=\"tags-error\""), "{body}");
    assert!(body.contains("bad!tag"), "{body}");
    assert!(
        body.contains("value=\"lab, bad!tag\""),
        "the typed value is kept"
    );
    let (s, hd, _) = post(
        &h,
        &ui,
        "/ui/devices/pk0000001/tags",
        &[("tags", "lab plant-7, lab")],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(hd.get("location").unwrap(), "/ui/devices/pk0000001#tags");
    let (_, d) = h
        .call(
            Method::GET,
            "/api/v1/devices/pk0000001",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(d["tags"], json!(["lab", "plant-7"]));

    let (s, _, body) = post(
        &h,
        &ui,
        "/ui/devices/pk0000001/link",
        &[
            ("link_class", "wifi"),
            ("site", "plant-7"),
            ("time_zone", "Mars/Olympus"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body.contains("id=\"link-error\""), "{body}");
    assert!(body.contains("value=\"Mars/Olympus\"") && body.contains("value=\"plant-7\""));
    let (s, _, _) = post(
        &h,
        &ui,
        "/ui/devices/pk0000001/link",
        &[
            ("link_class", "wifi"),
            ("site", "plant-7"),
            ("time_zone", "Europe/Berlin"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (_, link) = h
        .call(
            Method::GET,
            "/api/v1/devices/pk0000001/link",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(link["link"]["time_zone"], "Europe/Berlin", "{link}");
    // The device page shows what was done to it.
    let (_, body) = page(&h, &ui, "/ui/devices/pk0000001").await;
    let history = body.split("id=\"history\"").nth(1).unwrap();
    assert!(
        history.contains("device.tags") && history.contains("device.link"),
        "{history}"
    );
}

async fn rollout_buttons_follow_the_state(h: Arc<Harness>) {
    let releases = upload_sim_releases(&h).await;
    seed(&h, 4).await;
    let ui = ui(&h).await;
    let spec = json!({"release_id": releases[1], "waves": [{"percent": 100, "soak_secs": 0}]});
    let (s, r) = h
        .call(Method::POST, "/api/v1/rollouts", Some(&h.admin), Some(spec))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let id = r["id"].as_str().unwrap();
    let (_, live) = page(&h, &ui, &format!("/ui/rollouts/{id}/live")).await;
    assert!(live.contains("data-action=\"start\""), "{live}");
    let (s, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{id}/abort"),
            Some(&h.admin),
            None,
        )
        .await;
    assert!(s.is_success(), "{s}");
    // The live fragment carries the buttons: an aborted rollout offers
    // only the rollback.
    let (_, live) = page(&h, &ui, &format!("/ui/rollouts/{id}/live")).await;
    assert!(live.contains("data-action=\"rollback\""), "{live}");
    for gone in ["pause", "abort", "start", "resume"] {
        assert!(
            !live.contains(&format!("data-action=\"{gone}\"")),
            "{gone}: {live}"
        );
    }
    assert!(
        live.len() < 20_000,
        "a live update is small: {}",
        live.len()
    );
    // A button from a stale page: the refusal in place, with what is
    // possible now.
    let (s, _, body) = post(&h, &ui, &format!("/ui/rollouts/{id}/pause"), &[]).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(body.contains("id=\"refused\""), "{body}");
    assert!(body.contains("The rollout is now aborted"), "{body}");
    assert!(body.contains("data-action=\"rollback\""));
}

both!(
    pages_walk_the_whole_fleet,
    search_matches_ids_hostnames_and_tags,
    ui_counts_and_search_at_5001,
    bulk_tag_on_a_filter_reaches_the_rollout_selector,
    device_edits_keep_the_values_and_say_what_is_wrong,
    rollout_buttons_follow_the_state,
);
