//! The Envoy configuration the Istio manifests give a sidecar, checked by Envoy 1.40 itself.
//!
//! The CRD schemas check an EnvoyFilter's shape, not its `patch.value`, which is Envoy
//! configuration Istio passes on unread, and a WasmPlugin's `pluginConfig` reaches the filter
//! only inside Envoy. Here each kind of balanced workload (`fulcrum.io/balanced` for the wasm
//! filter, `fulcrum.io/native` for the native module) gets the configuration istiod would send
//! it: a model of istiod's outbound clusters and outbound HTTP listener, every EnvoyFilter
//! whose `workloadSelector` selects the workload applied as istiod applies it (a `MERGE` is
//! protobuf's merge: messages field by field, lists appended, a map entry or an `Any`
//! replaced whole), and the WasmPlugin as the filter istiod makes of it. Envoy then checks it
//! with `--mode validate`, which builds every listener, filter and cluster without serving:
//! the wasm filter runs in V8 and reads its `pluginConfig`, the native module is loaded and
//! parses its policy and filter name, so a value either of them or Envoy would refuse fails
//! here, with Envoy's message.
//!
//! The model is istiod's default output for an `http` Service port with no DestinationRule
//! (`pilot/pkg/networking/core`: EDS over ADS, least request, the default circuit breakers),
//! without what needs the mesh's certificates (mTLS transport sockets) or Istio's own Envoy
//! extensions (metadata exchange, `istio.stats`), which upstream Envoy does not have.

use std::{
    path::Path,
    process::{Command, Output},
};

use anyhow::{Context, Result, bail, ensure};
use fulcrum_test_support::envoy::envoy_binary;
use serde_json::{Map, Value, json};

use crate::test_support::{
    Document, SAMPLE_DIGEST, filter_wasm_path, istio_objects, native_module, rendered_template,
};

/// Map fields of the messages the patches touch: a `MERGE` replaces their entries whole.
const MAP_FIELDS: &[&str] = &[
    "typed_extension_protocol_options",
    "filter_metadata",
    "typed_filter_metadata",
];

/// The proxy-wasm runtime istiod configures.
const WASM_RUNTIME: &str = "envoy.wasm.runtime.v8";

/// `value` merged into `target` as protobuf's merge (Go's `proto.Merge`, which istiod's
/// EnvoyFilter `MERGE` uses): nested messages merge, lists append, scalars, `Any`s and map
/// entries ([`MAP_FIELDS`]) replace.
fn proto_merge(target: &mut Value, value: &Value) {
    let (Value::Object(target), Value::Object(value)) = (target, value) else {
        return;
    };
    for (key, patch) in value {
        match (target.get_mut(key), patch) {
            (Some(Value::Object(existing)), Value::Object(entries))
                if MAP_FIELDS.contains(&key.as_str()) =>
            {
                for (entry, entry_value) in entries {
                    existing.insert(entry.clone(), entry_value.clone());
                }
            }
            (Some(existing @ Value::Object(_)), Value::Object(fields))
                if !fields.contains_key("@type") =>
            {
                proto_merge(existing, patch);
            }
            (Some(Value::Array(existing)), Value::Array(items)) => {
                existing.extend(items.iter().cloned());
            }
            _ => {
                target.insert(key.clone(), patch.clone());
            }
        }
    }
}

/// The outbound cluster istiod generates for `service`'s `http` port `port` (see the module
/// docs for what the model leaves out). `common_lb_config` is what a DestinationRule may add
/// to.
fn istio_outbound_cluster(service: &str, port: u64, common_lb_config: Value) -> Value {
    let name = format!("outbound|{port}||{service}");
    let unlimited = u64::from(u32::MAX);
    json!({
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {
            "eds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
            "service_name": name,
        },
        "connect_timeout": "10s",
        "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": {"thresholds": [{
            "max_connections": unlimited,
            "max_pending_requests": unlimited,
            "max_requests": unlimited,
            "max_retries": unlimited,
            "track_remaining": true,
        }]},
        "common_lb_config": common_lb_config,
        "metadata": {"filter_metadata": {"istio": {"services": [{
            "host": service,
            "name": service.split('.').next().unwrap_or(service),
        }]}}},
    })
}

