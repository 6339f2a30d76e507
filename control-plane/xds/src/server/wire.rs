//! ADS responses on the wire, framed from the cache's shared bytes: no stream keeps a
//! buffer or a copy of the resources it sends.
//!
//! Why: tonic's generated server encodes each response message into a per-stream buffer
//! that grows to the largest message the stream ever sent and keeps that allocation for the
//! stream's life (bytes' `BytesMut` reuses it). An Envoy's first EDS answer carries every
//! endpoint it follows, so each stream kept about 0.5 MiB at 10,000 endpoints, and the
//! response itself held one more copy of every resource (`Any` values are `Vec<u8>`). A
//! heap profile of the control plane with 100 streams showed those buffers as 53 of its 78
//! MiB of live heap (BENCHMARKS.md, "xDS at scale").
//!
//! Here a response is a [`Push`]: its fields and the cache's [`EncodedResource`]s, each
//! holding its `Any` encoded once as a ready element of the response's field 2
//! ([`EncodedResource::entry`] for SotW, [`EncodedResource::delta_entry`] for delta).
//! A [`Framer`] lays it out as one gRPC message whose large resources are those very
//! allocations (reference counted), and [`PushBody`] hands the frames to hyper one by one,
//! each laid out when hyper asks for it and no more than [`MAX_IN_FLIGHT`] bytes ahead of
//! what h2 has written.
//! The bytes are what prost would encode for the same `DiscoveryResponse` or
//! `DeltaDiscoveryResponse`, field for field (the tests compare them), so Envoy sees no
//! difference.
//!
//! Small pieces (the other fields, resources under [`COPY_BELOW`]) are copied into frames
//! closed once past 64 KiB, between the shared ones: h2 keeps a slot per frame it holds at
//! once in a per-connection slab that never shrinks, so a response is one frame per large
//! resource and a few for all the small ones, not one per field or per resource. A message
//! under [`ONE_FRAME_BELOW`] (a change's push) is copied whole into one frame, freed once
//! written: h2 writes each frame it cannot join to the previous one in a write of its own,
//! and a second small write waits on the peer's delayed ACK (Nagle), which cost every
//! change 40 ms when its push was three frames.

#[cfg(test)]
use std::collections::VecDeque;
use std::{
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
use http_body::Frame;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use crate::{
    cache::{EncodedResource, ResourceType},
    status::StreamKind,
};

/// The gRPC message prefix: a compressed flag (never set) and the length, big endian.
const GRPC_PREFIX: usize = 5;
/// Resources smaller than this are copied into the surrounding frame rather than sent as a
/// frame of their own. h2 keeps a slot per frame queued at once, for the connection's life:
/// at 1 KiB, an initial EDS answer of 100 clusters of 100 endpoints (3.2 KiB each) queued
/// about 100 frames and left each connection 20 KiB more than at 16 KiB, where the same
/// answer is about 20 copied frames (the copies are freed once written).
pub(crate) const COPY_BELOW: usize = 16 * 1024;
/// A frame of copied pieces is closed at this size. Few frames keep h2's slab small (it holds
/// one slot of about 300 bytes per frame queued at once, for the connection's life); the
/// bound keeps each copy a heap allocation under glibc's mmap threshold (128 KiB), which
/// later copies reuse. At 16 KiB an initial EDS answer of 100 clusters of 100 endpoints was
/// about 20 frames and each connection kept 5-8 KiB more than at 64 KiB, where it is five;
/// at 256 KiB the copies of 100 initial answers at once were mapped and unmapped whole and
/// raised the peak RSS by up to 13 MiB at 20,000 endpoints (BENCHMARKS.md).
const COPIED_FRAME: usize = 64 * 1024;
/// A message shorter than this goes out as one frame, copied.
pub(crate) const ONE_FRAME_BELOW: usize = 64 * 1024;

/// One response of either ADS variant, before framing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Push {
    /// The resource type of every resource in it.
    pub(crate) ty: ResourceType,
    /// SotW `version_info`, delta `system_version_info`: the snapshot's version.
    pub(crate) version: Arc<str>,
    /// The response nonce.
    pub(crate) nonce: String,
    /// The resources sent, shared with the cache.
    pub(crate) resources: Vec<Arc<EncodedResource>>,
    /// Delta only: names Envoy should drop.
    pub(crate) removed: Vec<String>,
}

