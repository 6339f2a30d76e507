//! Every built-in Kubernetes object under `istio/` parses into its k8s-openapi type, strictly:
//! it is deserialized, serialized again and must come back identical, so a misspelt or
//! misplaced field (which the API server would drop or reject) fails here. Also the security
//! and RBAC properties the control plane's manifests promise.

use anyhow::{Context, Result, bail};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::test_support::{Document, istio_objects};

/// `value` as `T`, failing with the path of the first field that does not fit, and refusing
/// any field `T` does not know.
pub fn strict<T: DeserializeOwned + Serialize>(origin: &str, value: &Value) -> Result<T> {
    let parsed: T = serde_path_to_error::deserialize(value)
        .with_context(|| format!("{origin} does not parse as {}", std::any::type_name::<T>()))?;
    let again = serde_json::to_value(&parsed)?;
    if let Some(path) = first_difference(value, &again, String::new()) {
        bail!(
            "{origin}: field `{path}` is not part of {} (misspelt, misplaced or of the wrong type)",
            std::any::type_name::<T>()
        );
    }
    Ok(parsed)
}

/// The path of the first value in `original` that `round_tripped` lost or changed.
fn first_difference(original: &Value, round_tripped: &Value, path: String) -> Option<String> {
    match (original, round_tripped) {
        (Value::Object(original), Value::Object(again)) => {
            original.iter().find_map(|(key, value)| {
                let path = format!("{path}.{key}");
                match again.get(key) {
                    Some(other) => first_difference(value, other, path),
                    None => Some(path),
                }
            })
        }
        (Value::Array(original), Value::Array(again)) if original.len() == again.len() => original
            .iter()
            .zip(again)
            .enumerate()
            .find_map(|(index, (value, other))| {
                first_difference(value, other, format!("{path}[{index}]"))
            }),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        (a, b) if a == b => None,
        _ => Some(path),
    }
}

/// Parses `document` strictly into its k8s-openapi type; `false` when it is not a built-in kind
/// the tests know.
pub fn check_builtin(document: &Document) -> Result<bool> {
    let origin = document.origin.as_str();
    let value = &document.value;
    match document.type_name().as_str() {
        "v1/Namespace" => drop(strict::<Namespace>(origin, value)?),
        "v1/ServiceAccount" => drop(strict::<ServiceAccount>(origin, value)?),
        "v1/ConfigMap" => drop(strict::<ConfigMap>(origin, value)?),
        "v1/Service" => drop(strict::<Service>(origin, value)?),
        "apps/v1/Deployment" => drop(strict::<Deployment>(origin, value)?),
        "policy/v1/PodDisruptionBudget" => drop(strict::<PodDisruptionBudget>(origin, value)?),
        "networking.k8s.io/v1/NetworkPolicy" => drop(strict::<NetworkPolicy>(origin, value)?),
        "rbac.authorization.k8s.io/v1/ClusterRole" => drop(strict::<ClusterRole>(origin, value)?),
        "rbac.authorization.k8s.io/v1/ClusterRoleBinding" => {
            drop(strict::<ClusterRoleBinding>(origin, value)?)
        }
        "rbac.authorization.k8s.io/v1/Role" => drop(strict::<Role>(origin, value)?),
        "rbac.authorization.k8s.io/v1/RoleBinding" => drop(strict::<RoleBinding>(origin, value)?),
        _ => return Ok(false),
    }
    Ok(true)
}

/// Kinds that are custom resources, checked by `crds.rs` (or the observability checks).
const CUSTOM_KINDS: &[&str] = &[
    "networking.istio.io/v1alpha3/EnvoyFilter",
    "extensions.istio.io/v1alpha1/WasmPlugin",
    "extensions.istio.io/v1alpha1/TrafficExtension",
    "monitoring.coreos.com/v1/PrometheusRule",
];

