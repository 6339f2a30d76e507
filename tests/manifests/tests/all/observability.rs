//! The alerts and the dashboard name only metrics fulcrum defines. Every `fulcrum_*` series in
//! a PrometheusRule expression or a Grafana query is looked up in the names the code
//! registers, read from the source itself — the control plane's `prometheus-client`
//! registrations under `control-plane/*/src`, the filter's Envoy stat names under
//! `filters/balancer/src` and the native module's under `filters/native/src` — so renaming
//! or dropping a metric breaks this test instead of silently emptying an alert.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::test_support::{istio_objects, repo_root};

/// The kind of a `prometheus-client` metric, which decides the series names it exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    /// The registered value's type could not be read from the source: any series name.
    Unknown,
}

impl Kind {
    /// The series a metric registered as `name` exports (OpenMetrics text, as the control
    /// plane's `/metrics` serves it).
    fn series(self, name: &str) -> Vec<String> {
        let suffixed = |suffixes: &[&str]| suffixes.iter().map(|s| format!("{name}{s}")).collect();
        match self {
            Kind::Counter => suffixed(&["_total"]),
            Kind::Gauge => suffixed(&[""]),
            Kind::Histogram => suffixed(&["_bucket", "_sum", "_count"]),
            Kind::Unknown => suffixed(&["", "_total", "_bucket", "_sum", "_count"]),
        }
    }
}

/// Series name → where it is defined (`path:line`).
type Defined = BTreeMap<String, String>;

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, files)?;
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    Ok(())
}

/// The Rust string literal starting at `text[0] == '"'`, unescaped only for `\"` and `\\`,
/// and the rest of `text` after it.
fn string_literal(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.strip_prefix('"')?.char_indices();
    while let Some((index, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[index + 2..])),
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

/// The identifier that ends right before `end` in `text`.
fn identifier_before(text: &str, end: usize) -> &str {
    let head = text[..end].trim_end();
    let start = head
        .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
        .map_or(0, |i| i + 1);
    &head[start..]
}

/// The type of the struct field `field` declared in `source` (`field: Type,`), as written.
fn field_type<'a>(source: &'a str, field: &str) -> Option<&'a str> {
    source.lines().find_map(|line| {
        let line = line.trim_start();
        let line = ["pub(crate) ", "pub "]
            .iter()
            .find_map(|visibility| line.strip_prefix(visibility))
            .unwrap_or(line);
        line.strip_prefix(field)?.strip_prefix(": ")
    })
}

fn kind_of(type_name: Option<&str>) -> Kind {
    match type_name {
        Some(t) if t.contains("Histogram") => Kind::Histogram,
        Some(t) if t.contains("Counter") => Kind::Counter,
        Some(t) if t.contains("Gauge") => Kind::Gauge,
        _ => Kind::Unknown,
    }
}

/// The metrics one control-plane source file registers: `let R = ….sub_registry_with_prefix("P")`
/// then `R.register("name", "help", self.field.clone())` (the nearest such `R` before the
/// call; a receiver without one registers `name` unprefixed), the kind read from `field`'s
/// declared type.
fn registered_in(origin: &str, source: &str, defined: &mut Defined) {
    let mut prefixes: Vec<(usize, &str, String)> = Vec::new();
    for (at, _) in source.match_indices("sub_registry_with_prefix(") {
        let statement_start = source[..at].rfind("let ").map_or(0, |i| i + 4);
        let variable = source[statement_start..at]
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .find(|word| !word.is_empty() && *word != "mut");
        let literal = &source[at + "sub_registry_with_prefix(".len()..];
        if let (Some(variable), Some((prefix, _))) =
            (variable, string_literal(literal.trim_start()))
        {
            prefixes.push((at, variable, prefix));
        }
    }
    for (at, _) in source.match_indices(".register(") {
        let arguments = source[at + ".register(".len()..].trim_start();
        let Some((name, rest)) = string_literal(arguments) else {
            continue; // not a metric registration (e.g. the registry's own `register`)
        };
        let receiver = identifier_before(source, at);
        let prefix = chained_prefix(&source[..at]).or_else(|| {
            prefixes
                .iter()
                .rev()
                .find(|(position, variable, _)| *position < at && *variable == receiver)
                .map(|(_, _, prefix)| prefix.clone())
        });
        let full_name = match prefix {
            Some(prefix) => format!("{prefix}_{name}"),
            None => name,
        };
        let field: Option<String> = rest
            .trim_start()
            .strip_prefix(',')
            .and_then(|rest| string_literal(rest.trim_start()))
            .and_then(|(_help, rest)| rest.trim_start().strip_prefix(','))
            .and_then(|value| value.trim_start().strip_prefix("self."))
            .map(|value| {
                value
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect()
            });
        let kind = kind_of(field.and_then(|field| field_type(source, &field)));
        let line = source[..at].lines().count();
        for series in kind.series(&full_name) {
            defined.insert(series, format!("{origin}:{line}"));
        }
    }
}

