//! The registry's local view: every live registration with its health, one change history,
//! and a revision that moves on every change.
//!
//! Backends keep the view current (the in-memory backend in the same step as its write, the
//! etcd backend from its watch), the health monitor sets health, and everything that reads
//! (Discover, Watch, the endpoint source) reads here. Registration and health live in one
//! structure under one lock, so a reader never sees one without the other. The history is a
//! bounded ring (like etcd's compaction): a watcher whose cursor fell out of it, or that
//! carries another replica's epoch, gets a reset with the full state instead.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    hash::{Hash, Hasher},
    sync::{Arc, OnceLock, RwLock, Weak},
};

use fulcrum_core::ServiceEndpoints;
use fulcrum_sources::Services;
use tokio::sync::watch;
use tracing::warn;

use crate::model::Registration;

/// Changes kept for watchers before they must reset.
pub const HISTORY: usize = 4096;

/// A registration as stored: what was registered, by whom, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The validated registration.
    pub registration: Registration,
    /// Identity of the token that registered it: the view's one allocation per owner once
    /// stored (a few owners hold most registrations).
    pub owner: Arc<str>,
    /// First registration time, milliseconds since the Unix epoch (kept on re-registration).
    pub registered_at_unix_ms: u64,
    /// The backend's lease id (etcd), 0 in memory.
    pub lease: i64,
    /// The backend's modification revision; a change with an older one is stale.
    pub mod_revision: i64,
}

/// A registration's health: the one model of a check's result, shared with the pipeline.
pub use fulcrum_health::HealthStatus;

/// The registry's services, as its endpoint source publishes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryServices {
    /// Every service with its endpoints and protocol.
    pub services: Services,
    /// Services whose registrations name different protocols.
    pub protocol_conflicts: usize,
}

/// Whether `entry` was registered before `other` (ids break ties, so the order is total and
/// every replica picks the same).
fn registered_before(entry: &Entry, other: &Entry) -> bool {
    fn key(entry: &Entry) -> (u64, &str) {
        (
            entry.record.registered_at_unix_ms,
            &entry.record.registration.id,
        )
    }
    key(entry) < key(other)
}

/// One service as the endpoint source publishes it.
#[derive(Debug, Clone)]
struct PublishedService {
    endpoints: Arc<ServiceEndpoints>,
    /// Whether its registrations name different protocols.
    protocol_conflict: bool,
}

/// Builds service `name` from its registrations `ids` (see [`View::services`]).
fn build_service(entries: &Entries, name: &str, ids: &BTreeSet<Arc<str>>) -> PublishedService {
    let mut by_address: BTreeMap<std::net::SocketAddr, &Entry> = BTreeMap::new();
    let entries: Vec<&Entry> = ids.iter().filter_map(|id| entries.get(id)).collect();
    for entry in &entries {
        let address = entry.record.registration.address();
        let keep = by_address
            .get(&address)
            .is_none_or(|kept| registered_before(entry, kept));
        if keep {
            by_address.insert(address, entry);
        }
    }
    let naming = |entry: &&&Entry| entry.record.registration.protocol.upstream().is_some();
    let kept = entries
        .iter()
        .filter(naming)
        .reduce(|a, b| if registered_before(b, a) { b } else { a });
    let protocol = kept.and_then(|kept| kept.record.registration.protocol.upstream());
    let other = entries
        .iter()
        .filter(naming)
        .find(|entry| entry.record.registration.protocol.upstream() != protocol);
    if let (Some(kept), Some(other)) = (kept, other) {
        warn!(
            service = %name,
            protocol = kept.record.registration.protocol.as_str(),
            kept_from = %kept.record.registration.id,
            other_protocol = other.record.registration.protocol.as_str(),
            other = %other.record.registration.id,
            "registrations of one service name different protocols; keeping the earliest registration's"
        );
    }
    let endpoints = by_address
        .into_values()
        .map(|entry| {
            entry
                .record
                .registration
                .endpoint(entry.health.endpoint_health())
        })
        .collect();
    PublishedService {
        endpoints: Arc::new(ServiceEndpoints {
            endpoints,
            protocol,
        }),
        protocol_conflict: other.is_some() && kept.is_some(),
    }
}

/// One live registration and its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What is registered.
    pub record: Arc<Record>,
    /// Its current health.
    pub health: HealthStatus,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The view revision this change made.
    pub revision: u64,
    /// The instance id (the view's allocation of it: the history holds no copy).
    pub id: Arc<str>,
    /// The entry after the change; `None` when removed.
    pub entry: Option<Entry>,
}

/// A position in this view's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Names this view (this process's run), so cursors from elsewhere are recognised.
    pub epoch: String,
    /// Changes up to and including this revision have been seen.
    pub revision: u64,
}

