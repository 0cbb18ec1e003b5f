use super::*;

fn target(i: usize, class: &str, site: &str, bytes: u64) -> Target {
    Target {
        pk: format!("pk{i:05}"),
        device_id: format!("d{i}"),
        hardware_class: "hw".into(),
        link_class: class.into(),
        site: Some(site.into()),
        time_zone: None,
        from_release_id: None,
        from_version: None,
        bytes,
        tpm: true,
    }
}

#[test]
fn early_picks_are_diverse() {
    let mut ts: Vec<Target> = (0..100)
        .map(|i| {
            let class = ["ethernet", "wifi", "metered-4g"][i % 3];
            target(i, class, &format!("site{}", i % 10), 1000)
        })
        .collect();
    diversity_order(&mut ts);
    let first: std::collections::HashSet<_> = ts[..5].iter().map(|t| t.site.clone()).collect();
    assert_eq!(first.len(), 5, "five canaries from five sites");
    let classes: std::collections::HashSet<_> =
        ts[..3].iter().map(|t| t.link_class.clone()).collect();
    assert_eq!(classes.len(), 3, "first three from three link classes");
    assert_eq!(ts.len(), 100);
}

#[test]
fn order_is_a_permutation_independent_of_input_order() {
    let make = || -> Vec<Target> {
        (0..5000)
            .map(|i| {
                let class = ["ethernet", "wifi", "metered-4g"][i % 3];
                let mut t = target(i, class, &format!("site{}", i % 97), 1000);
                t.hardware_class = ["hw-a", "hw-b"][i % 2].into();
                if i % 11 == 0 {
                    t.site = None;
                }
                t
            })
            .collect()
    };
    let mut a = make();
    let mut b = make();
    b.reverse();
    diversity_order(&mut a);
    diversity_order(&mut b);
    let pa: Vec<&str> = a.iter().map(|t| t.pk.as_str()).collect();
    let pb: Vec<&str> = b.iter().map(|t| t.pk.as_str()).collect();
    assert_eq!(pa, pb);
    let mut sorted = pa.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 5000);
    // The first picks alternate hardware classes and cover many sites.
    assert_ne!(a[0].hardware_class, a[1].hardware_class);
    let sites: std::collections::HashSet<_> = a[..60].iter().map(|t| t.site.clone()).collect();
    assert!(sites.len() >= 55, "{}", sites.len());
}

#[test]
fn projection_respects_cap_and_budget() {
    let spec: RolloutSpec = serde_json::from_value(serde_json::json!({
        "release_id": "r",
        "waves": [{"percent": 100, "soak_secs": 0}],
        "bandwidth": {"egress_cap_bytes_per_sec": 1000, "max_concurrent_downloads": 10,
          "link_classes": {"metered-4g": {"rate_bytes_per_sec": 100, "budget_bytes_per_day": 5000}}}
    }))
    .unwrap_or_else(|e| unreachable!("{e}"));
    let ts: Vec<Target> = (0..20)
        .map(|i| target(i, "metered-4g", &format!("s{i}"), 12_000))
        .collect();
    let plan = project(&spec, &ts, &[20], 0, Assumptions::default());
    assert!(plan.peak_reserved_bytes_per_sec <= 1000);
    assert_eq!(plan.unschedulable, 0);
    // 12 kB at 5 kB a day: three windows on three days.
    assert!(plan.devices.iter().all(|d| d.windows == 3));
    assert!(plan.end_ms >= 2 * DAY_MS);
}

fn spec_with(waves: serde_json::Value) -> RolloutSpec {
    serde_json::from_value(serde_json::json!({"release_id": "r", "waves": waves}))
        .unwrap_or_else(|e| unreachable!("{e}"))
}

#[test]
fn attestation_waves_take_only_devices_with_a_tpm() {
    // 20 devices, every 4th without a TPM.
    let ts: Vec<Target> = (0..20)
        .map(|i| Target {
            tpm: i % 4 != 0,
            ..target(i, "ethernet", "s", 10)
        })
        .collect();
    let gate = serde_json::json!({"require_attestation": true});
    // Canaries gated, the rest not: the canaries' TPM-less devices move on.
    let s = spec_with(serde_json::json!([{"count": 5, "gates": gate}, {"percent": 100}]));
    let a = assign_waves(&s, ts.clone());
    assert_eq!(a.sizes, vec![5, 15]);
    assert!(a.targets[..5].iter().all(|t| t.tpm));
    assert_eq!(a.cannot_attest, vec![2, 0]);
    assert_eq!(a.moved_to, vec![Some(1), None]);
    assert!(a.left_out.is_empty());
    assert_eq!(a.targets.len(), 20);
    // The two passed over come first in wave 2, in their order.
    assert_eq!(a.targets[5].pk, "pk00000");
    assert_eq!(a.targets[6].pk, "pk00004");
    // Every wave gated: devices without a TPM are left out.
    let s = spec_with(
        serde_json::json!([{"count": 5, "gates": gate}, {"percent": 100, "gates": gate}]),
    );
    let a = assign_waves(&s, ts.clone());
    assert_eq!(a.sizes, vec![5, 10]);
    assert_eq!(a.left_out.len(), 5);
    assert!(a.left_out.iter().all(|t| !t.tpm));
    assert_eq!(a.cannot_attest, vec![2, 3]);
    assert_eq!(a.moved_to, vec![None, None]);
    // No gate: the plain split.
    let s = spec_with(serde_json::json!([{"count": 5}, {"percent": 100}]));
    let a = assign_waves(&s, ts);
    assert_eq!(a.sizes, vec![5, 15]);
    assert_eq!(a.targets[0].pk, "pk00000");
    assert_eq!(a.cannot_attest, vec![0, 0]);
}