/// `P` when `head` ends with `sub_registry_with_prefix("P")` (a chained registration).
fn chained_prefix(head: &str) -> Option<String> {
    const CALL: &str = "sub_registry_with_prefix(";
    let head = head.trim_end();
    let call = head.rfind(CALL)?;
    let (prefix, rest) = string_literal(head[call + CALL.len()..].trim_start())?;
    (rest.trim() == ")").then_some(prefix)
}

/// Every series the control plane's `/metrics` can export, from its source.
fn control_plane_metrics() -> Result<Defined> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("control-plane"))? {
        let src = entry?.path().join("src");
        if src.is_dir() {
            rust_files(&src, &mut files)?;
        }
    }
    let mut defined = Defined::new();
    for file in files {
        let source = std::fs::read_to_string(&file)?;
        let origin = file.strip_prefix(repo_root()).unwrap_or(&file).display();
        registered_in(&origin.to_string(), &source, &mut defined);
    }
    Ok(defined)
}

/// Every Envoy stat the filter defines: the string literals starting with `fulcrum_`, up to
/// the first `.` (where the tag-extracted labels begin). Envoy exports counters and gauges
/// under their own name (`wasmcustom` is one of its custom stat namespaces, which its
/// Prometheus output strips).
fn filter_metrics() -> Result<Defined> {
    envoy_stats_in("filters/balancer/src", "")
}

/// Every Envoy stat the native module defines: the string literals starting with
/// `fulcrum_native_`, which Envoy's Prometheus output prefixes with
/// `envoy_dynamicmodulescustom_` (the dynamic modules' namespace is not stripped), labels
/// (`cluster`, `endpoint`) apart.
fn native_metrics() -> Result<Defined> {
    envoy_stats_in("filters/native/src", "envoy_dynamicmodulescustom_")
}

/// The `fulcrum_*` string literals of the Rust sources under `dir`, as `prefix` + name.
fn envoy_stats_in(dir: &str, prefix: &str) -> Result<Defined> {
    let mut files = Vec::new();
    rust_files(&repo_root().join(dir), &mut files)?;
    let mut defined = Defined::new();
    for file in files {
        let source = std::fs::read_to_string(&file)?;
        let origin = file.strip_prefix(repo_root()).unwrap_or(&file).display();
        for (at, _) in source.match_indices("\"fulcrum_") {
            let name: String = source[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let line = source[..at].lines().count();
            defined.insert(format!("{prefix}{name}"), format!("{origin}:{line}"));
        }
    }
    Ok(defined)
}

/// The fulcrum metric names in a PromQL expression (quoted label values excluded): those
/// starting with `fulcrum_`, and the native module's `envoy_dynamicmodulescustom_fulcrum_*`.
fn referenced_metrics(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    let mut quoted = false;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '"') {
        if rest[start..].starts_with('"') {
            quoted = !quoted;
            rest = &rest[start + 1..];
            continue;
        }
        let token: String = rest[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        rest = &rest[start + token.len()..];
        if !quoted
            && (token.starts_with("fulcrum_")
                || token.starts_with("envoy_dynamicmodulescustom_fulcrum_"))
        {
            names.insert(token);
        }
    }
    names
}

/// (alert name, expression) of every rule of the PrometheusRule.
fn alert_rules() -> Result<Vec<(String, String)>> {
    let rule = istio_objects()?
        .into_iter()
        .find(|d| d.type_name() == "monitoring.coreos.com/v1/PrometheusRule")
        .context("no PrometheusRule under istio/")?;
    let mut rules = Vec::new();
    for group in rule.value["spec"]["groups"].as_array().context("groups")? {
        for rule in group["rules"].as_array().context("rules")? {
            let name = rule["alert"].as_str().context("alert name")?;
            let expr = rule["expr"].as_str().context("expr")?;
            rules.push((name.to_owned(), expr.to_owned()));
        }
    }
    Ok(rules)
}

fn dashboard() -> Result<Value> {
    let path = repo_root().join("istio/observability/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).context("reading the dashboard")?;
    serde_json::from_str(&text).context("the dashboard is not JSON")
}

/// (panel or variable title, query) of every query of the dashboard.
fn dashboard_queries(dashboard: &Value) -> Result<Vec<(String, String)>> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        let title = panel["title"].as_str().context("panel title")?;
        for target in panel["targets"].as_array().context("targets")? {
            let expr = target["expr"].as_str().context("target expr")?;
            queries.push((title.to_owned(), expr.to_owned()));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .context("templating")?
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            let name = variable["name"].as_str().unwrap_or("?");
            queries.push((format!("variable ${name}"), query.to_owned()));
        }
    }
    Ok(queries)
}

