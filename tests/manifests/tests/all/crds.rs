//! Istio custom resources against the published CRD schemas (vendored in `testdata/crds`,
//! see its NOTICE.md), validated as the API server does with strict field validation:
//! objects are closed (an unknown field is an error) except where the CRD preserves unknown
//! fields (`pluginConfig`, an EnvoyFilter patch's `value`). The CEL rules that concern these
//! resources are checked in code.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::test_support::{
    Document, SAMPLE_DIGEST, istio_objects, parse_documents, rendered_template, repo_root,
};

/// The `openAPIV3Schema` of `version` in the vendored CRD `file`, closed and accepting the
/// object's `apiVersion`, `kind` and `metadata`.
fn crd_schema(file: &str, version: &str) -> Result<Value> {
    let path = repo_root().join("tests/manifests/testdata/crds").join(file);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let crd = parse_documents(file, &text)?.remove(0).value;
    let mut schema = crd["spec"]["versions"]
        .as_array()
        .and_then(|versions| versions.iter().find(|v| v["name"] == version))
        .map(|v| v["schema"]["openAPIV3Schema"].clone())
        .with_context(|| format!("{file} has no version {version}"))?;
    let properties = schema["properties"]
        .as_object_mut()
        .context("schema properties")?;
    properties.insert("apiVersion".into(), json!({"type": "string"}));
    properties.insert("kind".into(), json!({"type": "string"}));
    properties.insert("metadata".into(), json!({"type": "object"}));
    close_objects(&mut schema);
    Ok(schema)
}

/// Adds `additionalProperties: false` to every object schema that lists its properties and
/// neither preserves unknown fields nor declares additional properties itself.
fn close_objects(schema: &mut Value) {
    if let Value::Object(map) = schema {
        let preserves = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if map.contains_key("properties") && !preserves && !map.contains_key("additionalProperties")
        {
            map.insert("additionalProperties".into(), Value::Bool(false));
        }
        for value in map.values_mut() {
            close_objects(value);
        }
    } else if let Value::Array(items) = schema {
        items.iter_mut().for_each(close_objects);
    }
}

fn validate(schema: &Value, document: &Document) -> Result<()> {
    let validator = jsonschema::validator_for(schema).context("compiling the CRD schema")?;
    let errors: Vec<String> = validator
        .iter_errors(&document.value)
        .map(|error| format!("  at {}: {error}", error.instance_path()))
        .collect();
    if !errors.is_empty() {
        bail!(
            "{} ({}) violates its CRD:\n{}",
            document.origin,
            document.type_name(),
            errors.join("\n")
        );
    }
    Ok(())
}

/// The CEL rules of WasmPlugin / TrafficExtension that JSON Schema cannot express.
fn check_extension_rules(document: &Document) -> Result<()> {
    let spec = &document.value["spec"];
    let set = |field: &str| !spec[field].is_null();
    if [set("selector"), set("targetRef"), set("targetRefs")]
        .iter()
        .filter(|s| **s)
        .count()
        > 1
    {
        bail!(
            "{}: only one of targetRefs or selector can be set",
            document.origin
        );
    }
    if document.type_name().ends_with("/TrafficExtension") && set("wasm") == set("lua") {
        bail!(
            "{}: exactly one of wasm or lua must be set",
            document.origin
        );
    }
    Ok(())
}

fn wasm_plugin_schema() -> Result<Value> {
    crd_schema("wasmplugins.extensions.istio.io.yaml", "v1alpha1")
}

/// TrafficExtension's schema (Istio 1.30's `trafficextensions.extensions.istio.io`).
fn traffic_extension_schema() -> Result<Value> {
    crd_schema("trafficextensions.extensions.istio.io.yaml", "v1alpha1")
}

