//! Policy validation and parsing: every error at once, each with its field path.
//!
//! A policy is checked as a whole (like `kubectl apply`'s schema errors): the operator sees
//! every mistake in one pass, each as `path: what is allowed, what was given`, e.g.
//! `services.checkout.outlier_detection.max_ejection_percent: must be 0..=100, got 150`.
//! Parsing ([`Policy::from_json`], and `Policy::from_yaml` with the `yaml` feature) validates
//! too, so a `Policy` obtained from text is always in range and the picker can trust it.

use std::{fmt, time::Duration};

use crate::{
    duration,
    policy::{
        HashOn, HealthCheck, LoadBalancer, Locality, OutlierDetection, Policy, Probe, RateLimit,
        ServicePolicy,
    },
};

/// Largest ring `ring_hash` builds (entries), bounding its memory.
pub const MAX_RING_SIZE: u32 = 262_144;
/// Largest Maglev table (Envoy's limit).
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 5_000_011;
/// Most retry targets a pick carries.
pub const MAX_RETRY_TARGETS: u32 = 5;
/// Shortest health check interval: probing faster loads endpoints for little gain.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Longest health check interval.
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// Shortest health check timeout.
pub const MIN_CHECK_TIMEOUT: Duration = Duration::from_millis(10);
/// Largest healthy / unhealthy threshold.
pub const MAX_CHECK_THRESHOLD: u32 = 10;

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Dotted path to the field, e.g. `services.checkout.retry`.
    pub path: String,
    /// What is allowed and what was given.
    pub message: String,
}

/// Most invalid fields a [`ValidationErrors`] keeps; the rest are counted in
/// [`ValidationErrors::omitted`]. A hostile or generated policy of a megabyte can hold tens of
/// thousands of invalid fields: kept and logged one by one they would multiply its size and
/// flood the log, while the first hundred tell the operator what to fix.
pub const MAX_VALIDATION_ERRORS: usize = 100;

/// Every invalid field of a policy, in document order, up to [`MAX_VALIDATION_ERRORS`];
/// never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors {
    /// The errors, in the order the fields appear in the schema; at most
    /// [`MAX_VALIDATION_ERRORS`].
    pub errors: Vec<ValidationError>,
    /// How many more invalid fields were found and not kept.
    pub omitted: usize,
}

impl ValidationErrors {
    /// `errors`, keeping the first [`MAX_VALIDATION_ERRORS`] and counting the rest.
    pub fn new(mut errors: Vec<ValidationError>) -> Self {
        let omitted = errors.len().saturating_sub(MAX_VALIDATION_ERRORS);
        errors.truncate(MAX_VALIDATION_ERRORS);
        Self { errors, omitted }
    }

    /// How many invalid fields were found, kept or not.
    pub fn found(&self) -> usize {
        self.errors.len() + self.omitted
    }

    /// The kept errors as `prefix` + `path: message`, one per item, then, when some were not
    /// kept, `… and N more invalid fields`: how `Display` and a snapshot's refusal render
    /// them, in at most [`MAX_VALIDATION_ERRORS`] + 1 lines.
    pub fn lines<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
        self.errors
            .iter()
            .map(move |error| format!("{prefix}{}: {}", error.path, error.message))
            .chain(
                (self.omitted > 0).then(|| format!("… and {} more invalid fields", self.omitted)),
            )
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, line) in self.lines("").enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            f.write_str(&line)?;
        }
        Ok(())
    }
}

/// Why a policy text was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The text is not JSON of the policy's shape (unknown field, wrong type, bad duration).
    #[error("policy JSON is malformed at line {line}, column {column}: {source}")]
    Json {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The text is not YAML of the policy's shape.
    #[cfg(feature = "yaml")]
    #[error("policy YAML is malformed{}: {source}", location_suffix(*.line, *.column))]
    Yaml {
        /// 1-based line of the error, when known.
        line: Option<usize>,
        /// 1-based column of the error, when known.
        column: Option<usize>,
        /// The parser's error.
        #[source]
        source: serde_norway::Error,
    },
    /// The policy parsed but some values are out of range.
    #[error("policy is invalid:\n{0}")]
    Invalid(#[from] ValidationErrors),
}

#[cfg(feature = "yaml")]
fn location_suffix(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(" at line {line}, column {column}"),
        _ => String::new(),
    }
}

