//! The configuration the manifests hand to fulcrum: the ConfigMap's policy through
//! fulcrum-core, the pluginConfig through the filter's own parser, and the names that must
//! agree across files (cluster, header, service port).

use anyhow::{Context, Result};
use fulcrum_balancer::config::FilterConfig;
use fulcrum_core::{
    DataPlane, NATIVE_LB_POLICY, NATIVE_MODULE, NATIVE_OUTCOME_FILTER, Policy, ServicePolicy,
};
use serde_json::Value;

use crate::test_support::{SAMPLE_DIGEST, istio_objects, rendered_template};

fn object(type_name: &str, name: &str) -> Result<Value> {
    istio_objects()?
        .into_iter()
        .find(|d| d.type_name() == type_name && d.value["metadata"]["name"] == name)
        .map(|d| d.value)
        .with_context(|| format!("no {type_name} {name} under istio/"))
}

#[test]
fn policy_configmap_is_a_valid_fulcrum_core_policy() -> Result<()> {
    let configmap = object("v1/ConfigMap", "fulcrum-policy")?;
    let text = configmap["data"]["policy.yaml"]
        .as_str()
        .context("data.policy.yaml")?;
    let policy = Policy::from_yaml(text)?;
    assert!(
        policy
            .services
            .contains_key("outbound|8080||checkout.shop.svc.cluster.local")
    );
    assert_eq!(policy.default.retry, 1);
    Ok(())
}

#[test]
fn plugin_config_is_accepted_by_the_filter() -> Result<()> {
    let plugin = rendered_template("wasmplugin", "r/f:1", SAMPLE_DIGEST)?.value;
    let bytes = serde_json::to_vec(&plugin["spec"]["pluginConfig"])?;
    let config = FilterConfig::parse(&bytes)?;
    let control_plane = config.control_plane.context("control_plane")?;
    assert_eq!(control_plane.cluster, "fulcrum_control_plane");
    assert_eq!(config.override_header, "x-fulcrum-endpoint");
    Ok(())
}