#[test]
fn the_source_scan_finds_the_metrics_of_each_kind() -> Result<()> {
    let control_plane = control_plane_metrics()?;
    for series in [
        "fulcrum_xds_nacks_total",
        "fulcrum_xds_push_latency_seconds_bucket",
        "fulcrum_xds_connected_proxies",
        "fulcrum_policy_rejected_total",
        "fulcrum_cluster_endpoints",
    ] {
        ensure!(
            control_plane.contains_key(series),
            "{series} not found; found {:?}",
            control_plane.keys()
        );
    }
    ensure!(!control_plane.contains_key("fulcrum_xds_nacks"));
    ensure!(!control_plane.contains_key("fulcrum_xds_push_latency_seconds_total"));
    let filter = filter_metrics()?;
    for series in [
        "fulcrum_endpoint_picks_total",
        "fulcrum_endpoint_circuit_open",
        "fulcrum_fail_open_total",
    ] {
        ensure!(filter.contains_key(series), "{series}: {:?}", filter.keys());
    }
    let native = native_metrics()?;
    for series in [
        "envoy_dynamicmodulescustom_fulcrum_native_fail_open_total",
        "envoy_dynamicmodulescustom_fulcrum_native_unobserved_total",
        "envoy_dynamicmodulescustom_fulcrum_native_endpoint_ejections_total",
        "envoy_dynamicmodulescustom_fulcrum_native_endpoint_circuit_open",
    ] {
        ensure!(native.contains_key(series), "{series}: {:?}", native.keys());
    }
    Ok(())
}

#[test]
fn the_scanner_reads_prefixes_kinds_and_label_values_correctly() {
    let source = r#"
        struct M {
            pub calls: Family<L, Counter>,
            took: Histogram,
            pub(crate) size: Gauge,
        }
        fn register(&self, registry: &mut Registry) {
            let scoped = registry.sub_registry_with_prefix("fulcrum_demo");
            scoped.register("calls", "Calls \"answered\"", self.calls.clone());
            scoped.register(
                "took_seconds",
                "Latency",
                self.took.clone(),
            );
            registry.register("fulcrum_size", "Size", self.size.clone());
            registry.sub_registry_with_prefix("fulcrum").register(
                "chained",
                "Chained",
                self.calls.clone(),
            );
            backend.register(registration("a", 1), "alice");
        }
        fn register_other(&self, registry: &mut Registry) {
            let scoped = registry.sub_registry_with_prefix("fulcrum_other");
            scoped.register("calls", "Calls", self.calls.clone());
        }
    "#;
    let mut defined = Defined::new();
    registered_in("inline", source, &mut defined);
    let names: Vec<&str> = defined.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "fulcrum_chained_total",
            "fulcrum_demo_calls_total",
            "fulcrum_demo_took_seconds_bucket",
            "fulcrum_demo_took_seconds_count",
            "fulcrum_demo_took_seconds_sum",
            "fulcrum_other_calls_total",
            "fulcrum_size",
        ]
    );
    let referenced = referenced_metrics(
        r#"sum(rate(fulcrum_a_total{cluster="fulcrum_control_plane"}[5m])) / fulcrum_b
           + envoy_dynamicmodulescustom_fulcrum_native_c{cluster="x fulcrum_d"}
           + envoy_cluster_upstream_rq_total + my_fulcrum_e"#,
    );
    assert_eq!(
        referenced.into_iter().collect::<Vec<_>>(),
        [
            "envoy_dynamicmodulescustom_fulcrum_native_c",
            "fulcrum_a_total",
            "fulcrum_b"
        ]
    );
}

/// One Prometheus scrapes the control plane and every sidecar: a series name both define
/// would sum snapshots published with snapshots applied, and each query would have to tell
/// them apart by a scrape label.
#[test]
fn no_series_name_is_defined_by_both_the_control_plane_and_a_data_plane() -> Result<()> {
    let control_plane = control_plane_metrics()?;
    let mut data_planes = filter_metrics()?;
    data_planes.extend(native_metrics()?);
    let shared: Vec<String> = control_plane
        .iter()
        .filter_map(|(series, at)| {
            data_planes
                .get(series)
                .map(|other| format!("{series}: {at} and {other}"))
        })
        .collect();
    ensure!(
        shared.is_empty(),
        "series defined twice, with two meanings:\n  {}",
        shared.join("\n  ")
    );
    Ok(())
}