/// A `typed_config` of type `type_name` (under `type.googleapis.com/`) with `fields`.
fn typed(type_name: &str, fields: Value) -> Value {
    let mut config = Map::new();
    config.insert(
        "@type".to_owned(),
        Value::String(format!("type.googleapis.com/{type_name}")),
    );
    if let Value::Object(fields) = fields {
        config.extend(fields);
    }
    Value::Object(config)
}

/// An HTTP filter of Envoy's own, as istiod lists it in an outbound chain.
fn http_filter(name: &str, type_name: &str) -> Value {
    json!({"name": name, "typed_config": typed(type_name, json!({}))})
}

/// What a sidecar gets: the bootstrap istiod's injector writes, its outbound clusters and
/// its outbound HTTP filter chain, before and after the patches.
struct Sidecar {
    bootstrap: Value,
    clusters: Vec<Value>,
    http_filters: Vec<Value>,
}

impl Sidecar {
    /// A sidecar with the outbound clusters of `services` (host, port), each with
    /// `common_lb_config`.
    fn new(services: &[(String, u64)], common_lb_config: &Value) -> Self {
        let http2 = typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            json!({"explicit_http_config": {"http2_protocol_options": {}}}),
        );
        let bootstrap = json!({
            "node": {
                "id": "sidecar~10.1.2.3~frontend-7d4b9c-x2x9z.shop~shop.svc.cluster.local",
                "cluster": "frontend.shop",
                "locality": {"region": "eu-west-1", "zone": "eu-west-1a"},
            },
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "dynamic_resources": {"ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            }},
            "static_resources": {"clusters": [{
                "name": "xds-grpc",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": http2,
                },
                "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": 15010,
                    }}}},
                ]}]},
            }]},
        });
        Self {
            bootstrap,
            clusters: services
                .iter()
                .map(|(service, port)| {
                    istio_outbound_cluster(service, *port, common_lb_config.clone())
                })
                .collect(),
            http_filters: vec![
                http_filter(
                    "envoy.filters.http.fault",
                    "envoy.extensions.filters.http.fault.v3.HTTPFault",
                ),
                http_filter(
                    "envoy.filters.http.cors",
                    "envoy.extensions.filters.http.cors.v3.Cors",
                ),
                http_filter(
                    "envoy.filters.http.router",
                    "envoy.extensions.filters.http.router.v3.Router",
                ),
            ],
        }
    }

    /// Applies one `configPatches` entry of `origin` as istiod does for a sidecar's outbound
    /// side; a kind of patch this model does not know fails, naming it.
    fn apply(&mut self, origin: &str, patch: &Value) -> Result<()> {
        let apply_to = patch["applyTo"].as_str().unwrap_or_default();
        let operation = patch["patch"]["operation"].as_str().unwrap_or_default();
        let value = &patch["patch"]["value"];
        let context = patch["match"]["context"].as_str().unwrap_or("ANY");
        ensure!(
            matches!(context, "ANY" | "SIDECAR_OUTBOUND"),
            "{origin}: context {context} is not modelled here"
        );
        match (apply_to, operation) {
            ("BOOTSTRAP", "MERGE") => proto_merge(&mut self.bootstrap, value),
            ("CLUSTER", "ADD") => self.clusters.push(value.clone()),
            ("CLUSTER", "MERGE") => {
                let wanted = &patch["match"]["cluster"];
                let service = wanted["service"]
                    .as_str()
                    .context("match.cluster.service")?;
                let port = wanted["portNumber"]
                    .as_u64()
                    .context("match.cluster.portNumber")?;
                let name = format!("outbound|{port}||{service}");
                let cluster = self
                    .clusters
                    .iter_mut()
                    .find(|cluster| cluster["name"] == name.as_str())
                    .with_context(|| format!("{origin}: no cluster {name} in the model"))?;
                proto_merge(cluster, value);
            }
            ("HTTP_FILTER", "INSERT_BEFORE") => {
                let before =
                    patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
                        .as_str()
                        .context("match.listener.filterChain.filter.subFilter.name")?;
                let at = self
                    .http_filters
                    .iter()
                    .position(|filter| filter["name"] == before)
                    .with_context(|| format!("{origin}: no HTTP filter {before} in the chain"))?;
                self.http_filters.insert(at, value.clone());
            }
            _ => bail!("{origin}: {apply_to} {operation} is not modelled here: add it"),
        }
        Ok(())
    }

    /// Adds the filter istiod makes of a WasmPlugin with `UNSPECIFIED_PHASE` (the end of the
    /// chain, before the router), running `wasm` in V8.
    fn add_wasm_plugin(&mut self, plugin: &Value, wasm: &Path) -> Result<()> {
        let spec = &plugin["spec"];
        ensure!(
            spec["phase"] == "UNSPECIFIED_PHASE",
            "phase {} is not modelled here",
            spec["phase"]
        );
        let name = format!(
            "{}.{}",
            plugin["metadata"]["namespace"].as_str().unwrap_or_default(),
            plugin["metadata"]["name"].as_str().unwrap_or_default()
        );
        let filter = json!({
            "name": name,
            "typed_config": typed("envoy.extensions.filters.http.wasm.v3.Wasm", json!({"config": {
                "name": name,
                "root_id": spec["pluginName"],
                "vm_config": {
                    "runtime": WASM_RUNTIME,
                    "code": {"local": {"filename": wasm.display().to_string()}},
                },
                "configuration": typed(
                    "google.protobuf.StringValue",
                    json!({"value": spec["pluginConfig"].to_string()}),
                ),
                "fail_open": spec["failStrategy"] == "FAIL_OPEN",
            }})),
        });
        let router = self.http_filters.len() - 1;
        self.http_filters.insert(router, filter);
        Ok(())
    }

    /// The bootstrap with the clusters and one outbound listener routing to each cluster
    /// the model started with.
    fn config(&self) -> Value {
        let routes: Vec<Value> = self
            .clusters
            .iter()
            .filter_map(|cluster| cluster["name"].as_str())
            .filter(|name| name.starts_with("outbound|"))
            .map(|name| {
                json!({"match": {"prefix": "/", "headers": [{
                    "name": ":authority", "string_match": {"exact": name},
                }]}, "route": {"cluster": name}})
            })
            .collect();
        let manager = typed(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            json!({
                "stat_prefix": "outbound_0.0.0.0_8080",
                "route_config": {"name": "8080", "virtual_hosts": [
                    {"name": "mesh", "domains": ["*"], "routes": routes},
                ]},
                "http_filters": self.http_filters,
            }),
        );
        let mut config = self.bootstrap.clone();
        let resources = &mut config["static_resources"];
        if let Some(clusters) = resources["clusters"].as_array_mut() {
            clusters.extend(self.clusters.iter().cloned());
        }
        resources["listeners"] = json!([{
            "name": "0.0.0.0_8080",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": manager,
            }]}],
        }]);
        config
    }
}

