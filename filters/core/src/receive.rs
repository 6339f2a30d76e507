//! Taking a snapshot body from the control plane: tolerant of what a newer control plane
//! adds, strict about what would break balancing, and degrading per service.
//!
//! A filter receives one JSON document for the whole mesh. Refusing all of it for one bad
//! endpoint would freeze every service on every proxy, so [`receive`] checks each service on
//! its own: a service whose endpoints do not parse or validate is left out (named, with the
//! reason, in [`Received::skipped`]) and the rest applies. A policy that does not parse or
//! validate is left out the same way ([`Received::policy_error`]); the filter then keeps the
//! policy it has.
//!
//! **Compatibility (filter N-1 against control plane N).** Fields a filter does not know are
//! ignored at every level of the snapshot: the document, a service, an endpoint. So a control
//! plane may add fields freely; an older filter balances on the fields it knows. The policy is
//! the exception: it is parsed strictly (an operator's typo must not be ignored), so a policy
//! using a field the filter does not know is refused by that filter, which keeps its previous
//! policy and counts the refusal. Roll filters out before using a new policy field.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
};

use serde::Deserialize;

use crate::{
    Endpoint, Policy, ServiceEndpoints, Snapshot,
    validate::{ValidationError, ValidationErrors},
};

/// The endpoint fields this version knows; others are dropped before parsing (see the
/// module docs). A test keeps it equal to what [`crate::Endpoint`] serializes.
pub const ENDPOINT_FIELDS: &[&str] = &[
    "address",
    "weight",
    "zone",
    "tags",
    "capabilities",
    "metadata",
    "health",
];

/// What a filter keeps of a snapshot body.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The services that parsed and validated, and the policy if it did.
    pub snapshot: Snapshot,
    /// Services left out, each with why.
    pub skipped: Vec<Skipped>,
    /// Why the snapshot's policy was left out, if it was.
    pub policy_error: Option<String>,
}

/// A service left out of a received snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The service name.
    pub service: String,
    /// Every problem found, with its path (`services.<name>.endpoints[2].weight: ...`).
    pub reason: String,
}

/// Why a snapshot body could not be used at all.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Not JSON, or no `version` string (or, in a poll answer, one
    /// [`crate::distribution::is_valid_version`] refuses).
    #[error(
        "snapshot is not a JSON object with a valid string `version` (line {line}, column {column}): {source}"
    )]
    Malformed {
        line: usize,
        column: usize,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Deserialize)]
struct Wire {
    version: String,
    #[serde(default)]
    services: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    policy: Option<serde_json::Value>,
}

/// Parses a snapshot body, keeping every service that is valid on its own.
pub fn receive(body: &[u8]) -> Result<Received, ReceiveError> {
    let wire: Wire = serde_json::from_slice(body).map_err(|source| ReceiveError::Malformed {
        line: source.line(),
        column: source.column(),
        source,
    })?;
    let mut services = BTreeMap::new();
    let mut skipped = Vec::new();
    for (name, value) in wire.services {
        match service(&name, value) {
            Ok(endpoints) => {
                services.insert(name, Arc::new(endpoints));
            }
            Err(reason) => skipped.push(Skipped {
                service: name,
                reason,
            }),
        }
    }
    let (policy, policy_error) = match wire.policy {
        None | Some(serde_json::Value::Null) => (None, None),
        Some(value) => match policy(value) {
            Ok(policy) => (Some(policy), None),
            Err(reason) => (None, Some(reason)),
        },
    };
    Ok(Received {
        snapshot: Snapshot {
            version: wire.version,
            services,
            policy,
        },
        skipped,
        policy_error,
    })
}

/// The service fields this version knows; others are dropped before parsing.
const SERVICE_FIELDS: &[&str] = &["endpoints"];

/// Parses and validates one service from its JSON (as [`receive`] does for each service of
/// a snapshot): the reason, with its path, when it is left out.
pub fn receive_service(name: &str, json: &[u8]) -> Result<ServiceEndpoints, String> {
    let value =
        serde_json::from_slice(json).map_err(|error| format!("services.{name}: {error}"))?;
    service(name, value)
}

/// Parses and validates a snapshot's policy from its JSON (as [`receive`] does): the reason,
/// with the paths, when it is refused.
pub fn receive_policy(json: &[u8]) -> Result<Policy, String> {
    let value = serde_json::from_slice(json).map_err(|error| format!("policy: {error}"))?;
    policy(value)
}