impl Policy {
    /// Parses a JSON policy and validates it.
    pub fn from_json(text: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = serde_json::from_str(text).map_err(|source| PolicyError::Json {
            line: source.line(),
            column: source.column(),
            source,
        })?;
        policy.validate()?;
        Ok(policy)
    }

    /// Parses a YAML policy and validates it; a policy whose aliases expand it past
    /// [`crate::yaml::expansion_budget`] is refused before it is built.
    #[cfg(feature = "yaml")]
    pub fn from_yaml(text: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = crate::yaml::from_str(text).map_err(|source| {
            let location = source.location();
            PolicyError::Yaml {
                line: location.as_ref().map(|l| l.line()),
                column: location.as_ref().map(|l| l.column()),
                source,
            }
        })?;
        policy.validate()?;
        Ok(policy)
    }

    /// Checks every range and cross-field rule, collecting every error.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Errors::default();
        for (name, service) in &self.services {
            let path = format!("services.{}", cut(name));
            if name.is_empty() {
                errors.push(&path, "service name must not be empty".into());
            }
            service.validate_into(&path, &mut errors);
        }
        self.default.validate_into("default", &mut errors);
        errors.finish()
    }
}

impl ServicePolicy {
    /// Checks this service policy alone; paths start at the policy's fields.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Errors::default();
        self.validate_into("", &mut errors);
        errors.finish()
    }

    fn validate_into(&self, path: &str, errors: &mut Errors) {
        let at = |field: &str| join(path, field);
        validate_load_balancer(&self.load_balancer, &at("load_balancer"), errors);
        validate_locality(&self.locality, &at("locality"), errors);
        validate_outlier_detection(&self.outlier_detection, &at("outlier_detection"), errors);
        if let Some(rate_limit) = &self.rate_limit {
            validate_rate_limit(rate_limit, &at("rate_limit"), errors);
        }
        errors.range(&at("retry"), self.retry, 0, MAX_RETRY_TARGETS);
        if let Some(slow_start) = &self.slow_start {
            errors.duration(
                &at("slow_start.window"),
                slow_start.window,
                Duration::from_secs(1),
                Duration::from_secs(3600),
            );
            errors.float(
                &at("slow_start.aggression"),
                slow_start.aggression,
                0.1,
                10.0,
            );
            errors.range(
                &at("slow_start.min_weight_percent"),
                slow_start.min_weight_percent,
                1,
                100,
            );
        }
        if let Some(check) = &self.health_check {
            validate_health_check(check, &at("health_check"), errors);
        }
    }
}

impl HealthCheck {
    /// Checks this health check alone; paths start at its fields (`interval`, `http.path`).
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Errors::default();
        validate_health_check(self, "", &mut errors);
        errors.finish()
    }
}

fn validate_health_check(check: &HealthCheck, path: &str, errors: &mut Errors) {
    let at = |field: &str| join(path, field);
    let port = |port: Option<u16>, field: &str, errors: &mut Errors| {
        if port == Some(0) {
            errors.push(
                &at(field),
                "must be 1..=65535; omit it to probe the endpoint's port".into(),
            );
        }
    };
    match &check.probe {
        Probe::Http {
            path: http_path,
            expected_statuses,
            port: http_port,
        } => {
            if !http_path.starts_with('/') || !http_path.bytes().all(|b| b.is_ascii_graphic()) {
                errors.push(
                    &at("http.path"),
                    format!(
                        "must start with '/' and contain no spaces, got {}",
                        shown(http_path)
                    ),
                );
            }
            for (i, status) in expected_statuses.iter().enumerate() {
                if !(100..=599).contains(status) {
                    errors.push(
                        &format!("{}[{i}]", at("http.expected_statuses")),
                        format!("must be an HTTP status 100..=599, got {status}"),
                    );
                }
            }
            port(*http_port, "http.port", errors);
        }
        Probe::Tcp { port: tcp_port } => port(*tcp_port, "tcp.port", errors),
        Probe::Grpc {
            port: grpc_port, ..
        } => port(*grpc_port, "grpc.port", errors),
    }
    errors.duration(
        &at("interval"),
        check.interval,
        MIN_CHECK_INTERVAL,
        MAX_CHECK_INTERVAL,
    );
    if !(MIN_CHECK_TIMEOUT..=check.interval).contains(&check.timeout) {
        errors.push(
            &at("timeout"),
            format!(
                "must be {}..=interval ({}), got {}; a probe must end before the next one starts",
                duration::format(MIN_CHECK_TIMEOUT),
                duration::format(check.interval),
                duration::format(check.timeout)
            ),
        );
    }
    errors.range(
        &at("healthy_threshold"),
        check.healthy_threshold,
        1,
        MAX_CHECK_THRESHOLD,
    );
    errors.range(
        &at("unhealthy_threshold"),
        check.unhealthy_threshold,
        1,
        MAX_CHECK_THRESHOLD,
    );
    if check.jitter > check.interval {
        errors.push(
            &at("jitter"),
            format!(
                "must be at most the interval ({}), got {}",
                duration::format(check.interval),
                duration::format(check.jitter)
            ),
        );
    }
}