/// Whether `selector` (a `workloadSelector` or WasmPlugin `selector`: absent selects every
/// workload) selects a workload labelled `label: "true"`.
fn selects(selector: &Value, label: &str) -> bool {
    let labels = selector
        .get("labels")
        .or_else(|| selector.get("matchLabels"))
        .and_then(Value::as_object);
    match labels {
        None => true,
        Some(labels) => labels
            .iter()
            .all(|(key, value)| key == label && value == "true"),
    }
}

/// Every EnvoyFilter under `istio/`.
fn envoy_filters() -> Result<Vec<Document>> {
    Ok(istio_objects()?
        .into_iter()
        .filter(|document| document.type_name() == "networking.istio.io/v1alpha3/EnvoyFilter")
        .collect())
}

/// The services (host, port) whose clusters the EnvoyFilters merge into.
fn merged_services(filters: &[Document]) -> Vec<(String, u64)> {
    let mut services = Vec::new();
    for filter in filters {
        for patch in filter.value["spec"]["configPatches"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let cluster = &patch["match"]["cluster"];
            if let (Some(service), Some(port)) =
                (cluster["service"].as_str(), cluster["portNumber"].as_u64())
            {
                services.push((service.to_owned(), port));
            }
        }
    }
    services.sort();
    services.dedup();
    services
}

