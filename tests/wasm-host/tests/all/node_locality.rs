//! The proxy's zone and region come from its Envoy node (`xds.node.locality.zone` and
//! `.region`, or the older `node.locality.*`), so one policy serves a mesh whose proxies run in
//! different zones and regions; a policy `local_zone` or `local_region` overrides them, and a
//! value that is not UTF-8 or too long is ignored and counted.

use fulcrum_core::OVERRIDE_HEADER;
use fulcrum_wasm_host::{Plugin, Property};

use crate::test_support::filter;

/// Two endpoints in zone `a`, two in zone `b`; `locality` is the default policy's.
fn zoned(node_zone: Option<Property>, locality: &str) -> Plugin {
    zoned_at("xds.node.locality.zone", node_zone, locality)
}

/// [`zoned`] with the node's zone served at property `path`.
fn zoned_at(path: &str, node_zone: Option<Property>, locality: &str) -> Plugin {
    let mut builder = filter().configure(format!(
        r#"{{"endpoints": {{"checkout": [
              {{"address": "10.0.0.1:8080", "zone": "a"}}, {{"address": "10.0.0.2:8080", "zone": "a"}},
              {{"address": "10.0.0.3:8080", "zone": "b"}}, {{"address": "10.0.0.4:8080", "zone": "b"}}]}},
            "policy": {{"default": {{"load_balancer": {{"type": "round_robin"}},
                                    "locality": {locality}}}}}}}"#
    ));
    if let Some(zone) = node_zone {
        builder = builder.property(path, zone);
    }
    builder.start().expect("the filter starts")
}

/// The endpoints of 8 picks, sorted and deduplicated.
fn picked(plugin: &Plugin) -> anyhow::Result<Vec<String>> {
    let mut picks = Vec::new();
    for _ in 0..8 {
        let mut request = plugin
            .worker(0)
            .request()
            .header(":authority", "checkout")
            .send_headers()?;
        let header = request
            .request_header(OVERRIDE_HEADER)
            .ok_or_else(|| anyhow::anyhow!("no pick; logs:\n{}", plugin.logs_text()))?;
        let pick = header.split(',').next().unwrap_or_default().to_string();
        request.respond(200).upstream(&pick).finish()?;
        picks.push(pick);
    }
    picks.sort();
    picks.dedup();
    Ok(picks)
}

#[test]
fn requests_stay_in_the_zone_of_the_node() -> anyhow::Result<()> {
    let plugin = zoned(Some(Property::string("b")), "{}");
    assert_eq!(picked(&plugin)?, ["10.0.0.3:8080", "10.0.0.4:8080"]);
    Ok(())
}

#[test]
fn the_zone_is_read_where_older_envoys_serve_it_too() -> anyhow::Result<()> {
    let plugin = zoned_at("node.locality.zone", Some(Property::string("b")), "{}");
    assert_eq!(picked(&plugin)?, ["10.0.0.3:8080", "10.0.0.4:8080"]);
    Ok(())
}

#[test]
fn a_policy_local_zone_overrides_the_node_zone() -> anyhow::Result<()> {
    let plugin = zoned(Some(Property::string("b")), r#"{"local_zone": "a"}"#);
    assert_eq!(picked(&plugin)?, ["10.0.0.1:8080", "10.0.0.2:8080"]);
    Ok(())
}

#[test]
fn without_a_node_zone_every_zone_serves() -> anyhow::Result<()> {
    let plugin = zoned(None, "{}");
    assert_eq!(picked(&plugin)?.len(), 4);
    Ok(())
}

#[test]
fn a_node_zone_that_is_not_utf8_or_too_long_is_ignored_and_counted() -> anyhow::Result<()> {
    for zone in [
        Property::bytes(vec![b'b', 0xff]),
        Property::string(&"b".repeat(254)),
    ] {
        let plugin = zoned(Some(zone), "{}");
        assert_eq!(picked(&plugin)?.len(), 4);
        assert_eq!(
            plugin.metric("fulcrum_request_input_invalid_total.input.node_zone")?,
            1
        );
    }
    Ok(())
}

/// One endpoint in zone `a` of region `r1`, one in zone `b` of `r1`, one in zone `c` of `r2`;
/// the node's region served at `path` and no zone; `locality` is the default policy's.
fn regional(path: &str, region: Option<Property>, locality: &str) -> Plugin {
    let mut builder = filter().configure(format!(
        r#"{{"endpoints": {{"checkout": [
              {{"address": "10.0.0.1:8080", "zone": "a",
                "metadata": {{"topology.kubernetes.io/region": "r1"}}}},
              {{"address": "10.0.0.2:8080", "zone": "b",
                "metadata": {{"topology.kubernetes.io/region": "r1"}}}},
              {{"address": "10.0.0.3:8080", "zone": "c",
                "metadata": {{"topology.kubernetes.io/region": "r2"}}}}]}},
            "policy": {{"default": {{"load_balancer": {{"type": "round_robin"}},
                                    "locality": {locality}}}}}}}"#
    ));
    if let Some(region) = region {
        builder = builder.property(path, region);
    }
    builder.start().expect("the filter starts")
}

#[test]
fn requests_stay_in_the_region_of_the_node() -> anyhow::Result<()> {
    for path in ["xds.node.locality.region", "node.locality.region"] {
        let plugin = regional(path, Some(Property::string("r2")), "{}");
        assert_eq!(picked(&plugin)?, ["10.0.0.3:8080"], "{path}");
    }
    Ok(())
}

#[test]
fn a_policy_local_region_overrides_the_node_region() -> anyhow::Result<()> {
    let plugin = regional(
        "xds.node.locality.region",
        Some(Property::string("r2")),
        r#"{"local_region": "r1"}"#,
    );
    assert_eq!(picked(&plugin)?, ["10.0.0.1:8080", "10.0.0.2:8080"]);
    Ok(())
}

#[test]
fn a_node_region_that_is_not_utf8_or_too_long_is_ignored_and_counted() -> anyhow::Result<()> {
    for region in [
        Property::bytes(vec![b'r', 0xff]),
        Property::string(&"r".repeat(254)),
    ] {
        let plugin = regional("xds.node.locality.region", Some(region), "{}");
        assert_eq!(picked(&plugin)?.len(), 3);
        assert_eq!(
            plugin.metric("fulcrum_request_input_invalid_total.input.node_region")?,
            1
        );
    }
    Ok(())
}
