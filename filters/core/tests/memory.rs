//! What a VM's services hold in memory, measured by counting the allocator's bytes: a mesh of
//! 1,000 services of 10 endpoints applied at once, at rest and once every endpoint answered.
//!
//! Issue #16 budgets a proxy's memory at 10,000 endpoints; the filter's VM is measured by
//! `cargo bench -p fulcrum-wasm-host --bench snapshot` (wasm32, whose pointers are half
//! these). This test pins the core's share natively, so a change that makes a service or an
//! endpoint dearer fails here first. Its own binary: the counting allocator is global, and
//! the one test in it measures alone.

use std::{alloc::System, collections::BTreeMap, collections::BTreeSet, time::Duration};

use fulcrum_core::{
    Endpoint, Policy, Served, ServiceEndpoints, ServicePicker, ServicePolicy,
    distribution::content_hash,
    mesh::{Change, Hashed, Lifecycle, Services},
    rng::SplitMix64,
    service::Outcome,
    tables::DEFAULT_TABLE_BUDGET_BYTES,
    window::Window,
};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const SERVICES: usize = 1_000;
const ENDPOINTS: usize = 10;

/// Bytes held since `region` began: allocated, less freed (stats_alloc counts a
/// reallocation's growth as allocated and its shrinking as freed).
fn held(region: &Region<'_, System>) -> isize {
    let change = region.change();
    change.bytes_allocated as isize - change.bytes_deallocated as isize
}

/// Bare pickers: the core's state alone, without the filter's stats and shared-data keys.
struct Pickers;

impl Lifecycle<ServicePicker> for Pickers {
    fn create(&mut self, _: &str, policy: &ServicePolicy, endpoints: &[Endpoint]) -> ServicePicker {
        ServicePicker::new(policy, endpoints)
    }

    fn release(&mut self, _: &mut ServicePicker, _: &[Endpoint]) {}
}

fn mesh() -> BTreeMap<String, Hashed<ServiceEndpoints>> {
    (0..SERVICES)
        .map(|service| {
            let [_, _, high, low] = (service as u32).to_be_bytes();
            let value = ServiceEndpoints {
                endpoints: (0..ENDPOINTS)
                    .map(|endpoint| {
                        Endpoint::new(([10, high, low, endpoint as u8 + 1], 8080).into())
                    })
                    .collect(),
                protocol: None,
            };
            let hash = content_hash(&serde_json::to_vec(&value).expect("a service serializes"));
            (format!("svc-{service:04}"), Hashed { hash, value })
        })
        .collect()
}

#[test]
fn a_ten_endpoint_service_holds_under_5_kib_and_an_answering_endpoint_one_window_more() {
    let mut services = Services::<ServicePicker>::new(Policy::default());
    let region = Region::new(ALLOCATOR);
    let upserted = mesh();
    services
        .apply(
            Change {
                version: "v1".to_owned(),
                upserted,
                ..Change::default()
            },
            DEFAULT_TABLE_BUDGET_BYTES,
            &mut Pickers,
        )
        .expect("the mesh fits the table budget");
    // The change was made after the region began and is freed by now: what is held is the
    // services' alone.
    let at_rest = held(&region);
    let per_service = at_rest / SERVICES as isize;
    println!("at rest: {at_rest} bytes, {per_service} per service of {ENDPOINTS} endpoints");
    assert!(
        per_service < 5 * 1024,
        "a service of {ENDPOINTS} endpoints holds {per_service} bytes at rest"
    );

    let mut picked = 0;
    let mut rng = SplitMix64::new(7);
    let now = Duration::from_secs(1);
    let ok = Outcome {
        status: Some(200),
        latency: Duration::from_millis(1),
        ..Outcome::default()
    };
    for picker in services.values_mut() {
        // The default algorithm draws: picks until every endpoint had one, bounded. The set
        // is freed before the next service, so its bytes are not counted as the traffic's.
        let mut seen = BTreeSet::new();
        for _ in 0..ENDPOINTS * 50 {
            let pick = picker
                .pick(&Default::default(), now, &mut rng)
                .expect("a healthy endpoint");
            picker.complete(pick.endpoint, Served::ByPick, ok, now);
            seen.insert(pick.endpoint);
            if seen.len() == ENDPOINTS {
                break;
            }
        }
        picked += seen.len();
    }
    let traffic = held(&region) - at_rest;
    assert_eq!(picked, SERVICES * ENDPOINTS, "every endpoint answered");
    let per_endpoint = traffic / (SERVICES * ENDPOINTS) as isize;
    println!("after a request to every endpoint: {traffic} bytes more, {per_endpoint} each");
    assert!(
        per_endpoint <= size_of::<Window>() as isize,
        "an endpoint's first answer costs {per_endpoint} bytes, more than its window"
    );
}