#[test]
fn envoy_filters_match_the_envoyfilter_crd() -> Result<()> {
    let schema = crd_schema("envoyfilters.networking.istio.io.yaml", "v1alpha3")?;
    let filters: Vec<Document> = istio_objects()?
        .into_iter()
        .filter(|d| d.type_name() == "networking.istio.io/v1alpha3/EnvoyFilter")
        .collect();
    assert_eq!(
        filters.len(),
        5,
        "control plane cluster, override_host, stats tags, native LB, native outcomes"
    );
    for filter in &filters {
        validate(&schema, filter)?;
    }
    Ok(())
}

#[test]
fn rendered_wasmplugin_matches_the_wasmplugin_crd() -> Result<()> {
    let plugin = rendered_template(
        "wasmplugin",
        "registry.example/fulcrum-balancer:0.1.0",
        SAMPLE_DIGEST,
    )?;
    assert_eq!(
        plugin.type_name(),
        "extensions.istio.io/v1alpha1/WasmPlugin"
    );
    validate(&wasm_plugin_schema()?, &plugin)?;
    check_extension_rules(&plugin)
}

#[test]
fn rendered_trafficextension_matches_the_trafficextension_schema() -> Result<()> {
    let extension = rendered_template(
        "trafficextension",
        "registry.example/fulcrum-balancer:0.1.0",
        SAMPLE_DIGEST,
    )?;
    assert_eq!(
        extension.type_name(),
        "extensions.istio.io/v1alpha1/TrafficExtension"
    );
    validate(&traffic_extension_schema()?, &extension)?;
    check_extension_rules(&extension)
}

#[test]
fn the_schema_check_rejects_an_unknown_field_and_a_bad_digest() -> Result<()> {
    let schema = wasm_plugin_schema()?;
    let mut plugin = rendered_template("wasmplugin", "registry.example/f:1", SAMPLE_DIGEST)?;
    plugin.value["spec"]["failstrategy"] = json!("FAIL_OPEN");
    assert!(
        validate(&schema, &plugin).is_err(),
        "a misspelt field must fail"
    );
    let mut plugin = rendered_template("wasmplugin", "registry.example/f:1", SAMPLE_DIGEST)?;
    plugin.value["spec"]["sha256"] = json!("sha256:0123");
    assert!(
        validate(&schema, &plugin).is_err(),
        "a digest with prefix must fail"
    );
    Ok(())
}

#[test]
fn the_trafficextension_schema_rejects_wasm_fields_outside_wasm_and_both_wasm_and_lua() -> Result<()>
{
    let schema = traffic_extension_schema()?;
    let mut extension =
        rendered_template("trafficextension", "registry.example/f:1", SAMPLE_DIGEST)?;
    extension.value["spec"]["url"] = extension.value["spec"]["wasm"]["url"].clone();
    assert!(
        validate(&schema, &extension).is_err(),
        "`url` belongs under `wasm`"
    );
    let mut extension =
        rendered_template("trafficextension", "registry.example/f:1", SAMPLE_DIGEST)?;
    extension.value["spec"]["lua"] = json!({"inlineCode": "function envoy_on_request(h) end"});
    assert!(
        validate(&schema, &extension).is_err(),
        "wasm and lua are mutually exclusive"
    );
    Ok(())
}

#[test]
fn wasmplugin_and_trafficextension_configure_the_filter_identically() -> Result<()> {
    let plugin = rendered_template("wasmplugin", "r/f:1", SAMPLE_DIGEST)?.value;
    let extension = rendered_template("trafficextension", "r/f:1", SAMPLE_DIGEST)?.value;
    for field in ["selector", "phase", "priority", "match"] {
        assert_eq!(
            plugin["spec"][field], extension["spec"][field],
            "spec.{field}"
        );
    }
    for field in [
        "url",
        "sha256",
        "imagePullPolicy",
        "failStrategy",
        "type",
        "pluginName",
        "pluginConfig",
    ] {
        assert_eq!(
            plugin["spec"][field], extension["spec"]["wasm"][field],
            "{field}"
        );
    }
    Ok(())
}