#[test]
fn every_metric_in_the_alerts_and_the_dashboard_is_defined_by_the_code() -> Result<()> {
    let mut defined = control_plane_metrics()?;
    defined.extend(filter_metrics()?);
    defined.extend(native_metrics()?);
    let mut queries: Vec<(String, String)> = alert_rules()?
        .into_iter()
        .map(|(alert, expr)| (format!("alert {alert}"), expr))
        .collect();
    queries.extend(
        dashboard_queries(&dashboard()?)?
            .into_iter()
            .map(|(title, expr)| (format!("dashboard panel {title:?}"), expr)),
    );
    let mut undefined = Vec::new();
    let mut referenced = BTreeSet::new();
    for (origin, expr) in &queries {
        for metric in referenced_metrics(expr) {
            if !defined.contains_key(&metric) {
                undefined.push(format!("{origin}: {metric}"));
            }
            referenced.insert(metric);
        }
    }
    if !undefined.is_empty() {
        bail!(
            "metrics no code defines (renamed? not landed yet?):\n  {}\ndefined: {:?}",
            undefined.join("\n  "),
            defined.keys()
        );
    }
    ensure!(
        referenced.len() >= 15,
        "only {} metrics referenced",
        referenced.len()
    );
    Ok(())
}

#[test]
fn the_alerts_cover_the_seed_signals_with_their_thresholds() -> Result<()> {
    let rules: BTreeMap<String, String> = alert_rules()?.into_iter().collect();
    let expect = |alert: &str, fragments: &[&str]| -> Result<()> {
        let expr = rules
            .get(alert)
            .with_context(|| format!("no alert {alert}"))?;
        let compact: String = expr.split_whitespace().collect::<Vec<_>>().join(" ");
        for fragment in fragments {
            ensure!(
                compact.contains(fragment),
                "alert {alert}: `{fragment}` not in `{compact}`"
            );
        }
        Ok(())
    };
    expect(
        "FulcrumRegistrationFailures",
        &[
            r#"fulcrum_registry_requests_total{operation="register",code!="ok"}"#,
            "> 0.01",
        ],
    )?;
    expect(
        "FulcrumRegistryDiscoverySlow",
        &[
            "histogram_quantile(0.99,",
            r#"fulcrum_registry_request_duration_seconds_bucket{operation="discover"}"#,
            "> 0.05",
        ],
    )?;
    expect(
        "FulcrumXdsPushSlow",
        &["fulcrum_xds_push_latency_seconds_bucket", "> 0.05"],
    )?;
    expect(
        "FulcrumHealthCheckFailures",
        &[
            r#"sum by (cluster) (rate(fulcrum_health_checks_total{result="failure"}[5m]))"#,
            "> 0.05",
        ],
    )?;
    expect(
        "FulcrumFewHealthyEndpoints",
        &[
            r#"max by (cluster) (fulcrum_cluster_endpoints{health="healthy"})"#,
            "< 2",
        ],
    )?;
    expect(
        "FulcrumNativeOutcomesUnobserved",
        &[
            "sum by (namespace, pod, cluster) (rate(envoy_dynamicmodulescustom_fulcrum_native_unobserved_total[5m]))",
            "> 0",
        ],
    )?;
    expect(
        "FulcrumNativeFailingOpen",
        &[
            "envoy_dynamicmodulescustom_fulcrum_native_fail_open_total",
            "> 0",
        ],
    )?;
    expect("FulcrumXdsNack", &["fulcrum_xds_nacks_total", "> 0"])
}

#[test]
fn dashboard_panels_have_unique_ids_and_the_registry_and_health_check_panels() -> Result<()> {
    let dashboard = dashboard()?;
    let panels = dashboard["panels"].as_array().context("panels")?;
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    ensure!(ids.len() == panels.len(), "panel ids must be unique");
    let queries = dashboard_queries(&dashboard)?;
    for metric in [
        "fulcrum_endpoint_picks_total",
        "fulcrum_endpoint_ejections_total",
        "fulcrum_endpoint_circuit_open",
        "fulcrum_xds_pushes_total",
        "fulcrum_xds_nacks_total",
        "fulcrum_registry_instances",
        "fulcrum_registry_requests_total",
        "fulcrum_registry_request_duration_seconds_bucket",
        "fulcrum_health_checks_total",
        "envoy_dynamicmodulescustom_fulcrum_native_endpoint_ejections_total",
        "envoy_dynamicmodulescustom_fulcrum_native_endpoint_circuit_open",
    ] {
        ensure!(
            queries
                .iter()
                .any(|(_, expr)| referenced_metrics(expr).contains(metric)),
            "no dashboard panel shows {metric}"
        );
    }
    Ok(())
}