/// What a watcher gets after its cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// The changes after the cursor, oldest first (possibly none).
    Changes(Vec<Change>),
    /// The cursor is unknown or too old: every current entry, replacing what it knew.
    Reset(Vec<Entry>),
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    /// Entries by instance id. The id is one allocation, shared with the services' id sets
    /// (and the memory backend's leases, [`View::shared_id`]), not a copy per map.
    entries: Entries,
    /// Every service with at least one registration, by name: everything kept per service
    /// in one place, gone with its last registration (so a name gets no lasting entry for
    /// having been registered once). The name key is the allocation every stored
    /// registration of the service shares.
    services: BTreeMap<Arc<str>, Service>,
    /// Live registrations per owner. Invariant: equals the count of `entries` by owner.
    /// The key is the allocation every stored record of the owner shares.
    by_owner: HashMap<Arc<str>, usize>,
    history: VecDeque<Change>,
}

/// Every live entry, looked up by its record's id: a set of 16-byte entries keyed by the id
/// they hold, where a map from a copy of the id took 32 bytes a slot.
#[derive(Debug, Default)]
struct Entries(HashSet<ById>);

/// An entry that hashes and compares as its id, so [`Entries`] is looked up by id.
#[derive(Debug)]
struct ById(Entry);

impl ById {
    fn id(&self) -> &Arc<str> {
        &self.0.record.registration.id
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Eq for ById {}

impl Hash for ById {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self.id()).hash(state);
    }
}

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        self.id()
    }
}

impl Entries {
    fn get(&self, id: &str) -> Option<&Entry> {
        self.0.get(id).map(|entry| &entry.0)
    }

    /// The entry of `id` with the view's allocation of the id.
    fn get_key_value(&self, id: &str) -> Option<(&Arc<str>, &Entry)> {
        self.0.get(id).map(|entry| (entry.id(), &entry.0))
    }

    /// Stores `entry` under its record's id, replacing the one there.
    fn insert(&mut self, entry: Entry) {
        self.0.replace(ById(entry));
    }

    fn remove(&mut self, id: &str) {
        self.0.remove(id);
    }

    fn values(&self) -> impl Iterator<Item = &Entry> {
        self.0.iter().map(|entry| &entry.0)
    }

    fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(ById::id)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// What the view keeps per service. Invariants: `ids` is not empty and names exactly the
/// entries of the service; `health` counts them by health; a filled cell is what its
/// builder makes of those entries now (every write to one of them replaces both cells).
#[derive(Debug, Default)]
struct Service {
    /// Its registrations' ids.
    ids: BTreeSet<Arc<str>>,
    /// Its registrations by health ([`health_index`]): what the instances gauge exposes,
    /// read at a scrape ([`View::instances_by_health`]) rather than kept per instance.
    health: [usize; 3],
    /// The view's revision at its last change; keys cached balancers and answers. A
    /// service without registrations reads as generation 0, which always means no entries.
    generation: u64,
    /// Its entries sorted by id, built by the first reader after a change (under the read
    /// lock) and shared by every later one until the next change.
    entries: OnceLock<Arc<[Entry]>>,
    /// The service as the endpoint source publishes it ([`build_service`]), built by the
    /// first reader after a change and shared with the pipeline until the next one, so a
    /// publish rebuilds only the services that changed.
    published: OnceLock<PublishedService>,
}

/// `health`'s place in [`Service::health`].
fn health_index(health: HealthStatus) -> usize {
    match health {
        HealthStatus::Unknown => 0,
        HealthStatus::Healthy => 1,
        HealthStatus::Unhealthy => 2,
    }
}

/// Every health, in [`health_index`] order.
const HEALTHS: [HealthStatus; 3] = [
    HealthStatus::Unknown,
    HealthStatus::Healthy,
    HealthStatus::Unhealthy,
];

impl Service {
    /// Counts one more registration of `health` (`more`) or one less (never below zero:
    /// a broken invariant shows as a wrong count, not a panic of the control plane).
    fn count(&mut self, health: HealthStatus, more: bool) {
        let count = &mut self.health[health_index(health)];
        debug_assert!(
            more || *count > 0,
            "uncounting a registration never counted"
        );
        *count = if more {
            count.saturating_add(1)
        } else {
            count.saturating_sub(1)
        };
    }
}

/// The view; see the module docs.
#[derive(Debug)]
pub struct View {
    epoch: String,
    state: RwLock<State>,
    revisions: watch::Sender<u64>,
}

impl View {
    /// An empty view named `epoch` (unique per process run).
    pub fn new(epoch: impl Into<String>) -> Self {
        Self {
            epoch: epoch.into(),
            state: RwLock::new(State::default()),
            revisions: watch::Sender::new(0),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The cursor now.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch.clone(),
            revision: self.read().revision,
        }
    }

