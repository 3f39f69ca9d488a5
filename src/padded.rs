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
