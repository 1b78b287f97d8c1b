//! [`Origin`]: where the cache gets what it does not hold. The trait lives here, with the
//! code that uses it; the outer layer (`app`) implements it for the Graph client, and
//! tests implement it with canned answers, so the cache never names `GraphClient` and its
//! tests need no sockets.

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::core::model::SessionKey;
use crate::upstream::error::UpstreamError;
use crate::upstream::gate::Gate;
use crate::upstream::graph::GraphAnswer;

pub trait Origin: Send + Sync + 'static {
    /// Graph's answer for `key` (one session, or an event's merged list) by `deadline`:
    /// found or not found, or why not.
    fn fetch<'a>(
        &'a self,
        key: &'a SessionKey,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<GraphAnswer, UpstreamError>>;

    /// The gate in front of the origin: the shared tier publishes its closures to other
    /// replicas and closes it when another replica's closed.
    fn gate(&self) -> &Gate;
}