fn validate_load_balancer(lb: &LoadBalancer, path: &str, errors: &mut Errors) {
    let at = |field: &str| join(path, field);
    match lb {
        LoadBalancer::RoundRobin {} | LoadBalancer::WeightedRoundRobin {} => {}
        LoadBalancer::WeightedRandom {} => {}
        LoadBalancer::LeastRequest(lr) => {
            errors.range(&at("choice_count"), lr.choice_count, 2, 16);
            errors.float(
                &at("active_request_bias"),
                lr.active_request_bias,
                0.0,
                10.0,
            );
        }
        LoadBalancer::PeakEwma(ewma) => {
            let hour = Duration::from_secs(3600);
            errors.duration(&at("decay"), ewma.decay, Duration::from_millis(1), hour);
            errors.duration(
                &at("default_rtt"),
                ewma.default_rtt,
                Duration::from_millis(1),
                hour,
            );
            errors.duration(
                &at("failure_penalty"),
                ewma.failure_penalty,
                Duration::ZERO,
                hour,
            );
            errors.duration(
                &at("failure_penalty_decay"),
                ewma.failure_penalty_decay,
                Duration::from_millis(1),
                hour,
            );
            errors.duration(
                &at("peak_decay"),
                ewma.peak_decay,
                Duration::from_millis(1),
                hour,
            );
            errors.duration(
                &at("tolerance.difference"),
                ewma.tolerance.difference,
                Duration::ZERO,
                hour,
            );
            errors.range(&at("tolerance.percent"), ewma.tolerance.percent, 0, 1000);
        }
        LoadBalancer::HealthScore(score) => {
            errors.float(&at("latency"), score.latency, 0.0, 1000.0);
            errors.float(&at("inflight"), score.inflight, 0.0, 1000.0);
            errors.float(&at("failures"), score.failures, 0.0, 1000.0);
            if score.latency == 0.0 && score.inflight == 0.0 && score.failures == 0.0 {
                errors.push(path, "at least one weight must be above 0".into());
            }
        }
        LoadBalancer::RingHash(ring) => {
            validate_hash_on(&ring.hash_on, &at("hash_on"), errors);
            errors.range(
                &at("minimum_ring_size"),
                ring.minimum_ring_size,
                1,
                MAX_RING_SIZE,
            );
            validate_bounded_load(ring.bounded_load, &at("bounded_load"), errors);
        }
        LoadBalancer::Maglev(maglev) => {
            validate_hash_on(&maglev.hash_on, &at("hash_on"), errors);
            if !is_prime(maglev.table_size) || maglev.table_size > MAX_MAGLEV_TABLE_SIZE {
                errors.push(
                    &at("table_size"),
                    format!(
                        "must be a prime up to {MAX_MAGLEV_TABLE_SIZE} (e.g. 65537), got {}",
                        maglev.table_size
                    ),
                );
            }
            validate_bounded_load(maglev.bounded_load, &at("bounded_load"), errors);
        }
        LoadBalancer::Sticky(sticky) => {
            validate_cookie_name(&sticky.cookie, &at("cookie"), errors);
            if matches!(*sticky.fallback, LoadBalancer::Sticky(_)) {
                errors.push(
                    &at("fallback"),
                    "must not be sticky; use e.g. least_request".into(),
                );
            } else {
                validate_load_balancer(&sticky.fallback, &at("fallback"), errors);
            }
        }
    }
}