    /// Wakes when the revision moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    /// One entry.
    pub fn get(&self, id: &str) -> Option<Entry> {
        self.read().entries.get(id).cloned()
    }

    /// The view's allocation of `id`, for a map of the same ids kept beside the view (the
    /// memory backend's leases): one allocation per id, not a copy per map.
    pub fn shared_id(&self, id: &str) -> Option<Arc<str>> {
        self.read()
            .entries
            .get_key_value(id)
            .map(|(id, _)| Arc::clone(id))
    }

    /// How many registrations are live.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// How many live registrations `owner` holds.
    pub fn owned_by(&self, owner: &str) -> usize {
        self.read().by_owner.get(owner).copied().unwrap_or(0)
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries of `service` sorted by id, with the service's generation (read together:
    /// equal generations of one service mean equal entries). Shared, not copied: the list is
    /// built once per change of the service.
    pub fn service(&self, service: &str) -> (Arc<[Entry]>, u64) {
        let state = self.read();
        match state.services.get(service) {
            Some(kept) => {
                let entries = kept.entries.get_or_init(|| {
                    kept.ids
                        .iter()
                        .filter_map(|id| state.entries.get(id).cloned())
                        .collect()
                });
                (Arc::clone(entries), kept.generation)
            }
            None => (Arc::from(Vec::new()), 0),
        }
    }

    /// How many registrations each service has in each health (counts above zero only), by
    /// service name: what the instances gauge exposes, read when it is scraped.
    pub fn instances_by_health(&self) -> Vec<(Arc<str>, HealthStatus, usize)> {
        let state = self.read();
        state
            .services
            .iter()
            .flat_map(|(name, service)| {
                HEALTHS
                    .into_iter()
                    .zip(service.health)
                    .filter(|(_, count)| *count > 0)
                    .map(|(health, count)| (Arc::clone(name), health, count))
            })
            .collect()
    }

    /// Every service with its endpoints, as the endpoint source publishes them. Two
    /// registrations of one service at one address (possible across etcd replicas racing)
    /// give one endpoint: the earliest registered. A service's protocol is the earliest
    /// registration's that names one; registrations naming another are logged (when the
    /// service changes) and counted in [`RegistryServices::protocol_conflicts`].
    ///
    /// Only the services that changed since the last call are built; the others are the
    /// same [`Arc`]s as then.
    pub fn services(&self) -> RegistryServices {
        let state = self.read();
        let mut services = Services::new();
        let mut protocol_conflicts = 0;
        for (name, service) in &state.services {
            let published = service
                .published
                .get_or_init(|| build_service(&state.entries, name, &service.ids));
            protocol_conflicts += usize::from(published.protocol_conflict);
            services.insert(name.to_string(), Arc::clone(&published.endpoints));
        }
        RegistryServices {
            services,
            protocol_conflicts,
        }
    }

    /// Every entry, sorted by id.
    pub fn entries(&self) -> Vec<Entry> {
        let state = self.read();
        let mut entries: Vec<Entry> = state.entries.values().cloned().collect();
        entries.sort_by(|a, b| a.record.registration.id.cmp(&b.record.registration.id));
        entries
    }

    /// What changed after `cursor` (`None`: a reset).
    pub fn since(&self, cursor: Option<&Cursor>) -> (Since, Cursor) {
        let state = self.read();
        let now = Cursor {
            epoch: self.epoch.clone(),
            revision: state.revision,
        };
        let Some(cursor) = cursor.filter(|cursor| cursor.epoch == self.epoch) else {
            return (Since::Reset(sorted(&state)), now);
        };
        if cursor.revision >= state.revision {
            return (Since::Changes(Vec::new()), now);
        }
        let oldest = state.history.front().map_or(u64::MAX, |c| c.revision);
        if cursor.revision + 1 < oldest {
            return (Since::Reset(sorted(&state)), now);
        }
        let changes = state
            .history
            .iter()
            .filter(|change| change.revision > cursor.revision)
            .cloned()
            .collect();
        (Since::Changes(changes), now)
    }

    /// Adds or replaces a registration. Keeps the health when the check is unchanged.
    /// Ignored when the stored one has a newer backend revision (a stale watch event) or is
    /// identical.
    pub fn upsert(&self, record: Record) {
        let mut state = self.write();
        upsert_locked(&mut state, record);
        self.publish(&state);
    }

    /// Removes `id` unless the stored registration is newer than `mod_revision`
    /// (`None` removes unconditionally).
    pub fn remove(&self, id: &str, mod_revision: Option<i64>) -> bool {
        let mut state = self.write();
        let removed = remove_locked(&mut state, id, mod_revision);
        if removed {
            self.publish(&state);
        }
        removed
    }

    /// Replaces the whole content with `records` (after an etcd reload), recording only
    /// the differences.
    pub fn replace_all(&self, records: Vec<Record>) {
        let mut state = self.write();
        let keep: BTreeSet<Arc<str>> = records
            .iter()
            .map(|record| Arc::clone(&record.registration.id))
            .collect();
        let gone: Vec<Arc<str>> = state
            .entries
            .keys()
            .filter(|id| !keep.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            remove_locked(&mut state, &id, None);
        }
        for record in records {
            upsert_locked(&mut state, record);
        }
        self.publish(&state);
    }

    /// Sets the health of `id`, if it is still registered with the same health check as
    /// `record` (a result for a replaced check is dropped). Returns whether it changed.
    pub fn set_health(&self, record: &Record, health: HealthStatus) -> bool {
        let mut state = self.write();
        let id = &record.registration.id;
        let Some(entry) = state.entries.get(id) else {
            return false;
        };
        if entry.health == health
            || entry.record.registration.health_check != record.registration.health_check
            || entry.record.registration.address() != record.registration.address()
        {
            return false;
        }
        let old_health = entry.health;
        let entry = Entry {
            record: entry.record.clone(),
            health,
        };
        let service = entry.record.registration.name.clone();
        state.entries.insert(entry.clone());
        if let Some(kept) = state.services.get_mut(&service) {
            kept.count(old_health, false);
            kept.count(health, true);
        }
        let id = Arc::clone(&entry.record.registration.id);
        record_change(&mut state, id, Some(entry), &[service]);
        self.publish(&state);
        true
    }

    fn publish(&self, state: &State) {
        self.revisions.send_if_modified(|revision| {
            let changed = *revision != state.revision;
            *revision = state.revision;
            changed
        });
    }
}

fn sorted(state: &State) -> Vec<Entry> {
    let mut entries: Vec<Entry> = state.entries.values().cloned().collect();
    entries.sort_by(|a, b| a.record.registration.id.cmp(&b.record.registration.id));
    entries
}

fn upsert_locked(state: &mut State, mut record: Record) {
    if let Some((owner, _)) = state.by_owner.get_key_value(&*record.owner) {
        record.owner = Arc::clone(owner);
    }
    // The record shares the allocations the view already holds for its id and service.
    let (id, previous) = match state.entries.get_key_value(&record.registration.id) {
        Some((id, previous)) => (Arc::clone(id), Some(previous)),
        None => (Arc::clone(&record.registration.id), None),
    };
    record.registration.id = Arc::clone(&id);
    if let Some((service, _)) = state.services.get_key_value(&record.registration.name) {
        record.registration.name = Arc::clone(service);
    }
    if let Some(previous) = previous {
        if previous.record.mod_revision > record.mod_revision {
            return;
        }
        if same_content(&previous.record, &record) {
            // A re-registration that changes nothing a reader sees: not a change (the
            // shared list is still rebuilt, to hold the stored record).
            let health = previous.health;
            if let Some(service) = state.services.get_mut(&*record.registration.name) {
                service.entries = OnceLock::new();
            }
            state.entries.insert(Entry {
                record: Arc::new(record),
                health,
            });
            return;
        }
    }
    let health = match previous {
        Some(previous)
            if previous.record.registration.health_check == record.registration.health_check
                && previous.record.registration.address() == record.registration.address() =>
        {
            previous.health
        }
        _ => HealthStatus::Unknown,
    };
    let old = previous.map(|p| (p.record.registration.name.clone(), p.health));
    let old_owner = previous.map(|p| p.record.owner.clone());
    if old_owner.as_ref() != Some(&record.owner) {
        if let Some(old) = &old_owner {
            uncount_owner(state, old);
        }
        *state.by_owner.entry(record.owner.clone()).or_default() += 1;
    }
    let service = record.registration.name.clone();
    if let Some((old_service, old_health)) = &old {
        leave_service(state, old_service, &id, *old_health);
    }
    let kept = state.services.entry(service.clone()).or_default();
    kept.ids.insert(id.clone());
    kept.count(health, true);
    let entry = Entry {
        record: Arc::new(record),
        health,
    };
    state.entries.insert(entry.clone());
    let mut touched = vec![service];
    touched.extend(old.map(|(old_service, _)| old_service));
    record_change(state, id, Some(entry), &touched);
}

/// Takes registration `id` of `health` out of `service`, and the service with its last one.
fn leave_service(state: &mut State, service: &str, id: &str, health: HealthStatus) {
    if let Some(kept) = state.services.get_mut(service) {
        kept.ids.remove(id);
        kept.count(health, false);
        if kept.ids.is_empty() {
            state.services.remove(service);
        }
    }
}

/// Equal in everything but the backend's revision.
fn same_content(a: &Record, b: &Record) -> bool {
    a.registration == b.registration
        && a.owner == b.owner
        && a.registered_at_unix_ms == b.registered_at_unix_ms
        && a.lease == b.lease
}

fn remove_locked(state: &mut State, id: &str, mod_revision: Option<i64>) -> bool {
    let Some(entry) = state.entries.get(id) else {
        return false;
    };
    if let Some(revision) = mod_revision
        && entry.record.mod_revision > revision
    {
        return false;
    }
    let service = entry.record.registration.name.clone();
    let owner = entry.record.owner.clone();
    let health = entry.health;
    let id = Arc::clone(&entry.record.registration.id);
    state.entries.remove(&id);
    uncount_owner(state, &owner);
    leave_service(state, &service, &id, health);
    record_change(state, id, None, &[service]);
    true
}

fn uncount_owner(state: &mut State, owner: &str) {
    if let Some(count) = state.by_owner.get_mut(owner) {
        *count -= 1;
        if *count == 0 {
            state.by_owner.remove(owner);
        }
    }
}

/// Records a change of `id` to `entry` (`None`: removed) that touched `services` (those
/// still registered get a new generation and their cached lists are dropped).
fn record_change(state: &mut State, id: Arc<str>, entry: Option<Entry>, services: &[Arc<str>]) {
    state.revision += 1;
    for service in services {
        if let Some(kept) = state.services.get_mut(service) {
            kept.generation = state.revision;
            kept.entries = OnceLock::new();
            kept.published = OnceLock::new();
        }
    }
    if state.history.len() == HISTORY {
        state.history.pop_front();
    }
    debug_assert!(
        state
            .history
            .back()
            .is_none_or(|last| last.revision < state.revision),
        "history revisions must increase"
    );
    state.history.push_back(Change {
        revision: state.revision,
        id,
        entry,
    });
    if state.entries.len() > 1_000_000 {
        warn!(
            registrations = state.entries.len(),
            "the registry holds over a million registrations"
        );
    }
}

/// Calls `apply` with what changed in the view since its previous call (the first call, and
/// any call whose history no longer reaches back, gets [`Since::Reset`]), once now and again
/// after every new revision; returns when the view is dropped. The view is held only while
/// `apply` runs.
pub async fn follow(view: Weak<View>, mut apply: impl FnMut(Since)) {
    let Some(mut revisions) = view.upgrade().map(|view| view.subscribe()) else {
        return;
    };
    let mut cursor = None;
    loop {
        {
            let Some(view) = view.upgrade() else { return };
            let (since, now) = view.since(cursor.as_ref());
            cursor = Some(now);
            apply(since);
        }
        if revisions.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{record, spec};

    /// Every registration is stored as one [`Record`]: a field added to it inline costs its
    /// size once per endpoint of the mesh. Rarely set parts are boxed (the attributes, the
    /// health check), names are shared `Arc<str>`s, the address and TTL compact. At 120
    /// bytes, with the `Arc`'s counts, an allocation takes 144 bytes where 144 took 176.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_stored_record_takes_at_most_120_bytes_inline() {
        assert!(
            std::mem::size_of::<Record>() <= 120,
            "{} bytes",
            std::mem::size_of::<Record>()
        );
    }

    /// The entries' set has a slot per registration (16,384 at 10,000): the entry alone,
    /// keyed by the id it holds.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn an_entry_takes_16_bytes_in_the_entries_set() {
        assert_eq!(std::mem::size_of::<ById>(), 16);
    }