#[test]
fn every_builtin_object_under_istio_parses_strictly_into_its_k8s_openapi_type() -> Result<()> {
    let mut checked = 0;
    for document in istio_objects()? {
        if check_builtin(&document)? {
            checked += 1;
        } else if CUSTOM_KINDS.contains(&document.type_name().as_str()) {
            strict::<ObjectMeta>(&document.origin, &document.value["metadata"])?;
        } else {
            bail!(
                "{}: {} is neither a checked built-in kind nor a known custom resource",
                document.origin,
                document.type_name()
            );
        }
    }
    assert!(
        checked >= 10,
        "expected the control plane's objects, checked {checked}"
    );
    Ok(())
}

#[test]
fn a_misspelt_field_is_reported_with_its_path() {
    let value = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80, "targetport": 8080}]}
    });
    let error = strict::<Service>("inline", &value).expect_err("targetport is not a field");
    assert!(
        error.to_string().contains(".spec.ports[0].targetport"),
        "{error}"
    );
}

fn control_plane_deployment() -> Result<Deployment> {
    let document = istio_objects()?
        .into_iter()
        .find(|d| d.type_name() == "apps/v1/Deployment")
        .context("no Deployment under istio/")?;
    strict(&document.origin, &document.value)
}

#[test]
fn control_plane_runs_two_hardened_replicas_probed_on_healthz_and_readyz() -> Result<()> {
    let deployment = control_plane_deployment()?;
    let spec = deployment.spec.context("spec")?;
    assert!(spec.replicas.unwrap_or(1) >= 2, "at least two replicas");
    let pod = spec.template.spec.context("pod spec")?;
    assert_eq!(
        pod.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root),
        Some(true)
    );
    let [container] = pod.containers.as_slice() else {
        bail!("one container expected");
    };
    let security = container
        .security_context
        .as_ref()
        .context("container securityContext")?;
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let dropped = security
        .capabilities
        .as_ref()
        .and_then(|c| c.drop.clone())
        .unwrap_or_default();
    assert_eq!(dropped, vec!["ALL".to_owned()]);
    let path = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(path(&container.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(path(&container.readiness_probe).as_deref(), Some("/readyz"));
    let resources = container.resources.as_ref().context("resources")?;
    assert!(
        resources
            .requests
            .as_ref()
            .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory"))
    );
    assert!(
        resources
            .limits
            .as_ref()
            .is_some_and(|l| l.contains_key("memory"))
    );
    Ok(())
}

#[test]
fn rbac_grants_only_list_watch_of_slices_and_services_reads_of_the_policy_and_updates_of_its_status()
-> Result<()> {
    let mut rules = Vec::new();
    for document in istio_objects()? {
        match document.type_name().as_str() {
            "rbac.authorization.k8s.io/v1/ClusterRole" => {
                let role: ClusterRole = strict(&document.origin, &document.value)?;
                rules.extend(
                    role.rules
                        .unwrap_or_default()
                        .into_iter()
                        .map(|r| (false, r)),
                );
            }
            "rbac.authorization.k8s.io/v1/Role" => {
                let role: Role = strict(&document.origin, &document.value)?;
                rules.extend(
                    role.rules
                        .unwrap_or_default()
                        .into_iter()
                        .map(|r| (true, r)),
                );
            }
            _ => {}
        }
    }
    let mut granted: Vec<String> = rules
        .iter()
        .flat_map(|(namespaced, rule)| {
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            let names = rule.resource_names.clone().unwrap_or_default();
            let scope = if *namespaced { "namespace" } else { "cluster" };
            rule.verbs.iter().flat_map(move |verb| {
                let (groups, resources, names) = (groups.clone(), resources.clone(), names.clone());
                resources.into_iter().map(move |resource| {
                    format!("{scope} {}/{resource}{:?} {verb}", groups.join(","), names)
                })
            })
        })
        .collect();
    granted.sort();
    assert_eq!(
        granted,
        [
            "cluster /nodes[] list",
            "cluster /nodes[] watch",
            "cluster /pods[] list",
            "cluster /pods[] watch",
            "cluster /services[] list",
            "cluster /services[] watch",
            "cluster discovery.k8s.io/endpointslices[] list",
            "cluster discovery.k8s.io/endpointslices[] watch",
            "namespace /configmaps[\"fulcrum-policy\"] get",
            "namespace /configmaps[\"fulcrum-policy\"] list",
            "namespace /configmaps[\"fulcrum-policy\"] watch",
            "namespace /configmaps[\"fulcrum-policy-accepted\"] get",
            "namespace /configmaps[\"fulcrum-policy-accepted\"] list",
            "namespace /configmaps[\"fulcrum-policy-accepted\"] update",
            "namespace /configmaps[\"fulcrum-policy-accepted\"] watch",
        ]
    );
    Ok(())
}

#[test]
fn service_exposes_xds_registry_and_http_ports() -> Result<()> {
    let document = istio_objects()?
        .into_iter()
        .find(|d| d.type_name() == "v1/Service")
        .context("no Service under istio/")?;
    let service: Service = strict(&document.origin, &document.value)?;
    let ports: Vec<(String, i32)> = service
        .spec
        .context("spec")?
        .ports
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.name.unwrap_or_default(), p.port))
        .collect();
    assert_eq!(
        ports,
        [
            ("grpc-xds".to_owned(), 18000),
            ("grpc-registry".to_owned(), 18001),
            ("http-api".to_owned(), 18080)
        ]
    );
    Ok(())
}

