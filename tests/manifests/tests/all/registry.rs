//! The rendered kustomizations: `istio/` (registry off) and `istio/overlays/registry` (the
//! registry Component: etcd backend, token Secret). Every rendered object parses strictly,
//! the overlay wires flags, env, volume and ports together, and the Deployment's arguments
//! parse with the control plane's own flag definitions (its static binary, the one the image
//! ships, run with the arguments and `--help`: clap rejects an unknown flag or a bad value
//! before printing help).

use std::{collections::BTreeSet, process::Command};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Container, Service},
};
use serde_json::Value;

use crate::{
    kubernetes::{check_builtin, strict},
    kustomize::render,
    test_support::{Document, control_plane_binary, istio_objects},
};

const BASE: &str = "istio";
const REGISTRY_OVERLAY: &str = "istio/overlays/registry";

fn one<T: serde::de::DeserializeOwned + serde::Serialize>(
    objects: &[Document],
    type_name: &str,
    name: &str,
) -> Result<T> {
    let document = objects
        .iter()
        .find(|d| d.type_name() == type_name && d.value["metadata"]["name"] == name)
        .with_context(|| format!("no {type_name} {name} rendered"))?;
    strict(&document.origin, &document.value)
}

fn container(deployment: &Deployment) -> Result<Container> {
    let pod = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("pod spec")?;
    let [container] = pod.containers.as_slice() else {
        bail!("one container expected");
    };
    Ok(container.clone())
}

/// The container's args with `$(VAR)` expanded as the kubelet does, from the container's
/// env (literal values, ConfigMap keys among `objects`, pod fields as stand-ins).
fn expanded_args(container: &Container, objects: &[Document]) -> Result<Vec<String>> {
    let mut variables = Vec::new();
    for env in container.env.clone().unwrap_or_default() {
        let value = match (env.value, env.value_from) {
            (Some(value), _) => value,
            (None, Some(source)) => match (source.config_map_key_ref, source.field_ref) {
                (Some(key), _) => {
                    let map: ConfigMap = one(objects, "v1/ConfigMap", &key.name)?;
                    map.data
                        .and_then(|data| data.get(&key.key).cloned())
                        .with_context(|| format!("ConfigMap {} has no key {}", key.name, key.key))?
                }
                // Known only in the running pod (e.g. metadata.name): a stand-in value.
                (None, Some(field)) => format!("<{}>", field.field_path),
                (None, None) => bail!("env {}: only ConfigMap keys and fields", env.name),
            },
            (None, None) => String::new(),
        };
        variables.push((format!("$({})", env.name), value));
    }
    let args = container.args.clone().unwrap_or_default();
    Ok(args
        .into_iter()
        .map(|arg| {
            variables
                .iter()
                .fold(arg, |arg, (reference, value)| arg.replace(reference, value))
        })
        .collect())
}