    #[test]
    fn an_id_is_one_allocation_for_the_record_the_entries_the_services_sets_and_the_history() {
        let view = View::new("epoch-a");
        view.upsert(record(spec("a", "a-1", 1)));
        view.upsert(record(spec("a", "a-1", 2)));
        let state = view.read();
        let (key, entry) = state.entries.get_key_value("a-1").expect("registered");
        let in_service = state.services["a"].ids.get("a-1").expect("in its service");
        assert!(
            Arc::ptr_eq(key, in_service),
            "one allocation, not a copy per map"
        );
        assert!(Arc::ptr_eq(key, &entry.record.registration.id));
        assert!(Arc::ptr_eq(
            key,
            &view.shared_id("a-1").expect("registered")
        ));
        let change = state.history.back().expect("a change");
        assert!(Arc::ptr_eq(key, &change.id), "the history holds no copy");
    }

    #[test]
    fn the_registrations_of_one_service_share_one_allocation_of_its_name() {
        let view = View::new("epoch-a");
        view.upsert(record(spec("a", "a-1", 1)));
        view.upsert(record(spec("a", "a-2", 2)));
        view.upsert(record(spec("b", "b-1", 3)));
        let name = |id: &str| {
            view.get(id)
                .expect("registered")
                .record
                .registration
                .name
                .clone()
        };
        let (a1, a2, b1) = (name("a-1"), name("a-2"), name("b-1"));
        assert!(Arc::ptr_eq(&a1, &a2));
        assert_eq!(&*b1, "b");
        let state = view.read();
        let (key, _) = state.services.get_key_value("a").expect("a service");
        assert!(Arc::ptr_eq(key, &a1));
    }

