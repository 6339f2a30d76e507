//! A kustomize renderer for exactly the features `istio/` uses — `resources` (files and
//! directories), `components`, inline JSON 6902 `patches` with a target, and `images` — so
//! the tests check the objects `kubectl apply -k` would send, without kubectl. Any other
//! kustomization field is an error, so a new feature cannot be silently ignored here.
//! (Checked once against `kubectl kustomize`: same objects for `istio/` and
//! `istio/overlays/registry`.)

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::test_support::{Document, parse_documents, repo_root};

const KNOWN_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "resources",
    "components",
    "patches",
    "images",
];

fn kustomization(dir: &Path) -> Result<Value> {
    let path = dir.join("kustomization.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let value = parse_documents(&path.display().to_string(), &text)?
        .into_iter()
        .next()
        .context("empty kustomization")?
        .value;
    for field in value
        .as_object()
        .context("kustomization is not a map")?
        .keys()
    {
        ensure!(
            KNOWN_FIELDS.contains(&field.as_str()),
            "{}: `{field}` is not supported by the tests' renderer; extend tests/manifests/tests/all/kustomize.rs",
            path.display()
        );
    }
    Ok(value)
}

fn strings<'a>(value: &'a Value, field: &str) -> Vec<&'a str> {
    value[field]
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The objects the kustomization in `dir` (relative to the repository) renders.
pub fn render(dir: &str) -> Result<Vec<Document>> {
    let root = repo_root().join(dir);
    let mut objects = render_dir(&root, "Kustomization")?;
    for object in &mut objects {
        object.origin = format!("{dir} (rendered): {}", object.origin);
    }
    Ok(objects)
}

fn render_dir(dir: &Path, expected_kind: &str) -> Result<Vec<Document>> {
    let spec = kustomization(dir)?;
    ensure!(
        spec["kind"] == expected_kind,
        "{}: expected kind {expected_kind}, found {}",
        dir.display(),
        spec["kind"]
    );
    let mut objects = Vec::new();
    for resource in strings(&spec, "resources") {
        let path = dir.join(resource);
        if path.is_dir() {
            objects.extend(render_dir(&path, "Kustomization")?);
        } else {
            let text =
                std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
            let origin = path.strip_prefix(repo_root()).unwrap_or(&path).display();
            objects.extend(parse_documents(&origin.to_string(), &text)?);
        }
    }
    for component in strings(&spec, "components") {
        let component_dir = dir.join(component);
        let component_spec = kustomization(&component_dir)?;
        objects.extend(render_dir(&component_dir, "Component")?);
        // A component's patches apply to everything accumulated so far, its own resources
        // included, as kustomize does.
        apply_patches(&component_spec, &mut objects)?;
    }
    if expected_kind == "Kustomization" {
        apply_patches(&spec, &mut objects)?;
    }
    apply_images(&spec, &mut objects)?;
    Ok(objects)
}

fn matches_target(target: &Value, object: &Value) -> bool {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    [
        ("group", group),
        ("version", version),
        ("kind", object["kind"].as_str().unwrap_or_default()),
        (
            "name",
            object["metadata"]["name"].as_str().unwrap_or_default(),
        ),
    ]
    .iter()
    .all(|(field, actual)| {
        target[field]
            .as_str()
            .is_none_or(|wanted| wanted == *actual)
    })
}

fn apply_patches(spec: &Value, objects: &mut [Document]) -> Result<()> {
    for patch in spec["patches"].as_array().into_iter().flatten() {
        let target = &patch["target"];
        ensure!(
            target.is_object(),
            "only patches with a `target` are supported"
        );
        let text = patch["patch"]
            .as_str()
            .context("only inline JSON 6902 patches (`patch: |-` with a list of ops)")?;
        let operations = parse_documents("patch", text)?
            .into_iter()
            .next()
            .context("empty patch")?
            .value;
        let operations = operations
            .as_array()
            .context("a JSON 6902 patch is a list of operations")?;
        let mut matched = 0;
        for object in objects
            .iter_mut()
            .filter(|o| matches_target(target, &o.value))
        {
            matched += 1;
            for operation in operations {
                apply_operation(&mut object.value, operation)
                    .with_context(|| format!("{}: patch {operation}", object.origin))?;
            }
        }
        ensure!(matched > 0, "patch target {target} matches no object");
    }
    Ok(())
}

/// The unescaped tokens of a JSON pointer.
fn pointer_tokens(pointer: &str) -> Result<Vec<String>> {
    let rest = pointer
        .strip_prefix('/')
        .with_context(|| format!("`{pointer}` is not a JSON pointer"))?;
    Ok(rest
        .split('/')
        .map(|token| token.replace("~1", "/").replace("~0", "~"))
        .collect())
}

