//! A VM's services, and how a snapshot change reaches them: only what changed is rebuilt.
//!
//! A change ([`Change`]) names the services added or whose content changed (each with its
//! content hash, [`crate::distribution::content_hash`]), the services removed, and maybe a
//! new policy. [`Services::apply`] then, as pingora's selection structures are, swaps each
//! touched service whole and leaves every other one alone:
//! - a service the change does not name keeps its picker and all of its live state
//!   (in-flight counts, latency estimates, breakers, tables) untouched, unless a new policy
//!   changes how it selects, which rebuilds it from the endpoints it has;
//! - a changed service whose selection policy is the same keeps the state of its surviving
//!   endpoints ([`ServicePicker::update_endpoints`]); under another selection policy it
//!   starts afresh;
//! - a removed service is dropped.
//!
//! Before touching anything it checks that the tables of the whole result fit the budget
//! ([`crate::tables`]); a change that does not is refused whole and the last good state
//! stays. What a service carries beyond its picker (the filter's stats and shared-data
//! handles) is the caller's, made and released through [`Lifecycle`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    rc::Rc,
};

use crate::{
    Endpoint, Policy, ServiceEndpoints, ServicePicker, ServicePolicy,
    tables::{self, TableBudgetError},
};

/// A value with the content hash of the JSON it was parsed from.
#[derive(Debug, Clone, PartialEq)]
pub struct Hashed<T> {
    /// [`crate::distribution::content_hash`] of the value's JSON.
    pub hash: String,
    /// The parsed value.
    pub value: T,
}

/// What a snapshot changes for a VM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// The version the change brings the VM to.
    pub version: String,
    /// Services added or whose content changed.
    pub upserted: BTreeMap<String, Hashed<ServiceEndpoints>>,
    /// Services gone.
    pub removed: BTreeSet<String>,
    /// A new policy; `None` keeps the one in force.
    pub policy: Option<Hashed<Policy>>,
}

/// How many services a change touched, and how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Services added.
    pub added: usize,
    /// Changed services that kept the state of their surviving endpoints.
    pub updated: usize,
    /// Services rebuilt from scratch: their selection policy changed.
    pub rebuilt: usize,
    /// Services removed.
    pub removed: usize,
    /// Services left untouched.
    pub untouched: usize,
}

/// What the caller keeps per service beyond the picker.
pub trait ServiceState {
    /// The service's picker.
    fn picker(&self) -> &ServicePicker;
    /// The service's picker, to update.
    fn picker_mut(&mut self) -> &mut ServicePicker;
}

impl ServiceState for ServicePicker {
    fn picker(&self) -> &ServicePicker {
        self
    }

    fn picker_mut(&mut self) -> &mut ServicePicker {
        self
    }
}

/// How the caller makes a service's state and lets endpoints go.
pub trait Lifecycle<S> {
    /// A new service's state over `endpoints` under `policy`.
    fn create(&mut self, name: &str, policy: &ServicePolicy, endpoints: &[Endpoint]) -> S;
    /// Called before `state`'s picker is updated to `remaining` (empty: the service is
    /// dropped or rebuilt): the endpoints not in it are about to go.
    fn release(&mut self, state: &mut S, remaining: &[Endpoint]);
}

/// One service and the content hash of what it was built from.
///
/// The state is boxed: a service's state is large (a picker is about a kilobyte) and a hash
/// table keeps up to half of its slots empty after it grows, so inline states would leave
/// that much memory unused at every size (1,000 services: 2,048 slots), and growing would
/// hold the old and the new table, both of full-size states, at once.
#[derive(Debug)]
struct Member<S> {
    /// The table's key again, so that one lookup finds both the key and the state.
    name: Rc<str>,
    content: String,
    state: Box<S>,
}

/// A VM's services under the policy in force, at one version. See the module docs.
#[derive(Debug)]
pub struct Services<S> {
    /// `Rc<str>` keys so that a request can keep its service's name until the response
    /// without copying it. Hashed with foldhash, not std's SipHash: a request looks its
    /// service up twice (pick, completion), and in wasm SipHash cost about 250 operators more
    /// per lookup. foldhash seeds from the clock and addresses (in wasm, mostly the clock) and
    /// does not claim resistance to chosen collisions: the keys are the snapshot's service
    /// names, from the control plane's sources and never from a request, and colliding names
    /// would need the VM's start time to the nanosecond.
    members: HashMap<Rc<str>, Member<S>, foldhash::fast::RandomState>,
    /// The policy in force.
    policy: Policy,
    /// The content hash of the policy a change brought, `None` while the initial one is in
    /// force.
    policy_hash: Option<String>,
    /// The version in force, `None` before the first change.
    version: Option<String>,
}

impl<S: ServiceState> Services<S> {
    /// No services yet, under `policy` until a change brings another.
    pub fn new(policy: Policy) -> Self {
        Self {
            members: HashMap::default(),
            policy,
            policy_hash: None,
            version: None,
        }
    }

    /// The version in force, `None` before the first change.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The content hash of the policy in force, when a change brought it.
    pub fn policy_hash(&self) -> Option<&str> {
        self.policy_hash.as_deref()
    }

    /// How many services there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there is no service.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The content hash `service` was built from.
    pub fn content(&self, service: &str) -> Option<&str> {
        self.members
            .get(service)
            .map(|member| member.content.as_str())
    }

    /// Every service's name and content hash.
    pub fn contents(&self) -> impl Iterator<Item = (&str, &str)> {
        self.members
            .iter()
            .map(|(name, member)| (&**name, member.content.as_str()))
    }

    /// The shared key of `service` and its state, found by one lookup (the request path's).
    pub fn get_key_value_mut(&mut self, service: &str) -> Option<(&Rc<str>, &mut S)> {
        self.members
            .get_mut(service)
            .map(|member| (&member.name, &mut *member.state))
    }