#[test]
fn the_snapshot_cluster_reaches_the_control_plane_http_port() -> Result<()> {
    let filter = object(
        "networking.istio.io/v1alpha3/EnvoyFilter",
        "fulcrum-control-plane-cluster",
    )?;
    let cluster = &filter["spec"]["configPatches"][0]["patch"]["value"];
    assert_eq!(cluster["name"], "fulcrum_control_plane");
    let address = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    assert_eq!(
        address["address"],
        "fulcrum-control-plane.fulcrum-system.svc.cluster.local"
    );
    let service = object("v1/Service", "fulcrum-control-plane")?;
    let http = service["spec"]["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "http-api"))
        .context("http-api port")?;
    assert_eq!(address["port_value"], http["port"]);
    Ok(())
}

#[test]
fn the_filter_balances_exactly_the_clusters_that_read_and_strip_its_header() -> Result<()> {
    let filter = object(
        "networking.istio.io/v1alpha3/EnvoyFilter",
        "fulcrum-override-host",
    )?;
    let mut patched: Vec<String> = filter["spec"]["configPatches"]
        .as_array()
        .context("configPatches")?
        .iter()
        .map(|patch| {
            let cluster = &patch["match"]["cluster"];
            // Istio's name for the outbound cluster of a Service port.
            format!(
                "outbound|{}||{}",
                cluster["portNumber"],
                cluster["service"].as_str().unwrap_or_default()
            )
        })
        .collect();
    patched.sort();
    for template in ["wasmplugin", "trafficextension"] {
        let rendered = rendered_template(template, "r/f:1", SAMPLE_DIGEST)?.value;
        let spec = &rendered["spec"];
        let plugin_config = if template == "wasmplugin" {
            &spec["pluginConfig"]
        } else {
            &spec["wasm"]["pluginConfig"]
        };
        let config = FilterConfig::parse(&serde_json::to_vec(plugin_config)?)?;
        let mut listed = config.only_services.context("only_services")?;
        listed.sort();
        assert_eq!(listed, patched, "{template}'s only_services");
    }
    Ok(())
}

#[test]
fn override_host_reads_and_strips_the_header_the_filter_writes() -> Result<()> {
    let filter = object(
        "networking.istio.io/v1alpha3/EnvoyFilter",
        "fulcrum-override-host",
    )?;
    let plugin = rendered_template("wasmplugin", "r/f:1", SAMPLE_DIGEST)?.value;
    let header = plugin["spec"]["pluginConfig"]["override_header"]
        .as_str()
        .context("override_header")?;
    for patch in filter["spec"]["configPatches"]
        .as_array()
        .context("configPatches")?
    {
        let value = &patch["patch"]["value"];
        let override_host =
            &value["load_balancing_policy"]["policies"][0]["typed_extension_config"];
        assert_eq!(
            override_host["name"],
            "envoy.load_balancing_policies.override_host"
        );
        assert_eq!(
            override_host["typed_config"]["override_host_sources"][0]["header"],
            header
        );
        let options = &value["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        let filters = options["http_filters"].as_array().context("http_filters")?;
        assert_eq!(
            filters[0]["typed_config"]["mutations"]["request_mutations"][0]["remove"],
            header
        );
        assert_eq!(
            filters.last().context("codec")?["name"],
            "envoy.filters.http.upstream_codec"
        );
    }
    Ok(())
}

/// The native data plane's patches (istio/native): the cluster's policy is the module's,
/// configured with exactly the ConfigMap's entry for that service, and the outcome filter
/// names the same module; both reach only the workloads that carry it.
#[test]
fn native_patches_carry_the_configmaps_policy_to_the_module_of_labelled_workloads() -> Result<()> {
    let rendered = crate::kustomize::render("istio/native")?;
    assert_eq!(rendered.len(), 2, "the LB patch and the outcome filter");
    let lb = object(
        "networking.istio.io/v1alpha3/EnvoyFilter",
        "fulcrum-native-lb",
    )?;
    let outcomes = object(
        "networking.istio.io/v1alpha3/EnvoyFilter",
        "fulcrum-native-outcomes",
    )?;
    assert_eq!(
        lb["spec"]["workloadSelector"],
        outcomes["spec"]["workloadSelector"]
    );
    assert_eq!(
        lb["spec"]["workloadSelector"]["labels"]["fulcrum.io/native"],
        "true"
    );

    let configmap = object("v1/ConfigMap", "fulcrum-policy")?;
    let policy = Policy::from_yaml(
        configmap["data"]["policy.yaml"]
            .as_str()
            .context("data.policy.yaml")?,
    )?;
    let patches = lb["spec"]["configPatches"]
        .as_array()
        .context("configPatches")?;
    assert!(!patches.is_empty());
    for patch in patches {
        let cluster = &patch["match"]["cluster"];
        let name = format!(
            "outbound|{}||{}",
            cluster["portNumber"],
            cluster["service"]
                .as_str()
                .context("match.cluster.service")?
        );
        let module = &patch["patch"]["value"]["load_balancing_policy"]["policies"][0]["typed_extension_config"];
        assert_eq!(
            module["name"],
            "envoy.load_balancing_policies.dynamic_modules"
        );
        let config = &module["typed_config"];
        assert_eq!(config["dynamic_module_config"]["name"], NATIVE_MODULE);
        assert_eq!(config["lb_policy_name"], NATIVE_LB_POLICY);
        assert_eq!(
            config["lb_policy_config"]["@type"],
            "type.googleapis.com/google.protobuf.StringValue"
        );
        let json = config["lb_policy_config"]["value"]
            .as_str()
            .context("lb_policy_config.value")?;
        let in_patch: ServicePolicy = serde_json::from_str(json)
            .with_context(|| format!("{name}: the patch's policy JSON"))?;
        let in_configmap = policy
            .services
            .get(&name)
            .with_context(|| format!("{name} is not in the fulcrum-policy ConfigMap"))?;
        assert_eq!(&in_patch, in_configmap, "{name}");
        assert_eq!(in_patch.data_plane, DataPlane::Native, "{name}");
    }
    // Every native service of the ConfigMap is patched.
    let native = policy
        .services
        .iter()
        .filter(|(_, service)| service.data_plane == DataPlane::Native)
        .count();
    assert_eq!(native, patches.len());

    let filter = &outcomes["spec"]["configPatches"][0]["patch"];
    assert_eq!(filter["operation"], "INSERT_BEFORE");
    let config = &filter["value"]["typed_config"];
    assert_eq!(
        config["@type"],
        "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
    );
    assert_eq!(config["dynamic_module_config"]["name"], NATIVE_MODULE);
    assert_eq!(config["filter_name"], NATIVE_OUTCOME_FILTER);
    Ok(())
}
