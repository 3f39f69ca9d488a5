//! Macros for boilerplate every middleware repeats.

/// `get_ref`, `get_mut` and `into_inner` for services that keep their inner service in a
/// field named `inner`, as tower's middleware do: inside an `impl` block with no arguments,
/// or as whole `impl<S> Name<S>` blocks for the services named.
macro_rules! inner_accessors {
    () => {
        /// A reference to the inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// A mutable reference to the inner service.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Consumes the middleware, returning the inner service.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
    ($($service:ident),+) => {$(
        impl<S> $service<S> {
            crate::macros::inner_accessors!();
        }
    )+};
}

pub(crate) use inner_accessors;
