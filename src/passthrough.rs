//! The response future of a layer that usually passes a call straight through: the inner
//! future itself, unboxed, on the common path, and a boxed future only when the layer has
//! work of its own to do first (fetch a contract, inject a fault, reject a request).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;

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