/// The sidecar of a workload labelled `label: "true"`, its clusters built with
/// `common_lb_config`: every EnvoyFilter selecting it applied, and the WasmPlugin too when it
/// selects it.
fn sidecar(label: &str, common_lb_config: &Value) -> Result<Sidecar> {
    let filters = envoy_filters()?;
    let mut sidecar = Sidecar::new(&merged_services(&filters), common_lb_config);
    for filter in &filters {
        if !selects(&filter.value["spec"]["workloadSelector"], label) {
            continue;
        }
        for patch in filter.value["spec"]["configPatches"]
            .as_array()
            .into_iter()
            .flatten()
        {
            sidecar.apply(&filter.origin, patch)?;
        }
    }
    let plugin = rendered_template("wasmplugin", "r/f:1", SAMPLE_DIGEST)?.value;
    if selects(&plugin["spec"]["selector"], label) {
        sidecar.add_wasm_plugin(&plugin, filter_wasm_path()?)?;
    }
    Ok(sidecar)
}

/// `envoy --mode validate` on `config`, with the native module on Envoy's module search
/// path: `Ok` when Envoy accepts it, else Envoy's error lines.
fn envoy_validates(config: &Value) -> Result<std::result::Result<(), String>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("envoy.json");
    std::fs::write(&path, serde_json::to_vec_pretty(config)?)?;
    let module_dir = native_module()?
        .parent()
        .context("the native module's directory")?;
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(envoy_binary()?)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ])
        .arg("--config-path")
        .arg(&path)
        .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module_dir)
        .output()
        .context("running Envoy")?;
    if status.success() {
        return Ok(Ok(()));
    }
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("[error]") || line.contains("[critical]"))
        .collect();
    Ok(Err(if errors.is_empty() {
        log
    } else {
        errors.join("\n")
    }))
}

#[test]
fn a_wasm_balanced_sidecar_gets_configuration_envoy_accepts() -> Result<()> {
    let sidecar = sidecar("fulcrum.io/balanced", &json!({}))?;
    let config = sidecar.config();
    ensure!(
        config.to_string().contains(WASM_RUNTIME),
        "the WasmPlugin did not select the balanced workload"
    );
    ensure!(
        config
            .to_string()
            .contains("envoy.load_balancing_policies.override_host"),
        "the override_host patch did not apply"
    );
    if let Err(errors) = envoy_validates(&config)? {
        bail!("Envoy refuses the balanced sidecar's configuration:\n{errors}");
    }
    Ok(())
}

#[test]
fn a_native_balanced_sidecar_gets_configuration_envoy_and_the_module_accept() -> Result<()> {
    let sidecar = sidecar("fulcrum.io/native", &json!({}))?;
    let config = sidecar.config();
    for expected in [
        "envoy.load_balancing_policies.dynamic_modules",
        "fulcrum_outcomes",
    ] {
        ensure!(
            config.to_string().contains(expected),
            "{expected} is not in the native sidecar's configuration"
        );
    }
    if let Err(errors) = envoy_validates(&config)? {
        bail!("Envoy refuses the native sidecar's configuration:\n{errors}");
    }
    Ok(())
}

