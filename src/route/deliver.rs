//! The innermost service of every method's stack: sends an attempt to the backend its
//! call's route chose.

use std::marker::PhantomData;
use std::task::{Context, Poll};

use tower::Service;

use crate::call::Call;
use crate::error::Error;
use crate::upstream::{BackendFuture, Operation};

/// The innermost service: sends an attempt to its route's backend.
#[derive(Debug)]
pub struct Deliver<Op> {
    _op: PhantomData<fn(Op)>,
}

impl<Op> Deliver<Op> {
    /// The service.
    pub fn new() -> Self {
        Deliver { _op: PhantomData }
    }
}

impl<Op> Default for Deliver<Op> {
    fn default() -> Self {
        Deliver::new()
    }
}

impl<Op> Clone for Deliver<Op> {
    fn clone(&self) -> Self {
        Deliver::new()
    }
}

impl<Op: Operation> Service<Call<Op>> for Deliver<Op> {
    type Response = Op::Response;
    type Error = Error;
    type Future = BackendFuture<Op::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call<Op>) -> Self::Future {
        Op::send(call.ctx.route.target.backend.as_ref(), call.attempt())
    }
}