    #[test]
    fn the_records_of_one_owner_share_one_allocation_of_its_name() {
        let view = View::new("epoch-a");
        view.upsert(record(spec("a", "a-1", 1)));
        view.upsert(record(spec("b", "b-1", 2)));
        let mut other = record(spec("a", "a-2", 3));
        other.owner = "bob".into();
        view.upsert(other);
        let owner = |id: &str| view.get(id).expect("registered").record.owner.clone();
        assert!(Arc::ptr_eq(&owner("a-1"), &owner("b-1")));
        assert_eq!(&*owner("a-2"), "bob");
        assert_eq!((view.owned_by("alice"), view.owned_by("bob")), (2, 1));
    }

    #[test]
    fn a_cursor_in_the_history_gets_exactly_the_later_changes() {
        let view = View::new("epoch-a");
        view.upsert(record(spec("a", "a-1", 1)));
        let cursor = view.cursor();
        view.upsert(record(spec("a", "a-2", 2)));
        view.remove("a-1", None);
        let (since, now) = view.since(Some(&cursor));
        let Since::Changes(changes) = since else {
            panic!("expected changes, got {since:?}");
        };
        let ids: Vec<(&str, bool)> = changes
            .iter()
            .map(|c| (&*c.id, c.entry.is_some()))
            .collect();
        assert_eq!(ids, [("a-2", true), ("a-1", false)]);
        assert_eq!(now.revision, 3);
    }