/// The check has teeth: a policy field the module does not know and a `pluginConfig` field
/// the filter does not know are refused inside Envoy, by the module and by the filter in V8.
#[test]
fn envoy_refuses_a_policy_or_plugin_config_that_fulcrum_would_refuse() -> Result<()> {
    let mut native = sidecar("fulcrum.io/native", &json!({}))?;
    let policy = native
        .clusters
        .iter_mut()
        .find_map(|cluster| {
            cluster.pointer_mut(
                "/load_balancing_policy/policies/0/typed_extension_config/typed_config\
                 /lb_policy_config/value",
            )
        })
        .context("the native cluster's lb_policy_config")?;
    let mut parsed: Value = serde_json::from_str(policy.as_str().context("a string")?)?;
    parsed["consecutive_failure"] = json!(5);
    *policy = Value::String(parsed.to_string());
    let errors = envoy_validates(&native.config())?
        .err()
        .context("Envoy accepted a policy with an unknown field")?;
    ensure!(errors.contains("consecutive_failure"), "{errors}");

    let mut balanced = sidecar("fulcrum.io/balanced", &json!({}))?;
    let configuration = balanced
        .http_filters
        .iter_mut()
        .find_map(|filter| filter.pointer_mut("/typed_config/config/configuration/value"))
        .context("the wasm filter's configuration")?;
    let mut parsed: Value = serde_json::from_str(configuration.as_str().context("a string")?)?;
    parsed["overide_header"] = json!("x-other");
    *configuration = Value::String(parsed.to_string());
    let errors = envoy_validates(&balanced.config())?
        .err()
        .context("Envoy accepted a pluginConfig with an unknown field")?;
    ensure!(
        errors.contains("wasm log fulcrum") && errors.contains("unknown field `overide_header`"),
        "{errors}"
    );
    Ok(())
}

/// What docs/istio.md warns of: istiod adds `common_lb_config.locality_weighted_lb_config` to
/// a cluster whose DestinationRule sets `localityLbSetting.distribute` (or failover with
/// outlier detection, or with `ENABLE_LOCALITY_WEIGHTED_LB_CONFIG`), and Envoy refuses it
/// beside the `load_balancing_policy` the patches add: such hosts must leave the locality
/// setting to fulcrum's policy.
#[test]
fn envoy_refuses_the_patches_beside_istios_locality_weighted_config() -> Result<()> {
    let sidecar = sidecar(
        "fulcrum.io/balanced",
        &json!({"locality_weighted_lb_config": {}}),
    )?;
    let errors = envoy_validates(&sidecar.config())?
        .err()
        .context("Envoy accepted load_balancing_policy beside locality_weighted_lb_config")?;
    ensure!(
        errors.contains("load_balancing_policy cannot be combined"),
        "{errors}"
    );
    Ok(())
}

#[test]
fn a_merge_follows_protobufs_rules() {
    let mut cluster = json!({
        "name": "a",
        "circuit_breakers": {"thresholds": [{"max_connections": 1}]},
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "typed_extension_protocol_options": {
            "options": {"@type": "t/x", "idle_timeout": "1s"},
            "kept": {"@type": "t/y"},
        },
    });
    proto_merge(
        &mut cluster,
        &json!({
            "name": "b",
            "circuit_breakers": {"thresholds": [{"max_connections": 2}]},
            "common_lb_config": {"ignore_new_hosts_until_first_hc": true},
            "typed_extension_protocol_options": {"options": {"@type": "t/x", "http": {}}},
        }),
    );
    assert_eq!(
        cluster,
        json!({
            "name": "b",
            "circuit_breakers": {"thresholds": [{"max_connections": 1}, {"max_connections": 2}]},
            "common_lb_config": {
                "healthy_panic_threshold": {"value": 0},
                "ignore_new_hosts_until_first_hc": true,
            },
            "typed_extension_protocol_options": {
                "options": {"@type": "t/x", "http": {}},
                "kept": {"@type": "t/y"},
            },
        })
    );
}