    /// The state of `service`.
    pub fn get_mut(&mut self, service: &str) -> Option<&mut S> {
        self.members
            .get_mut(service)
            .map(|member| &mut *member.state)
    }

    /// Every service's state.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut S> {
        self.members.values_mut().map(|member| &mut *member.state)
    }

    /// The change that brings these services to exactly `services` and `policy` at
    /// `version` (a whole snapshot): services whose content hash is unchanged are left out
    /// of it, services not in `services` are removed.
    pub fn whole(
        &self,
        version: String,
        mut services: BTreeMap<String, Hashed<ServiceEndpoints>>,
        policy: Option<Hashed<Policy>>,
    ) -> Change {
        let removed = self
            .members
            .keys()
            .filter(|name| !services.contains_key(&***name))
            .map(|name| name.to_string())
            .collect();
        services.retain(|name, service| self.content(name) != Some(service.hash.as_str()));
        let policy = policy.filter(|policy| self.policy_hash() != Some(policy.hash.as_str()));
        Change {
            version,
            upserted: services,
            removed,
            policy,
        }
    }

    /// Applies `change` (see the module docs), or refuses it whole, changing nothing, when
    /// the tables of the result would exceed `table_budget` bytes.
    pub fn apply(
        &mut self,
        change: Change,
        table_budget: u64,
        lifecycle: &mut impl Lifecycle<S>,
    ) -> Result<Applied, TableBudgetError> {
        let Change {
            version,
            upserted,
            removed,
            policy,
        } = change;
        let (new_policy, new_policy_hash) = match policy {
            Some(Hashed { hash, value }) => (Some(value), Some(hash)),
            None => (None, None),
        };
        self.check_tables(
            new_policy.as_ref().unwrap_or(&self.policy),
            &upserted,
            &removed,
            table_budget,
        )?;
        let previous_policy = match new_policy {
            Some(policy) => {
                self.policy_hash = new_policy_hash;
                Some(std::mem::replace(&mut self.policy, policy))
            }
            None => None,
        };
        let mut applied = Applied::default();
        for name in &removed {
            if let Some(mut member) = self.members.remove(name.as_str()) {
                lifecycle.release(&mut member.state, &[]);
                applied.removed += 1;
            }
        }
        if let Some(previous_policy) = &previous_policy {
            self.reselect_untouched(previous_policy, &upserted, lifecycle, &mut applied);
        }
        let previous_policy = previous_policy.as_ref().unwrap_or(&self.policy);
        for (name, Hashed { hash, value }) in upserted {
            let policy = self.policy.for_service(&name);
            let same_selection = policy.same_selection(previous_policy.for_service(&name));
            match self.members.get_mut(name.as_str()) {
                Some(member) if same_selection => {
                    lifecycle.release(&mut member.state, &value.endpoints);
                    member.state.picker_mut().update_endpoints(&value.endpoints);
                    member.content = hash;
                    applied.updated += 1;
                }
                stale => {
                    if let Some(stale) = stale {
                        lifecycle.release(&mut stale.state, &[]);
                        applied.rebuilt += 1;
                    } else {
                        applied.added += 1;
                    }
                    let state = lifecycle.create(&name, policy, &value.endpoints);
                    let name: Rc<str> = Rc::from(name);
                    self.members.insert(
                        name.clone(),
                        Member {
                            name,
                            content: hash,
                            state: Box::new(state),
                        },
                    );
                }
            }
        }
        applied.untouched = self
            .members
            .len()
            .saturating_sub(applied.added + applied.updated + applied.rebuilt);
        self.version = Some(version);
        Ok(applied)
    }

    /// Refuses a change whose result's tables exceed `budget`.
    fn check_tables(
        &self,
        policy: &Policy,
        upserted: &BTreeMap<String, Hashed<ServiceEndpoints>>,
        removed: &BTreeSet<String>,
        budget: u64,
    ) -> Result<(), TableBudgetError> {
        if !tables::policy_has_tables(policy) {
            return Ok(());
        }
        let kept = self
            .members
            .iter()
            .filter(|(name, _)| !removed.contains(&***name) && !upserted.contains_key(&***name))
            .map(|(name, member)| {
                let weights: Box<dyn Iterator<Item = u32>> = Box::new(
                    member
                        .state
                        .picker()
                        .endpoints()
                        .map(|view| view.endpoint.weight),
                );
                (&**name, weights)
            });
        let changed = upserted.iter().map(|(name, service)| {
            let weights: Box<dyn Iterator<Item = u32>> = Box::new(
                service
                    .value
                    .endpoints
                    .iter()
                    .map(|endpoint| endpoint.weight),
            );
            (name.as_str(), weights)
        });
        tables::check_budget(policy, kept.chain(changed), budget).map(|_| ())
    }

    /// After a policy change: rebuilds every service the change does not otherwise touch
    /// whose selection policy changed, from the endpoints it has.
    fn reselect_untouched(
        &mut self,
        previous_policy: &Policy,
        upserted: &BTreeMap<String, Hashed<ServiceEndpoints>>,
        lifecycle: &mut impl Lifecycle<S>,
        applied: &mut Applied,
    ) {
        for (name, member) in &mut self.members {
            if upserted.contains_key(&**name) {
                continue;
            }
            let policy = self.policy.for_service(name);
            if policy.same_selection(previous_policy.for_service(name)) {
                continue;
            }
            let endpoints: Vec<Endpoint> = member
                .state
                .picker()
                .endpoints()
                .map(|view| view.endpoint.clone())
                .collect();
            lifecycle.release(&mut member.state, &[]);
            *member.state = lifecycle.create(name, policy, &endpoints);
            applied.rebuilt += 1;
        }
    }
}