/// Lays one [`Push`] out as one gRPC message, a frame at a time: the gRPC prefix and the
/// fields before the resources, each resource (shared when at least `share_from` bytes long,
/// else copied into the frame being filled, which closes once past `close_at`), then the
/// fields after them. A frame is laid out only when the body is polled for one, so a stream
/// holds no more of an answer than [`PushBody`] lets it have in flight.
pub(crate) struct Framer {
    kind: StreamKind,
    push: Box<Push>,
    /// The prefix and the fields before the resources, until copied into the first frame.
    head: Option<Vec<u8>>,
    /// The fields after the resources, until copied into the last frame.
    tail: Option<Vec<u8>>,
    /// The next resource to lay out.
    next: usize,
    /// Bytes of the message, prefix included, not laid out yet.
    remaining: usize,
    /// Pieces at least this long are shared, not copied.
    share_from: usize,
    /// A frame of copied pieces closes at this length.
    close_at: usize,
}

impl Framer {
    /// The framer of `push` for a `kind` stream. Fails only for a message beyond gRPC's 4 GiB
    /// length field.
    pub(crate) fn new(kind: StreamKind, push: Box<Push>) -> Result<Self, Status> {
        let type_url = push.ty.type_url().to_owned();
        // Fields 1 and 4.. of the message, encoded by prost; field 2 (the resources) goes
        // between them, as prost orders fields by number.
        let (head, tail) = match kind {
            StreamKind::Sotw => (
                DiscoveryResponse {
                    version_info: push.version.to_string(),
                    ..Default::default()
                }
                .encode_to_vec(),
                DiscoveryResponse {
                    type_url,
                    nonce: push.nonce.clone(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            StreamKind::Delta => (
                DeltaDiscoveryResponse {
                    system_version_info: push.version.to_string(),
                    ..Default::default()
                }
                .encode_to_vec(),
                DeltaDiscoveryResponse {
                    type_url,
                    nonce: push.nonce.clone(),
                    removed_resources: push.removed.clone(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        };
        let length = head.len()
            + tail.len()
            + push
                .resources
                .iter()
                .map(|resource| element(kind, resource).len())
                .sum::<usize>();
        let length = u32::try_from(length).map_err(|_| {
            Status::resource_exhausted(
                "an xDS response exceeds gRPC's 4 GiB message limit; split the mesh over more clusters",
            )
        })?;
        let whole = GRPC_PREFIX + length as usize;
        let (share_from, close_at) = if whole < ONE_FRAME_BELOW {
            (usize::MAX, usize::MAX)
        } else {
            (COPY_BELOW, COPIED_FRAME)
        };
        let mut prefixed = Vec::with_capacity(GRPC_PREFIX + head.len());
        prefixed.push(0);
        prefixed.extend_from_slice(&length.to_be_bytes());
        prefixed.extend_from_slice(&head);
        Ok(Self {
            kind,
            push,
            head: Some(prefixed),
            tail: Some(tail),
            next: 0,
            remaining: whole,
            share_from,
            close_at,
        })
    }

    /// The next frame of the message; `None` once it is all laid out.
    pub(crate) fn next_frame(&mut self) -> Option<Bytes> {
        let mut frame = BytesMut::new();
        // A copied frame is one allocation: it ends past `close_at` by less than a copied piece.
        let reserve = self.remaining.min(self.close_at.saturating_add(COPY_BELOW));
        if let Some(head) = self.head.take() {
            copy(&mut frame, &head, &mut self.remaining, reserve);
        }
        while frame.len() < self.close_at {
            let Some(resource) = self.push.resources.get(self.next) else {
                break;
            };
            let piece = element(self.kind, resource);
            if piece.len() >= self.share_from {
                if !frame.is_empty() {
                    // The shared piece is the next frame.
                    return Some(frame.freeze());
                }
                self.next += 1;
                self.remaining -= piece.len();
                return Some(piece.clone());
            }
            self.next += 1;
            copy(&mut frame, piece, &mut self.remaining, reserve);
        }
        if frame.len() < self.close_at
            && self.next == self.push.resources.len()
            && let Some(tail) = self.tail.take()
        {
            copy(&mut frame, &tail, &mut self.remaining, reserve);
        }
        debug_assert!(
            !frame.is_empty() || self.remaining == 0,
            "the gRPC prefix states the message's length"
        );
        (!frame.is_empty()).then(|| frame.freeze())
    }
}

/// Copies `bytes` into `frame`, reserving `reserve` bytes first when it has no room yet.
fn copy(frame: &mut BytesMut, bytes: &[u8], remaining: &mut usize, reserve: usize) {
    if frame.capacity() == 0 {
        frame.reserve(reserve);
    }
    frame.put_slice(bytes);
    *remaining -= bytes.len();
}

/// One resource as an element of a `kind` response's field 2, key and length first: the
/// cache's bytes as they stand.
fn element(kind: StreamKind, resource: &EncodedResource) -> &Bytes {
    match kind {
        StreamKind::Sotw => &resource.entry,
        StreamKind::Delta => resource.delta_entry(),
    }
}

#[cfg(test)]
impl Push {
    /// Every frame of the push, laid out at once.
    fn frames(&self, kind: StreamKind) -> Result<VecDeque<Bytes>, Status> {
        let mut framer = Framer::new(kind, Box::new(self.clone()))?;
        Ok(std::iter::from_fn(|| framer.next_frame()).collect())
    }

    /// The message `frames` sends, decoded by prost (tests read pushes as Envoy does).
    fn decoded<M: Message + Default>(&self, kind: StreamKind) -> M {
        let frames = self.frames(kind).expect("frames");
        let joined: Vec<u8> = frames.iter().flatten().copied().collect();
        M::decode(&joined[GRPC_PREFIX..]).expect("a valid message")
    }

    /// The `DiscoveryResponse` a SotW stream sends for this push.
    pub(crate) fn decoded_sotw(&self) -> DiscoveryResponse {
        self.decoded(StreamKind::Sotw)
    }

    /// The `DeltaDiscoveryResponse` a delta stream sends for this push.
    pub(crate) fn decoded_delta(&self) -> DeltaDiscoveryResponse {
        self.decoded(StreamKind::Delta)
    }
}

/// What a stream's driver hands its body: a response, or the error that ends the stream
/// (a request the driver could not read). Both boxed: the channel allocates its slots 32
/// at a time for the stream's life, and a `Push` is 104 bytes where a box is 8.
pub(crate) type Outgoing = Result<Box<Push>, Box<Status>>;

/// Bytes of its answers a stream may have handed to hyper that h2 has not written yet. Past
/// it, the body lays out no further frame until h2 has written (and dropped) enough of them:
/// h2 takes every frame it is given as long as Envoy's flow-control window allows, and
/// Envoy's is 256 MiB, so a stream that laid out a whole answer at once held all of it until
/// the socket drained, a copy per stream of every resource under [`COPY_BELOW`]: 0.7 MiB for
/// an Envoy's first answer in a mesh of 1,000 services, 70 MiB for 100 Envoys reconnecting at
/// once, which glibc then kept. Two copied frames' worth: the socket's own buffer is larger,
/// so the writes never wait on it.
pub(crate) const MAX_IN_FLIGHT: usize = 2 * COPIED_FRAME;

/// A stream's frames handed to hyper and not yet dropped by h2, and the body's waker.
#[derive(Debug, Default)]
struct InFlight {
    bytes: AtomicUsize,
    /// The body, when it waits for bytes to leave.
    waiting: Mutex<Option<Waker>>,
}

impl InFlight {
    /// `frame`, counted until h2 drops it (once written, or with the connection).
    fn track(self: &Arc<Self>, frame: Bytes) -> Bytes {
        self.bytes.fetch_add(frame.len(), Ordering::AcqRel);
        Bytes::from_owner(Tracked {
            frame,
            in_flight: Arc::clone(self),
        })
    }

    /// Whether the body must wait before laying out another frame; if so, `waker` is woken
    /// once bytes leave.
    fn full(&self, waker: &Waker) -> bool {
        if self.bytes.load(Ordering::Acquire) < MAX_IN_FLIGHT {
            return false;
        }
        *self.waiting.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
        // A frame dropped between the load and the registration found no waker: look again.
        self.bytes.load(Ordering::Acquire) >= MAX_IN_FLIGHT
    }
}

/// A frame as handed to hyper: its bytes leave the stream's count when h2 drops it.
struct Tracked {
    frame: Bytes,
    in_flight: Arc<InFlight>,
}

impl AsRef<[u8]> for Tracked {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.in_flight
            .bytes
            .fetch_sub(self.frame.len(), Ordering::AcqRel);
        let waiting = self
            .in_flight
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

/// The body of one ADS stream's response: the frames of each [`Push`] the stream driver
/// queues, laid out as h2 writes them ([`MAX_IN_FLIGHT`] ahead at most), then
/// `grpc-status: 0` when the driver ends the stream (tonic's generated server ends it the same
/// way), or the status of the error it ended on.
pub(crate) struct PushBody {
    kind: StreamKind,
    pushes: mpsc::Receiver<Outgoing>,
    /// The push being laid out.
    framing: Option<Framer>,
    in_flight: Arc<InFlight>,
    ended: bool,
}

impl PushBody {
    /// The body of a `kind` stream sending what arrives on `pushes`.
    pub(crate) fn new(kind: StreamKind, pushes: mpsc::Receiver<Outgoing>) -> Self {
        Self {
            kind,
            pushes,
            framing: None,
            in_flight: Arc::default(),
            ended: false,
        }
    }

    fn trailers(&mut self, status: &Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.ended = true;
        let mut trailers = tonic::codegen::http::HeaderMap::new();
        match status.add_header(&mut trailers) {
            Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Err(status) => Poll::Ready(Some(Err(status))),
        }
    }
}

impl http_body::Body for PushBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(framing) = &mut this.framing {
                if this.in_flight.full(context.waker()) {
                    return Poll::Pending;
                }
                match framing.next_frame() {
                    Some(frame) => {
                        let frame = this.in_flight.track(frame);
                        return Poll::Ready(Some(Ok(Frame::data(frame))));
                    }
                    None => this.framing = None,
                }
                continue;
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match this.pushes.poll_recv(context) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return this.trailers(&Status::ok("")),
                Poll::Ready(Some(Err(status))) => return this.trailers(&status),
                Poll::Ready(Some(Ok(push))) => match Framer::new(this.kind, push) {
                    Ok(framing) => this.framing = Some(framing),
                    Err(status) => return this.trailers(&status),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.framing.is_none()
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::{envoy::service::discovery::v3::Resource, google::protobuf::Any};

    use super::*;

    fn resource(name: &str, version: &str, value_len: usize) -> Arc<EncodedResource> {
        let any = Any {
            type_url: ResourceType::Endpoint.type_url().to_owned(),
            value: (0..value_len).map(|byte| byte as u8).collect(),
        };
        Arc::new(EncodedResource::new(
            name.to_owned(),
            version.to_owned(),
            &any.encode_to_vec(),
        ))
    }

    fn push(resources: Vec<Arc<EncodedResource>>, removed: &[&str]) -> Push {
        Push {
            ty: ResourceType::Endpoint,
            version: Arc::from("v7"),
            nonce: "12".to_owned(),
            resources,
            removed: removed.iter().map(|name| (*name).to_owned()).collect(),
        }
    }

    /// The bytes of `push` on a `kind` stream, gRPC prefix included.
    fn on_the_wire(push: &Push, kind: StreamKind) -> Vec<u8> {
        let frames = push.frames(kind).expect("frames");
        frames.iter().flatten().copied().collect()
    }

    /// The frames joined, checked for the gRPC prefix, without it.
    fn message(frames: &VecDeque<Bytes>) -> Vec<u8> {
        let joined: Vec<u8> = frames.iter().flatten().copied().collect();
        assert_eq!(joined[0], 0, "never compressed");
        let length = u32::from_be_bytes(joined[1..5].try_into().expect("four bytes")) as usize;
        assert_eq!(length, joined.len() - GRPC_PREFIX);
        joined[GRPC_PREFIX..].to_vec()
    }

    fn any(resource: &EncodedResource) -> Any {
        Any::decode(resource.any.clone()).expect("an encoded Any")
    }

    #[test]
    fn a_sotw_push_is_byte_for_byte_what_prost_encodes() {
        let resources = vec![
            resource("a", "1", 10),
            resource("b", "2", 5000),
            resource("c", "3", 0),
        ];
        let push = push(resources.clone(), &[]);
        let frames = push.frames(StreamKind::Sotw).expect("frames");
        let expected = DiscoveryResponse {
            version_info: "v7".to_owned(),
            resources: resources.iter().map(|resource| any(resource)).collect(),
            type_url: ResourceType::Endpoint.type_url().to_owned(),
            nonce: "12".to_owned(),
            ..Default::default()
        };
        assert_eq!(message(&frames), expected.encode_to_vec());
    }

    #[test]
    fn a_delta_push_is_byte_for_byte_what_prost_encodes() {
        let resources = vec![resource("a", "1", 3000), resource("b", "2", 7)];
        let push = push(resources.clone(), &["gone", "also-gone"]);
        let frames = push.frames(StreamKind::Delta).expect("frames");
        let expected = DeltaDiscoveryResponse {
            system_version_info: "v7".to_owned(),
            resources: resources
                .iter()
                .map(|resource| Resource {
                    name: resource.name.to_string(),
                    version: resource.version.to_string(),
                    resource: Some(any(resource)),
                    ..Default::default()
                })
                .collect(),
            type_url: ResourceType::Endpoint.type_url().to_owned(),
            removed_resources: vec!["gone".to_owned(), "also-gone".to_owned()],
            nonce: "12".to_owned(),
            ..Default::default()
        };
        assert_eq!(message(&frames), expected.encode_to_vec());
    }

    #[test]
    fn a_large_resource_is_sent_from_the_cache_allocation_not_a_copy() {
        let large = resource("a", "1", ONE_FRAME_BELOW);
        let small = resource("b", "1", 10);
        let push = push(vec![Arc::clone(&large), small], &[]);
        for kind in [StreamKind::Sotw, StreamKind::Delta] {
            let frames = push.frames(kind).expect("frames");
            let cached = match kind {
                StreamKind::Sotw => &large.entry,
                StreamKind::Delta => large.delta_entry(),
            };
            let shared = frames
                .iter()
                .filter(|frame| frame.as_ptr() == cached.as_ptr())
                .count();
            assert_eq!(
                shared, 1,
                "{kind:?}: the large resource is one shared frame"
            );
            assert_eq!(
                frames.len(),
                3,
                "{kind:?}: head, the large resource, the small one with the tail"
            );
        }
    }

    #[test]
    fn small_resources_of_a_large_push_are_copied_into_few_frames() {
        // An initial EDS answer: 100 clusters of 3 KiB, none large enough to share.
        let resources: Vec<_> = (0..100)
            .map(|index| resource(&format!("cluster-{index}"), "1", 3 * 1024))
            .collect();
        let push = push(resources, &[]);
        for kind in [StreamKind::Sotw, StreamKind::Delta] {
            let frames = push.frames(kind).expect("frames");
            let whole: usize = frames.iter().map(Bytes::len).sum();
            assert!(whole > 300 * 1024, "{kind:?}: {whole} bytes");
            assert_eq!(
                frames.len(),
                whole.div_ceil(COPIED_FRAME),
                "{kind:?}: frames of the bound and the rest"
            );
            assert!(
                frames
                    .iter()
                    .all(|frame| frame.len() < COPIED_FRAME + 4 * 1024),
                "{kind:?}: a frame closes once past the bound, by less than a resource"
            );
        }
    }

    #[test]
    fn a_small_push_is_one_frame_so_the_peer_gets_it_in_one_write() {
        let push = push(
            vec![resource("a", "1", 2 * COPY_BELOW), resource("b", "1", 10)],
            &["gone"],
        );
        for kind in [StreamKind::Sotw, StreamKind::Delta] {
            let frames = push.frames(kind).expect("frames");
            assert_eq!(frames.len(), 1, "{kind:?}");
        }
    }

    #[tokio::test]
    async fn the_body_sends_every_push_then_an_ok_status() {
        use http_body::Body as _;

        let (sender, receiver) = mpsc::channel(4);
        let mut body = std::pin::pin!(PushBody::new(StreamKind::Sotw, receiver));
        let sent = push(vec![resource("a", "1", 2 * COPY_BELOW)], &[]);
        let expected = on_the_wire(&sent, StreamKind::Sotw);
        sender.send(Ok(Box::new(sent))).await.expect("open");
        drop(sender);
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) =
            std::future::poll_fn(|context| body.as_mut().poll_frame(context)).await
        {
            let frame = frame.expect("no error");
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(data, expected);
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert!(body.is_end_stream());
    }

    #[test]
    fn the_body_lays_out_an_answer_only_as_far_ahead_of_h2s_writes_as_its_bound() {
        use http_body::Body as _;

        // An Envoy's first answer in a mesh of 1,000 services: 1,000 small resources, each
        // copied into frames.
        let resources: Vec<_> = (0..1000)
            .map(|index| resource(&format!("service-{index}"), "1", 700))
            .collect();
        let sent = push(resources, &[]);
        let expected = on_the_wire(&sent, StreamKind::Sotw);
        assert!(expected.len() > 4 * MAX_IN_FLIGHT);
        let (sender, receiver) = mpsc::channel(4);
        sender.try_send(Ok(Box::new(sent))).expect("room");
        drop(sender);
        let mut body = std::pin::pin!(PushBody::new(StreamKind::Sotw, receiver));
        let mut context = Context::from_waker(std::task::Waker::noop());
        let mut data = Vec::new();
        let mut waits = 0;
        loop {
            // What h2 holds: every frame handed over since it last wrote.
            let mut held = Vec::new();
            let ended = loop {
                match body.as_mut().poll_frame(&mut context) {
                    Poll::Pending => break false,
                    Poll::Ready(None) => break true,
                    Poll::Ready(Some(frame)) => match frame.expect("no error").into_data() {
                        Ok(bytes) => held.push(bytes),
                        Err(trailers) => assert!(trailers.is_trailers()),
                    },
                }
            };
            let in_flight: usize = held.iter().map(Bytes::len).sum();
            assert!(
                in_flight < MAX_IN_FLIGHT + COPIED_FRAME + COPY_BELOW,
                "{in_flight} bytes laid out ahead of the writes"
            );
            // h2 writes them and drops them.
            held.iter().for_each(|frame| data.extend_from_slice(frame));
            drop(held);
            if ended {
                break;
            }
            waits += 1;
        }
        assert_eq!(data, expected, "the whole answer, byte for byte");
        assert!(waits >= 4, "waited for the writes {waits} times");
    }

    #[tokio::test]
    async fn the_body_ends_with_the_status_of_the_error_it_is_handed() {
        use http_body::Body as _;

        let (sender, receiver) = mpsc::channel(4);
        let mut body = std::pin::pin!(PushBody::new(StreamKind::Delta, receiver));
        let refused = Status::out_of_range("decoded message length too large");
        sender.send(Err(Box::new(refused))).await.expect("open");
        let frame = std::future::poll_fn(|context| body.as_mut().poll_frame(context))
            .await
            .expect("a frame")
            .expect("no error");
        let trailers = frame.into_trailers().expect("trailers, no data");
        assert_eq!(trailers["grpc-status"], "11", "OUT_OF_RANGE");
        // Percent-encoded, as gRPC sends a message.
        assert_eq!(
            trailers["grpc-message"],
            "decoded%20message%20length%20too%20large"
        );
        assert!(body.is_end_stream());
    }
}
