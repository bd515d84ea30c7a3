//! The service and response future of a layer that usually passes a call straight through
//! ([`ValidateLayer`](super::ValidateLayer), [`FaultLayer`](super::FaultLayer)): the inner
//! future itself, unboxed, on the common path, and a boxed future only when the layer has
//! work of its own to do first (fetch a contract, inject a fault, reject a request).
//!
//! Such a layer says only what it does with one call ([`Gate`]); [`Gated`] is its service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::Service;

use crate::call::Call;
use crate::error::Error;

pub use future::Passthrough;

/// The future, apart: the projection `pin_project!` generates has no docs of its own.
#[allow(missing_docs)]
mod future {
    use pin_project_lite::pin_project;

    use super::*;

    pin_project! {
        /// The inner call's future, or the layer's own work.
        #[project = Projected]
        pub enum Passthrough<F, T> {
            /// The inner call, untouched.
            Inner { #[pin] fut: F },
            /// The layer's own work (which may end in the inner call).
            Own { fut: BoxFuture<'static, Result<T, Error>> },
        }
    }

    impl<F, T> Future for Passthrough<F, T>
    where
        F: Future<Output = Result<T, Error>>,
    {
        type Output = Result<T, Error>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.project() {
                Projected::Inner { fut } => fut.poll(cx),
                Projected::Own { fut } => fut.as_mut().poll(cx),
            }
        }
    }
}

impl<F, T> Passthrough<F, T> {
    /// The inner call.
    pub fn inner(fut: F) -> Self {
        Passthrough::Inner { fut }
    }

    /// The layer's own work.
    pub fn own(fut: impl Future<Output = Result<T, Error>> + Send + 'static) -> Self {
        Passthrough::Own { fut: Box::pin(fut) }
    }
}

/// The inner service of a passing layer: one whose future can be boxed into the layer's work.
pub trait Next<Op>:
    Service<Call<Op>, Error = Error, Future: Send + 'static, Response: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S, Op> Next<Op> for S where
    S: Service<Call<Op>, Error = Error, Future: Send + 'static, Response: Send + 'static>
        + Clone
        + Send
        + 'static
{
}

/// What a passing layer does with one call.
pub trait Gate<Op> {
    /// `call` passed on untouched ([`Passthrough::inner`]), or the layer's own work
    /// ([`Passthrough::own`]), which takes the ready `inner` along with [`take`].
    fn gate<S: Next<Op>>(
        &self,
        call: Call<Op>,
        inner: &mut S,
    ) -> Passthrough<S::Future, S::Response>;
}

/// The service of a passing layer `G`: readiness is the inner service's, each call is `G`'s.
#[derive(Clone, Debug)]
pub struct Gated<S, G> {
    inner: S,
    gate: G,
}

impl<S, G> Gated<S, G> {
    /// `inner` behind `gate`.
    pub fn new(inner: S, gate: G) -> Self {
        Gated { inner, gate }
    }
}

impl<S, G, Op> Service<Call<Op>> for Gated<S, G>
where
    S: Next<Op>,
    G: Gate<Op>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = Passthrough<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call<Op>) -> Self::Future {
        self.gate.gate(call, &mut self.inner)
    }
}

/// The service that was polled ready, to go with the call into the layer's own work; a
/// clone (to be polled ready for the next call) stays in its place.
pub fn take<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}
