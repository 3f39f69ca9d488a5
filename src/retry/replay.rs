//! [`Replay`]: how a layer gets a copy of a request to send again (a retry or a hedge).

/// Makes a copy of a request for another try, or declines (`None`): the request is then sent
/// once and never retried or hedged.
///
/// The default, [`CloneRequest`], clones any `Clone` request. Closures
/// `Fn(&Req) -> Option<Req>` implement it for requests that cannot always be copied (a
/// streaming body), and [`OnlyIf`] adds a predicate (only idempotent methods, say).
pub trait Replay<Req> {
    /// A copy of `request` to send as another try, or `None` if it must not be repeated.
    fn replay(&self, request: &Req) -> Option<Req>;

    /// A copy of a `request` that [`replay`](Self::replay) would not copy, to send again
    /// only if its try fails before anything is sent (see [`crate::error::is_unsent`]): a
    /// `POST` refused a connection, say. `None` (the default): such requests are sent once.
    fn replay_unsent(&self, request: &Req) -> Option<Req> {
        let _ = request;
        None
    }
}

/// Replays a request by cloning it.
#[derive(Clone, Copy, Debug, Default)]
pub struct CloneRequest;

impl<Req: Clone> Replay<Req> for CloneRequest {
    #[inline]
    fn replay(&self, request: &Req) -> Option<Req> {
        Some(request.clone())
    }
}

impl<F, Req> Replay<Req> for F
where
    F: Fn(&Req) -> Option<Req>,
{
    fn replay(&self, request: &Req) -> Option<Req> {
        self(request)
    }
}

/// Replays with `replay` only the requests `predicate` accepts.
#[derive(Clone, Copy, Debug)]
pub struct OnlyIf<K, F> {
    replay: K,
    predicate: F,
}

impl<K, F> OnlyIf<K, F> {
    /// Replays with `replay` the requests for which `predicate` returns `true`.
    pub const fn new(replay: K, predicate: F) -> Self {
        Self { replay, predicate }
    }
}

impl<K, F, Req> Replay<Req> for OnlyIf<K, F>
where
    K: Replay<Req>,
    F: Fn(&Req) -> bool,
{
    fn replay(&self, request: &Req) -> Option<Req> {
        if (self.predicate)(request) {
            self.replay.replay(request)
        } else {
            None
        }
    }

    fn replay_unsent(&self, request: &Req) -> Option<Req> {
        if (self.predicate)(request) {
            self.replay.replay_unsent(request)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_and_closures_decide_what_is_replayed() {
        let even = OnlyIf::new(CloneRequest, |n: &u32| n % 2 == 0);
        assert_eq!(even.replay(&4), Some(4));
        assert_eq!(even.replay(&3), None);
        let never = |_: &String| None;
        assert_eq!(never.replay(&"body".to_string()), None);
    }
}