fn validate_hash_on(hash_on: &HashOn, path: &str, errors: &mut Errors) {
    match hash_on {
        HashOn::Header(name) => {
            if name.is_empty() || !name.bytes().all(is_token_byte) {
                errors.push(
                    &join(path, "header"),
                    format!("must be a non-empty HTTP header name, got {}", shown(name)),
                );
            }
        }
        HashOn::Cookie(cookie) => {
            validate_cookie_name(&cookie.name, &join(path, "cookie.name"), errors)
        }
        HashOn::SourceIp => {}
    }
}

fn validate_bounded_load(factor: Option<f64>, path: &str, errors: &mut Errors) {
    if let Some(factor) = factor {
        errors.float(path, factor, 1.0, 100.0);
    }
}

fn validate_cookie_name(name: &str, path: &str, errors: &mut Errors) {
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        errors.push(
            path,
            format!(
                "must be a non-empty cookie name of RFC 6265 token characters, got {}",
                shown(name)
            ),
        );
    }
}

fn validate_locality(locality: &Locality, path: &str, errors: &mut Errors) {
    let at = |field: &str| join(path, field);
    for (field, value) in [
        ("local_zone", &locality.local_zone),
        ("local_region", &locality.local_region),
    ] {
        if value.as_deref() == Some("") {
            errors.push(&at(field), "must not be empty; omit it instead".into());
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, zone) in locality.failover.iter().enumerate() {
        if zone.is_empty() {
            errors.push(
                &format!("{}[{i}]", at("failover")),
                "must not be empty".into(),
            );
        } else if !seen.insert(zone.as_str()) {
            errors.push(
                &format!("{}[{i}]", at("failover")),
                format!("zone {} is listed twice", shown(zone)),
            );
        }
    }
    errors.range(
        &at("min_healthy_percent"),
        locality.min_healthy_percent,
        0,
        100,
    );
}

fn validate_outlier_detection(od: &OutlierDetection, path: &str, errors: &mut Errors) {
    let at = |field: &str| join(path, field);
    let hour = Duration::from_secs(3600);
    errors.duration(&at("window"), od.window, Duration::from_millis(100), hour);
    if let Some(rate) = &od.failure_rate {
        errors.range(
            &at("failure_rate.threshold_percent"),
            rate.threshold_percent,
            1,
            100,
        );
        errors.range(
            &at("failure_rate.minimum_requests"),
            rate.minimum_requests,
            1,
            u32::MAX,
        );
    }
    if let Some(slow) = &od.slow_calls {
        errors.duration(
            &at("slow_calls.latency_threshold"),
            slow.latency_threshold,
            Duration::from_millis(1),
            hour,
        );
        errors.range(
            &at("slow_calls.threshold_percent"),
            slow.threshold_percent,
            1,
            100,
        );
        errors.range(
            &at("slow_calls.minimum_requests"),
            slow.minimum_requests,
            1,
            u32::MAX,
        );
    }
    if let Some(relative) = &od.relative_latency {
        errors.float(&at("relative_latency.factor"), relative.factor, 1.5, 100.0);
        errors.duration(
            &at("relative_latency.minimum_difference"),
            relative.minimum_difference,
            Duration::ZERO,
            hour,
        );
        errors.range(
            &at("relative_latency.threshold_percent"),
            relative.threshold_percent,
            1,
            100,
        );
        errors.range(
            &at("relative_latency.minimum_requests"),
            relative.minimum_requests,
            1,
            u32::MAX,
        );
        errors.range(
            &at("relative_latency.minimum_hosts"),
            relative.minimum_hosts,
            3,
            10_000,
        );
    }
    errors.duration(
        &at("base_ejection_time"),
        od.base_ejection_time,
        Duration::from_millis(1),
        hour,
    );
    errors.duration(
        &at("max_ejection_time"),
        od.max_ejection_time,
        od.base_ejection_time.max(Duration::from_millis(1)),
        Duration::from_secs(24 * 3600),
    );
    errors.range(
        &at("ejection_jitter_percent"),
        od.ejection_jitter_percent,
        0,
        100,
    );
    errors.range(&at("half_open_max_probes"), od.half_open_max_probes, 1, 100);
    errors.range(&at("max_ejection_percent"), od.max_ejection_percent, 0, 100);
    errors.range(
        &at("panic_threshold_percent"),
        od.panic_threshold_percent,
        0,
        100,
    );
}

fn validate_rate_limit(rl: &RateLimit, path: &str, errors: &mut Errors) {
    let at = |field: &str| join(path, field);
    if !(rl.requests_per_second > 0.0 && rl.requests_per_second <= 1_000_000.0) {
        errors.push(
            &at("requests_per_second"),
            format!(
                "must be above 0 and at most 1000000, got {}",
                rl.requests_per_second
            ),
        );
    }
    errors.range(&at("burst"), rl.burst, 1, 1_000_000);
    if let Some(header) = &rl.client_key_header
        && (header.is_empty() || !header.bytes().all(is_token_byte))
    {
        errors.push(
            &at("client_key_header"),
            format!(
                "must be a non-empty HTTP header name, got {}",
                shown(header)
            ),
        );
    }
    errors.range(&at("max_clients"), rl.max_clients, 1, 65_536);
}

/// RFC 7230 / 6265 `token` characters.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Longest part of a refused value an error message quotes, in bytes.
const SHOWN_BYTES: usize = 64;

/// The start of `value` an error message shows when `value` is longer than [`SHOWN_BYTES`].
fn cut_at(value: &str) -> Option<&str> {
    (value.len() > SHOWN_BYTES).then(|| {
        let end = (0..=SHOWN_BYTES)
            .rev()
            .find(|&end| value.is_char_boundary(end))
            .unwrap_or(0);
        &value[..end]
    })
}

/// `value` as a path segment: whole up to [`SHOWN_BYTES`], else its start and its length, so
/// a value of any size makes a short message.
fn cut(value: &str) -> std::borrow::Cow<'_, str> {
    match cut_at(value) {
        None => value.into(),
        Some(start) => format!("{start}…({} bytes)", value.len()).into(),
    }
}

