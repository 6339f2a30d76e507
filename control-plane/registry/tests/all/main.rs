//! The registry's integration tests, one binary: the REST and gRPC APIs over loopback,
//! active health checks against the sample backend and real gRPC servers, and the etcd
//! backend on a real three-member etcd cluster, and over mutual TLS on a one-member one;
//! records written into etcd around a replica's admission, admitted again as they are read.

mod admission;
mod api_grpc;
mod api_rest;
mod discover_answers;
mod etcd;
mod etcd_cluster;
mod etcd_readmission;
mod etcd_tls;
mod etcd_writes;
mod health_checks;
mod metrics;
mod support;