    #[test]
    fn a_cursor_of_another_epoch_or_out_of_history_gets_a_reset() {
        let view = View::new("epoch-a");
        view.upsert(record(spec("a", "a-1", 1)));
        let foreign = Cursor {
            epoch: "epoch-b".into(),
            revision: 1,
        };
        assert!(matches!(view.since(Some(&foreign)).0, Since::Reset(e) if e.len() == 1));
        for port in 0..HISTORY as u16 + 1 {
            view.upsert(record(spec("a", "a-2", port + 2)));
        }
        let old = Cursor {
            epoch: "epoch-a".into(),
            revision: 1,
        };
        assert!(matches!(view.since(Some(&old)).0, Since::Reset(e) if e.len() == 2));
    }

    #[test]
    fn health_survives_re_registration_with_the_same_check_only() {
        let view = View::new("e");
        let first = record(spec("a", "a-1", 1));
        view.upsert(first.clone());
        assert!(view.set_health(&first, HealthStatus::Unhealthy));
        let mut again = first.clone();
        again.registration.weight = 5;
        view.upsert(again);
        assert_eq!(
            view.get("a-1").expect("a-1").health,
            HealthStatus::Unhealthy
        );
        view.upsert(record(spec("a", "a-1", 9)));
        assert_eq!(view.get("a-1").expect("a-1").health, HealthStatus::Unknown);
    }

    #[test]
    fn stale_backend_revisions_are_ignored() {
        let view = View::new("e");
        let mut newer = record(spec("a", "a-1", 1));
        newer.mod_revision = 10;
        view.upsert(newer);
        let mut older = record(spec("a", "a-1", 2));
        older.mod_revision = 5;
        view.upsert(older);
        assert_eq!(
            view.get("a-1")
                .expect("a-1")
                .record
                .registration
                .address()
                .port(),
            1
        );
        assert!(!view.remove("a-1", Some(9)));
        assert!(view.remove("a-1", Some(11)));
    }

    #[test]
    fn moving_an_id_to_another_service_removes_it_from_the_first() {
        let view = View::new("e");
        view.upsert(record(spec("a", "x-1", 1)));
        view.upsert(record(spec("b", "x-1", 1)));
        let services = view.services().services;
        assert_eq!(services.keys().collect::<Vec<_>>(), ["b"]);
    }

    fn speaking(service: &str, id: &str, port: u16, protocol: &str, at: u64) -> Record {
        let mut spec = spec(service, id, port);
        spec.protocol = protocol.into();
        Record {
            registered_at_unix_ms: at,
            ..record(spec)
        }
    }