/// Runs the control plane's binary with `args` and `--help`.
fn accepted_by_the_binary(args: &[String]) -> Result<()> {
    let output = Command::new(control_plane_binary()?)
        .args(args)
        .arg("--help")
        .output()
        .context("running the control plane binary")?;
    ensure!(
        output.status.success(),
        "the control plane refuses {args:?}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|arg| arg.strip_prefix(name)?.strip_prefix('='))
}

#[test]
fn both_kustomizations_render_objects_that_parse_strictly() -> Result<()> {
    for dir in [BASE, REGISTRY_OVERLAY] {
        let objects = render(dir)?;
        let mut built_in = 0;
        for object in &objects {
            if check_builtin(object)? {
                built_in += 1;
            }
        }
        ensure!(
            built_in >= 10,
            "{dir}: expected the control plane's objects"
        );
        let deployment: Deployment = one(&objects, "apps/v1/Deployment", "fulcrum-control-plane")?;
        assert_eq!(
            container(&deployment)?.image.as_deref(),
            Some("ghcr.io/fulcrum-lb/fulcrum-control-plane:0.1.0"),
            "{dir}: the images entry applies"
        );
        ensure!(
            !objects.iter().any(|o| o.type_name() == "v1/Secret"),
            "{dir} must not ship a Secret: the operator creates the registry tokens"
        );
    }
    Ok(())
}

#[test]
fn every_control_plane_and_mesh_manifest_is_rendered_by_a_kustomization() -> Result<()> {
    let key = |d: &Document| {
        format!(
            "{} {}",
            d.type_name(),
            d.value["metadata"]["name"].as_str().unwrap_or("?")
        )
    };
    let mut rendered: BTreeSet<String> = render(BASE)?.iter().map(key).collect();
    rendered.extend(render(REGISTRY_OVERLAY)?.iter().map(key));
    for object in istio_objects()? {
        let kustomized = ["istio/control-plane/", "istio/mesh/"]
            .iter()
            .any(|dir| object.origin.starts_with(dir));
        ensure!(
            !kustomized || rendered.contains(&key(&object)),
            "{} is in no kustomization's resources",
            object.origin
        );
    }
    Ok(())
}

#[test]
fn the_registry_overlay_runs_the_etcd_registry_with_the_operators_token_secret() -> Result<()> {
    let base = container(&one(
        &render(BASE)?,
        "apps/v1/Deployment",
        "fulcrum-control-plane",
    )?)?;
    let base_args = expanded_args(&base, &render(BASE)?)?;
    ensure!(
        flag(&base_args, "--registry").is_none(),
        "the base leaves the registry off"
    );

    let objects = render(REGISTRY_OVERLAY)?;
    let deployment: Deployment = one(&objects, "apps/v1/Deployment", "fulcrum-control-plane")?;
    let container = container(&deployment)?;
    let args = expanded_args(&container, &objects)?;
    assert_eq!(flag(&args, "--registry"), Some("etcd"));
    let endpoints = flag(&args, "--etcd-endpoints").context("--etcd-endpoints")?;
    for url in endpoints.split(',') {
        ensure!(
            url.starts_with("http://") || url.starts_with("https://"),
            "etcd endpoint `{url}` is not a URL"
        );
    }
    for kept in &base_args {
        ensure!(args.contains(kept), "the overlay dropped {kept}");
    }

    // The shipped registry refuses loopback, link-local and metadata addresses, and caps its
    // live registrations.
    ensure!(
        flag(&args, "--registry-allow-addresses").is_none(),
        "the overlay must not allow refused address classes"
    );
    let cap: usize = flag(&args, "--registry-max-instances")
        .context("--registry-max-instances")?
        .parse()?;
    ensure!(cap > 0 && cap <= 10_000, "cap {cap}");

    // The token file lies in a read-only mount of the fulcrum-registry-tokens Secret's `tokens`.
    let token_file = flag(&args, "--registry-token-file").context("--registry-token-file")?;
    let (directory, file) = token_file.rsplit_once('/').context("absolute path")?;
    assert_eq!(file, "tokens");
    let mount = container
        .volume_mounts
        .unwrap_or_default()
        .into_iter()
        .find(|m| m.mount_path == directory)
        .context("no volume mounted at the token file's directory")?;
    assert_eq!(mount.read_only, Some(true));
    let pod = deployment
        .spec
        .and_then(|s| s.template.spec)
        .context("pod spec")?;
    let volume = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == mount.name)
        .context("the mount's volume")?;
    let secret = volume.secret.context("the tokens come from a Secret")?;
    assert_eq!(
        secret.secret_name.as_deref(),
        Some("fulcrum-registry-tokens")
    );
    assert_eq!(secret.default_mode, Some(0o440));
    assert_eq!(
        pod.security_context.and_then(|s| s.fs_group),
        Some(65532),
        "the group that may read the tokens"
    );

    // The registry's gRPC address is the container port the Service's grpc-registry targets.
    let address = flag(&args, "--registry-addr").context("--registry-addr")?;
    let port: i32 = address.rsplit_once(':').context("HOST:PORT")?.1.parse()?;
    let container_port = container
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.container_port == port)
        .context("the registry port is not a container port")?;
    let service: Service = one(&objects, "v1/Service", "fulcrum-control-plane")?;
    let service_port = service
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.name.as_deref() == Some("grpc-registry"))
        .context("the Service's grpc-registry port")?;
    let target = service_port.target_port.context("targetPort")?;
    assert_eq!(
        serde_json::to_value(&target)?,
        Value::String(container_port.name.context("named container port")?)
    );
    Ok(())
}

#[test]
fn the_deployments_args_parse_with_the_control_planes_own_flags() -> Result<()> {
    for dir in [BASE, REGISTRY_OVERLAY] {
        let objects = render(dir)?;
        let deployment: Deployment = one(&objects, "apps/v1/Deployment", "fulcrum-control-plane")?;
        let args = expanded_args(&container(&deployment)?, &objects)?;
        accepted_by_the_binary(&args).with_context(|| dir.to_owned())?;
    }
    let misspelt = ["--kubernetes", "--registry-tokenfile=/etc/tokens"].map(String::from);
    ensure!(
        accepted_by_the_binary(&misspelt).is_err(),
        "a misspelt flag must be refused"
    );
    ensure!(
        accepted_by_the_binary(&["--registry=etcdd".to_owned()]).is_err(),
        "a bad value must be refused"
    );
    Ok(())
}
