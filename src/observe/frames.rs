//! A response body watched frame by frame: the one `Body` wrapper that the edge's request
//! record and the receipt's trailers both use, so each says only what it does with a frame.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// One poll's outcome of a body: a frame, an error, or the end.
pub type Polled<B> = Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>;

/// What is done with each frame of a watched body.
pub trait Watch<B: Body> {
    /// Sees (and may change) each frame as it passes, and the end (`None`).
    fn frame(&mut self, frame: Polled<B>) -> Polled<B>;

    /// Whether the watcher still has a frame of its own to add after the body ends, so
    /// the body is not over when the inner one is.
    fn adds(&self) -> bool {
        false
    }
}

pin_project! {
    /// `inner`, with each frame shown to `watch`.
    pub struct Watched<B, W> {
        #[pin]
        inner: B,
        watch: W,
    }
}

impl<B, W> Watched<B, W> {
    /// `inner` watched by `watch`.
    pub fn new(inner: B, watch: W) -> Self {
        Watched { inner, watch }
    }
}

impl<B: Body, W: Watch<B>> Body for Watched<B, W> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        Poll::Ready(this.watch.frame(frame))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && !self.watch.adds()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