fn service(name: &str, mut value: serde_json::Value) -> Result<ServiceEndpoints, String> {
    if let Some(fields) = value.as_object_mut() {
        fields.retain(|key, _| SERVICE_FIELDS.contains(&key.as_str()));
    }
    if let Some(endpoints) = value
        .get_mut("endpoints")
        .and_then(serde_json::Value::as_array_mut)
    {
        for endpoint in endpoints {
            if let Some(fields) = endpoint.as_object_mut() {
                fields.retain(|key, _| ENDPOINT_FIELDS.contains(&key.as_str()));
            }
        }
    }
    let endpoints = ServiceEndpoints::deserialize(value)
        .map_err(|error| format!("services.{name}: {error}"))?;
    validate_service(name, &endpoints).map_err(|errors| errors.to_string().replace('\n', "; "))?;
    Ok(endpoints)
}

fn policy(value: serde_json::Value) -> Result<Policy, String> {
    let policy = Policy::deserialize(value).map_err(|error| format!("policy: {error}"))?;
    policy
        .validate()
        .map_err(|errors| errors.lines("policy.").collect::<Vec<_>>().join("; "))?;
    Ok(policy)
}

/// Checks one service's endpoints: a name, weights of at least 1, addresses a proxy can
/// connect to (no port 0, no unspecified IP), no address twice.
pub fn validate_service(name: &str, service: &ServiceEndpoints) -> Result<(), ValidationErrors> {
    let mut errors = name_errors(name);
    let mut seen = BTreeSet::new();
    for (index, endpoint) in service.endpoints.iter().enumerate() {
        errors.extend(endpoint_errors(name, index, endpoint, &mut seen));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors::new(errors))
    }
}

/// One service as the control plane publishes it: the endpoints that pass
/// [`validate_service`]'s checks, and why each other one was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screened {
    /// The endpoints that pass, in their order; a repeated address keeps its first entry.
    pub service: ServiceEndpoints,
    /// One error per problem of a left-out endpoint, with its path in the input.
    pub dropped: Vec<ValidationError>,
}

/// Splits `service` into what passes [`validate_service`] and what does not, so one bad
/// endpoint costs only itself. Fails when the service itself is invalid (an empty name).
pub fn screen_service(
    name: &str,
    service: &ServiceEndpoints,
) -> Result<Screened, ValidationErrors> {
    let errors = name_errors(name);
    if !errors.is_empty() {
        return Err(ValidationErrors::new(errors));
    }
    let mut seen = BTreeSet::new();
    let mut screened = Screened {
        service: ServiceEndpoints {
            endpoints: Vec::new(),
            protocol: service.protocol,
        },
        dropped: Vec::new(),
    };
    for (index, endpoint) in service.endpoints.iter().enumerate() {
        let errors = endpoint_errors(name, index, endpoint, &mut seen);
        if errors.is_empty() {
            screened.service.endpoints.push(endpoint.clone());
        } else {
            screened.dropped.extend(errors);
        }
    }
    Ok(screened)
}

fn name_errors(name: &str) -> Vec<ValidationError> {
    if name.is_empty() {
        vec![ValidationError {
            path: "services.\"\"".to_owned(),
            message: "service name must not be empty".to_owned(),
        }]
    } else {
        Vec::new()
    }
}

/// Every problem of endpoint `index` of service `name`; `seen` holds the addresses of the
/// endpoints before it.
fn endpoint_errors(
    name: &str,
    index: usize,
    endpoint: &Endpoint,
    seen: &mut BTreeSet<SocketAddr>,
) -> Vec<ValidationError> {
    let path = |field: &str| format!("services.{name}.endpoints[{index}].{field}");
    let mut errors = Vec::new();
    if endpoint.weight == 0 {
        errors.push(ValidationError {
            path: path("weight"),
            message: "must be at least 1, got 0".to_owned(),
        });
    }
    if endpoint.address.port() == 0 || endpoint.address.ip().is_unspecified() {
        errors.push(ValidationError {
            path: path("address"),
            message: format!(
                "must be a connectable IP:port, got {} (port 0 or an unspecified IP)",
                endpoint.address
            ),
        });
    }
    if !seen.insert(endpoint.address) {
        errors.push(ValidationError {
            path: path("address"),
            message: format!("{} appears twice in the service", endpoint.address),
        });
    }
    errors
}