    #[test]
    fn a_service_speaks_its_earliest_registrations_protocol_and_a_disagreement_is_counted() {
        let view = View::new("e");
        view.upsert(speaking("api", "api-2", 2, "http", 20));
        view.upsert(speaking("api", "api-1", 1, "grpc", 10));
        view.upsert(speaking("api", "api-3", 3, "tcp", 5));
        view.upsert(speaking("grpc", "grpc-1", 4, "grpc", 10));
        view.upsert(speaking("grpc", "grpc-2", 5, "http2", 30));
        let published = view.services();
        assert_eq!(
            published.services["api"].protocol,
            Some(fulcrum_core::UpstreamProtocol::Http2),
            "the earliest registration naming an HTTP protocol wins; tcp names none"
        );
        assert_eq!(
            published.services["grpc"].protocol,
            Some(fulcrum_core::UpstreamProtocol::Http2),
            "grpc and http2 agree"
        );
        assert_eq!(published.protocol_conflicts, 1);
    }

    fn service_ids(view: &View, service: &str) -> Vec<String> {
        view.service(service)
            .0
            .iter()
            .map(|entry| entry.record.registration.id.to_string())
            .collect()
    }

    #[test]
    fn a_services_shared_list_is_reused_until_the_service_changes() {
        let view = View::new("e");
        let first = record(spec("a", "a-1", 1));
        view.upsert(first.clone());
        view.upsert(record(spec("b", "b-1", 1)));
        let (shared, generation) = view.service("a");
        let (again, same_generation) = view.service("a");
        assert!(Arc::ptr_eq(&shared, &again));
        assert_eq!(generation, same_generation);

        // Another service's change keeps this one's list.
        view.upsert(record(spec("b", "b-2", 2)));
        assert!(Arc::ptr_eq(&shared, &view.service("a").0));

        view.upsert(record(spec("a", "a-2", 2)));
        assert_eq!(service_ids(&view, "a"), ["a-1", "a-2"]);
        assert!(view.set_health(&first, HealthStatus::Unhealthy));
        let (after_health, after_generation) = view.service("a");
        assert_eq!(after_health[0].health, HealthStatus::Unhealthy);
        assert!(after_generation > generation);
        view.remove("a-1", None);
        assert_eq!(service_ids(&view, "a"), ["a-2"]);
        view.remove("a-2", None);
        assert!(view.service("a").0.is_empty());
        view.upsert(record(spec("a", "a-3", 3)));
        assert_eq!(service_ids(&view, "a"), ["a-3"]);
    }

    #[test]
    fn a_same_content_re_registration_refreshes_the_shared_list_without_a_change() {
        let view = View::new("e");
        view.upsert(record(spec("a", "a-1", 1)));
        let (before, generation) = view.service("a");
        let mut renewed = record(spec("a", "a-1", 1));
        renewed.mod_revision = 7;
        view.upsert(renewed);
        let (after, same_generation) = view.service("a");
        assert_eq!(generation, same_generation);
        assert_eq!(before[0].record.mod_revision, 0);
        assert_eq!(after[0].record.mod_revision, 7);
    }

    #[test]
    fn moving_an_id_between_services_updates_both_shared_lists() {
        let view = View::new("e");
        view.upsert(record(spec("a", "x-1", 1)));
        view.upsert(record(spec("a", "x-2", 2)));
        assert_eq!(service_ids(&view, "a"), ["x-1", "x-2"]);
        view.upsert(record(spec("b", "x-1", 1)));
        assert_eq!(service_ids(&view, "a"), ["x-2"]);
        assert_eq!(service_ids(&view, "b"), ["x-1"]);
    }

    #[test]
    fn unhealthy_entries_are_published_unhealthy() {
        let view = View::new("e");
        let first = record(spec("a", "a-1", 1));
        view.upsert(first.clone());
        view.set_health(&first, HealthStatus::Unhealthy);
        assert_eq!(
            view.services().services["a"].endpoints[0].health,
            fulcrum_core::Health::Unhealthy
        );
    }

    /// Every service built from the entries now, with no cell reused: what
    /// [`View::services`] must equal.
    fn services_from_scratch(view: &View) -> RegistryServices {
        let state = view.read();
        let mut services = Services::new();
        let mut protocol_conflicts = 0;
        for (name, service) in &state.services {
            let built = build_service(&state.entries, name, &service.ids);
            protocol_conflicts += usize::from(built.protocol_conflict);
            services.insert(name.to_string(), built.endpoints);
        }
        RegistryServices {
            services,
            protocol_conflicts,
        }
    }

