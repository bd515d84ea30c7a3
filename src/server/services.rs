//! The gRPC services Keel serves, in one list: each listener's health names, its
//! reflection and the edge's known methods are all read from it, so a new service is one
//! entry here (and its route on its listener).

use tonic::server::NamedService;
use tonic_health::pb::health_server::HealthServer;

use super::ServeError;
use super::health::DrainingHealth;
use crate::api::InferenceRoutes;
use crate::api::admin::AdminService;
use crate::api::legacy::LegacyApi;
use crate::observe::edge::KnownMethods;
use crate::pb;
use crate::pb::keel_inference_v1::prediction_service_server::PredictionServiceServer;

/// One of Keel's two listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Listener {
    /// `server.listen`.
    Traffic,
    /// `server.admin_listen`, when given.
    Admin,
}

/// What a service's `grpc.health.v1` name follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Follows {
    /// Readiness: NOT_SERVING while a required model cannot answer, and from the drain on.
    Readiness,
    /// SERVING until the drain begins, whatever the models can do.
    Drain,
    /// No health name of its own.
    Nothing,
}

/// A service Keel serves, and what it needs.
#[derive(Debug)]
pub(super) struct Service {
    /// Its gRPC name, taken from the type served so the two cannot drift apart.
    pub(super) name: &'static str,
    /// The listeners that serve it, and so list it in their reflection.
    pub(super) on: &'static [Listener],
    /// What its health name follows.
    pub(super) health: Follows,
}

/// Every service Keel serves (reflection aside: it lists itself), in the order health
/// names are set and reflection lists them.
pub(super) const SERVICES: &[Service] = &[
    Service {
        name: <InferenceRoutes as NamedService>::NAME,
        on: &[Listener::Traffic],
        health: Follows::Readiness,
    },
    Service {
        name: <PredictionServiceServer<LegacyApi> as NamedService>::NAME,
        on: &[Listener::Traffic],
        health: Follows::Readiness,
    },
    Service {
        name: <AdminService as NamedService>::NAME,
        on: &[Listener::Admin],
        // The admin API answers whatever the models can do.
        health: Follows::Drain,
    },
    Service {
        name: <HealthServer<DrainingHealth> as NamedService>::NAME,
        on: &[Listener::Traffic, Listener::Admin],
        health: Follows::Nothing,
    },
];

/// The services `listener` serves.
pub(super) fn on(listener: Listener) -> impl Iterator<Item = &'static Service> {
    SERVICES.iter().filter(move |s| s.on.contains(&listener))
}

/// Reflection (v1 and v1alpha) over every Keel proto, listing only the services of
/// `listener` (and itself): each listener lists what it serves.
pub(super) fn reflection(
    listener: Listener,
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServeError,
> {
    let builder = || {
        on(listener).fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |b, service| b.with_service_name(service.name),
        )
    };
    let v1 = builder()
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()?;
    let v1alpha = builder()
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// Every method of the services Keel serves, from their descriptors, so metrics label only
/// methods that exist.
pub(super) fn known_methods() -> KnownMethods {
    let methods = described()
        .filter(|(name, _)| SERVICES.iter().any(|s| s.name == name))
        .flat_map(|(name, service)| {
            service.method.into_iter().map(move |m| {
                (
                    name.clone(),
                    m.name.unwrap_or_default(),
                    m.client_streaming.unwrap_or(false),
                    m.server_streaming.unwrap_or(false),
                )
            })
        });
    KnownMethods::new(methods)
}

/// Every service of Keel's and the health protos, with its full gRPC name.
fn described() -> impl Iterator<Item = (String, prost_types::ServiceDescriptorProto)> {
    use prost::Message as _;
    [
        pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ]
    .into_iter()
    .filter_map(|set| prost_types::FileDescriptorSet::decode(set).ok())
    .flat_map(|fds| fds.file)
    .flat_map(|file| {
        let package = file.package.unwrap_or_default();
        file.service.into_iter().map(move |service| {
            let name = format!("{package}.{}", service.name.clone().unwrap_or_default());
            (name, service)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_service_has_a_descriptor() {
        let described: Vec<String> = described().map(|(name, _)| name).collect();
        for s in SERVICES {
            assert!(
                described.iter().any(|d| d == s.name),
                "{} has no descriptor",
                s.name
            );
        }
    }
}