/// `value` quoted for an error message, cut as [`cut`] does.
fn shown(value: &str) -> String {
    match cut_at(value) {
        None => format!("{value:?}"),
        Some(start) => format!("{start:?}… ({} bytes)", value.len()),
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// The errors of one validation: the first [`MAX_VALIDATION_ERRORS`] kept, the rest counted
/// without keeping their paths or messages.
#[derive(Default)]
struct Errors {
    kept: Vec<ValidationError>,
    omitted: usize,
}

impl Errors {
    fn push(&mut self, path: &str, message: String) {
        if self.kept.len() < MAX_VALIDATION_ERRORS {
            self.kept.push(ValidationError {
                path: path.to_owned(),
                message,
            });
        } else {
            self.omitted += 1;
        }
    }

    fn range(&mut self, path: &str, value: u32, min: u32, max: u32) {
        if !(min..=max).contains(&value) {
            self.push(path, format!("must be {min}..={max}, got {value}"));
        }
    }

    fn float(&mut self, path: &str, value: f64, min: f64, max: f64) {
        if !(min..=max).contains(&value) {
            self.push(path, format!("must be {min:?}..={max:?}, got {value}"));
        }
    }

    fn duration(&mut self, path: &str, value: Duration, min: Duration, max: Duration) {
        if !(min..=max).contains(&value) {
            self.push(
                path,
                format!(
                    "must be {}..={}, got {}",
                    duration::format(min),
                    duration::format(max),
                    duration::format(value)
                ),
            );
        }
    }

    fn finish(self) -> Result<(), ValidationErrors> {
        if self.kept.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors {
                errors: self.kept,
                omitted: self.omitted,
            })
        }
    }
}