#[test]
fn each_proxy_stays_on_one_control_plane_replica() -> Result<()> {
    let document = istio_objects()?
        .into_iter()
        .find(|d| d.type_name() == "v1/Service")
        .context("no Service under istio/")?;
    let service: Service = strict(&document.origin, &document.value)?;
    let spec = service.spec.context("spec")?;
    assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
    let timeout = spec
        .session_affinity_config
        .and_then(|config| config.client_ip)
        .and_then(|client_ip| client_ip.timeout_seconds);
    assert!(
        timeout.is_some_and(|seconds| seconds >= 3600),
        "affinity outlives many poll intervals: {timeout:?}"
    );
    Ok(())
}

#[test]
fn the_network_policy_admits_only_the_served_ports_and_never_the_admin_api() -> Result<()> {
    let document = istio_objects()?
        .into_iter()
        .find(|d| d.type_name() == "networking.k8s.io/v1/NetworkPolicy")
        .context("no NetworkPolicy under istio/")?;
    let policy: NetworkPolicy = strict(&document.origin, &document.value)?;
    let spec = policy.spec.context("spec")?;
    assert_eq!(
        spec.pod_selector
            .and_then(|selector| selector.match_labels)
            .unwrap_or_default()
            .get("app.kubernetes.io/name"),
        Some(&"fulcrum-control-plane".to_owned())
    );
    assert_eq!(spec.policy_types.unwrap_or_default(), ["Ingress"]);
    let admitted: Vec<String> = spec
        .ingress
        .unwrap_or_default()
        .into_iter()
        .flat_map(|rule| rule.ports.unwrap_or_default())
        .filter_map(|port| port.port)
        .map(|port| match port {
            IntOrString::String(name) => name,
            IntOrString::Int(number) => number.to_string(),
        })
        .collect();
    assert_eq!(admitted, ["http-api", "grpc-xds", "grpc-registry"]);

    let deployment = control_plane_deployment()?;
    let args = deployment
        .spec
        .and_then(|spec| spec.template.spec)
        .and_then(|pod| pod.containers.into_iter().next())
        .and_then(|container| container.args)
        .unwrap_or_default();
    assert!(
        args.iter().any(|arg| arg == "--admin-addr=127.0.0.1:18081"),
        "the admin API stays on loopback: {args:?}"
    );
    Ok(())
}
