//! Cache-line padding for values that different cores write.

/// Aligns a value to its own pair of cache lines (adjacent-line prefetchers pull in two), so
/// that a value one core writes does not slow down readers of its neighbours.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// One owner's hold on a shared value: an `Arc` of the owner's own, padded, around the shared
/// `Arc`. Cloning a hold writes only that hold's reference count, so owners that clone on
/// every call (a client clone, a balancer handle) and run on different cores never write the
/// same cache line; [`fork`](Self::fork) makes the hold for another owner.
pub(crate) struct Hold<T: ?Sized>(std::sync::Arc<CachePadded<std::sync::Arc<T>>>);

impl<T: ?Sized> Hold<T> {
    /// The first hold on `shared`.
    pub(crate) fn new(shared: std::sync::Arc<T>) -> Self {
        Self(std::sync::Arc::new(CachePadded(shared)))
    }

    /// A hold of its own, on the same value, for another owner.
    pub(crate) fn fork(&self) -> Self {
        Self::new(self.0 .0.clone())
    }
}

impl<T: ?Sized> Clone for Hold<T> {
    /// Another reference to this owner's hold (the same reference count).
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: ?Sized> std::ops::Deref for Hold<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0 .0
    }
}