/// Applies one RFC 6902 `add`, `replace` or `remove` operation.
pub fn apply_operation(document: &mut Value, operation: &Value) -> Result<()> {
    let op = operation["op"].as_str().context("op")?;
    let mut tokens = pointer_tokens(operation["path"].as_str().context("path")?)?;
    let last = tokens.pop().context("the root cannot be patched")?;
    let mut parent = &mut *document;
    for token in &tokens {
        parent = match parent {
            Value::Object(map) => map.get_mut(token),
            Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        }
        .with_context(|| format!("`{token}` does not exist"))?;
    }
    let value = || operation.get("value").cloned().context("value");
    match (op, parent) {
        ("add", Value::Object(map)) => drop(map.insert(last, value()?)),
        ("add", Value::Array(items)) if last == "-" => items.push(value()?),
        ("add", Value::Array(items)) => {
            let index: usize = last.parse().context("array index")?;
            ensure!(index <= items.len(), "index {index} out of bounds");
            items.insert(index, value()?);
        }
        ("replace", Value::Object(map)) if map.contains_key(&last) => {
            drop(map.insert(last, value()?))
        }
        ("replace", Value::Array(items)) => {
            let slot = last
                .parse::<usize>()
                .ok()
                .and_then(|i| items.get_mut(i))
                .context("no such index")?;
            *slot = value()?;
        }
        ("remove", Value::Object(map)) => {
            map.remove(&last)
                .with_context(|| format!("`{last}` does not exist"))?;
        }
        ("remove", Value::Array(items)) => {
            let index: usize = last.parse().context("array index")?;
            ensure!(index < items.len(), "index {index} out of bounds");
            items.remove(index);
        }
        (op, _) => bail!("`{op}` at `{last}` is not supported or the target does not exist"),
    }
    Ok(())
}

/// `images:` — rewrites the containers whose image is `name` (with or without a tag).
fn apply_images(spec: &Value, objects: &mut [Document]) -> Result<()> {
    for image in spec["images"].as_array().into_iter().flatten() {
        let name = image["name"].as_str().context("images[].name")?;
        for object in objects.iter_mut() {
            // `pointer_mut`, not indexing: indexing a missing key would insert it.
            let Some(pod) = object.value.pointer_mut("/spec/template/spec") else {
                continue;
            };
            for list in ["containers", "initContainers"] {
                let containers = pod.get_mut(list).and_then(Value::as_array_mut);
                for container in containers.into_iter().flatten() {
                    let Some(current) = container["image"].as_str() else {
                        continue;
                    };
                    let (current_name, current_tag) = match current.rsplit_once(':') {
                        Some((n, t)) if !t.contains('/') => (n, Some(t)),
                        _ => (current, None),
                    };
                    if current_name != name {
                        continue;
                    }
                    let new_name = image["newName"].as_str().unwrap_or(name);
                    container["image"] = Value::String(
                        match (
                            image["digest"].as_str(),
                            image["newTag"].as_str(),
                            current_tag,
                        ) {
                            (Some(digest), _, _) => format!("{new_name}@{digest}"),
                            (None, Some(tag), _) | (None, None, Some(tag)) => {
                                format!("{new_name}:{tag}")
                            }
                            (None, None, None) => new_name.to_owned(),
                        },
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn json_patch_adds_appends_replaces_and_removes() -> Result<()> {
    let mut document = serde_json::json!({"a": {"list": [1, 2], "x/y": 0}});
    for operation in [
        serde_json::json!({"op": "add", "path": "/a/list/-", "value": 3}),
        serde_json::json!({"op": "add", "path": "/a/list/0", "value": 0}),
        serde_json::json!({"op": "add", "path": "/a/new", "value": {"k": true}}),
        serde_json::json!({"op": "replace", "path": "/a/x~1y", "value": 9}),
        serde_json::json!({"op": "remove", "path": "/a/list/1"}),
    ] {
        apply_operation(&mut document, &operation)?;
    }
    assert_eq!(
        document,
        serde_json::json!({"a": {"list": [0, 2, 3], "x/y": 9, "new": {"k": true}}})
    );
    for bad in [
        serde_json::json!({"op": "add", "path": "/missing/x", "value": 1}),
        serde_json::json!({"op": "replace", "path": "/a/absent", "value": 1}),
        serde_json::json!({"op": "move", "path": "/a/new", "from": "/a/list"}),
    ] {
        assert!(apply_operation(&mut document, &bad).is_err(), "{bad}");
    }
    Ok(())
}