    #[test]
    fn a_service_whose_last_registration_left_keeps_nothing_per_name() {
        let view = View::new("e");
        for index in 0..1_000_u16 {
            let id = format!("s{index}-1");
            view.upsert(record(spec(&format!("s{index}"), &id, index + 1)));
            view.remove(&id, None);
        }
        // A service that moved every instance to another name leaves as well.
        view.upsert(record(spec("before", "m-1", 1)));
        view.upsert(record(spec("after", "m-1", 1)));
        let state = view.read();
        assert_eq!(
            state
                .services
                .keys()
                .map(|name| &**name)
                .collect::<Vec<_>>(),
            ["after"]
        );
    }

    #[test]
    fn a_service_that_left_and_came_back_gets_a_new_generation() {
        let view = View::new("e");
        view.upsert(record(spec("a", "a-1", 1)));
        let (_, present) = view.service("a");
        view.remove("a-1", None);
        let (empty, gone) = view.service("a");
        assert!(empty.is_empty());
        assert_eq!(gone, 0, "an absent service reads as generation 0");
        assert_ne!(present, gone);
        view.upsert(record(spec("a", "a-1", 1)));
        let (back, again) = view.service("a");
        assert_eq!(back.len(), 1);
        assert!(again > present, "{again} after {present}");
    }

    proptest::proptest! {
        #[test]
        fn the_services_and_their_health_counts_kept_incrementally_equal_a_recount(
            steps in proptest::collection::vec((0u8..5, 0u8..6, 0u8..3, 0u8..3), 0..60),
        ) {
            let view = View::new("e");
            for (step, (kind, id, service, port)) in steps.into_iter().enumerate() {
                let id = format!("i-{id}");
                let service = format!("svc-{service}");
                match kind {
                    0 | 1 => {
                        let mut spec = spec(&service, &id, u16::from(port) + 1);
                        spec.protocol = ["http", "grpc", "tcp"][usize::from(port)].to_owned();
                        let mut record = record(spec);
                        record.registered_at_unix_ms = u64::from(port);
                        record.mod_revision = i64::try_from(step).expect("small");
                        view.upsert(record);
                    }
                    2 => {
                        view.remove(&id, None);
                    }
                    3 => {
                        if let Some(entry) = view.get(&id) {
                            let health = if port == 0 { HealthStatus::Unhealthy } else { HealthStatus::Healthy };
                            view.set_health(&entry.record, health);
                        }
                    }
                    _ => view.replace_all(
                        view.entries()
                            .into_iter()
                            .filter(|entry| *entry.record.registration.id != *id)
                            .map(|entry| (*entry.record).clone())
                            .collect(),
                    ),
                }
                let before = view.services();
                proptest::prop_assert_eq!(&before, &services_from_scratch(&view));
                let mut counted: BTreeMap<(Arc<str>, &str), usize> = BTreeMap::new();
                for entry in view.entries() {
                    let key = (entry.record.registration.name.clone(), entry.health.as_str());
                    *counted.entry(key).or_default() += 1;
                }
                let by_health: BTreeMap<(Arc<str>, &str), usize> = view
                    .instances_by_health()
                    .into_iter()
                    .map(|(service, health, count)| ((service, health.as_str()), count))
                    .collect();
                proptest::prop_assert_eq!(by_health, counted, "the counts per service and health");
                let again = view.services();
                for (name, service) in &again.services {
                    proptest::prop_assert!(
                        Arc::ptr_eq(service, &before.services[name]),
                        "an unchanged service is shared, not rebuilt"
                    );
                }
            }
        }

        #[test]
        fn the_count_per_owner_follows_every_upsert_removal_and_reload(
            steps in proptest::collection::vec((0u8..4, 0u8..6, 0u8..3), 0..60),
        ) {
            let view = View::new("e");
            for (step, (kind, id, owner)) in steps.into_iter().enumerate() {
                let id = format!("i-{id}");
                match kind {
                    0 | 1 => {
                        let mut record = record(spec("svc", &id, u16::from(owner) + 1));
                        record.owner = format!("o-{owner}").into();
                        record.mod_revision = i64::try_from(step).expect("small");
                        view.upsert(record);
                    }
                    2 => {
                        view.remove(&id, None);
                    }
                    _ => view.replace_all(
                        view.entries()
                            .into_iter()
                            .filter(|entry| *entry.record.registration.id != *id)
                            .map(|entry| (*entry.record).clone())
                            .collect(),
                    ),
                }
                for owner in 0..3 {
                    let owner = format!("o-{owner}");
                    let held = view
                        .entries()
                        .iter()
                        .filter(|entry| *entry.record.owner == *owner)
                        .count();
                    proptest::prop_assert_eq!(view.owned_by(&owner), held);
                }
            }
        }
    }
}
