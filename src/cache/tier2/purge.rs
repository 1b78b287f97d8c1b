//! [`Purge`]: a purge as broadcast to every replica (its encoding, and the decoding of
//! whatever arrives on the channel), its removal from Redis (UNLINK, SCAN for an event or
//! everything), and following the other replicas' purges.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::cache::tier2::protocol::glob_escape;
use crate::cache::tier2::SharedTier;
use crate::core::model::{Kind, SessionKey};

/// How often the purge subscription is pinged.
const SUBSCRIPTION_PING: Duration = Duration::from_secs(10);

/// A purge, as broadcast to every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// One session (every version) or list, and the session's event list.
    Key(SessionKey),
    Event(Kind, String),
    All,
    /// Replica `by` refreshed the session (a change notification) and stored it in Redis:
    /// every other replica drops its copy (every version) and the event's list from memory.
    /// Nothing is removed from Redis.
    Refreshed {
        key: SessionKey,
        by: String,
    },
}

impl Purge {
    fn encode(&self) -> String {
        match self {
            Purge::Key(key) => match &key.session {
                Some(session) => format!("s {} {} {}", key.kind, key.event, session),
                None => format!("l {} {}", key.kind, key.event),
            },
            Purge::Event(kind, event) => format!("e {kind} {event}"),
            Purge::All => "a".to_string(),
            Purge::Refreshed { key, by } => match &key.session {
                Some(session) => format!("r {by} {} {} {}", key.kind, key.event, session),
                None => format!("r {by} {} {}", key.kind, key.event),
            },
        }
    }

    /// Decodes a broadcast; ids are validated again as if a caller had sent them.
    fn decode(message: &str) -> Option<Purge> {
        let parts: Vec<&str> = message.split(' ').collect();
        let kind = Kind::parse;
        match parts.as_slice() {
            ["s", k, event, session] => SessionKey::new(kind(k)?, event, session)
                .ok()
                .map(Purge::Key),
            ["l", k, event] => SessionKey::list(kind(k)?, event).ok().map(Purge::Key),
            ["e", k, event] => {
                SessionKey::list(kind(k)?, event).ok()?;
                Some(Purge::Event(kind(k)?, event.to_string()))
            }
            ["a"] => Some(Purge::All),
            ["r", by, k, event, session] => Some(Purge::Refreshed {
                key: SessionKey::new(kind(k)?, event, session).ok()?,
                by: by.to_string(),
            }),
            _ => None,
        }
    }
}

impl SharedTier {
    /// Removes what `purge` names from Redis and broadcasts it to every replica.
    /// Returns whether Redis took it.
    pub async fn purge(&self, purge: &Purge) -> bool {
        let mut conn = self.link.conn();
        if let Purge::Refreshed { .. } = purge {
            return self.publish(purge).await;
        }
        // First: stores from Graph calls that began before the purge are refused.
        let generation = self
            .link
            .run(
                "purge",
                redis::cmd("INCR")
                    .arg(self.generation_key())
                    .query_async::<i64>(&mut conn),
            )
            .await
            .is_ok();
        let removed = match purge {
            Purge::Key(key) => {
                let mut keys = Vec::new();
                for version in [
                    crate::config::ApiVersion::V1,
                    crate::config::ApiVersion::Beta,
                ] {
                    let key = key.clone().with_version(version);
                    keys.push(self.entry_key(&key));
                    keys.push(self.entry_key(&SessionKey {
                        session: None,
                        ..key
                    }));
                }
                self.link
                    .run(
                        "purge",
                        redis::cmd("UNLINK").arg(keys).query_async::<i64>(&mut conn),
                    )
                    .await
                    .is_ok()
            }
            Purge::Event(kind, event) => {
                let pattern = format!(
                    "{}e:{}:{}:*",
                    glob_escape(&self.prefix),
                    kind,
                    glob_escape(event)
                );
                self.unlink_matching(&pattern).await
            }
            Purge::All => {
                let pattern = format!("{}e:*", glob_escape(&self.prefix));
                self.unlink_matching(&pattern).await
            }
            Purge::Refreshed { .. } => true,
        };
        generation && removed && self.publish(purge).await
    }

    async fn publish(&self, purge: &Purge) -> bool {
        let mut conn = self.link.conn();
        self.link
            .run(
                "publish",
                redis::cmd("PUBLISH")
                    .arg(self.channel())
                    .arg(purge.encode())
                    .query_async::<i64>(&mut conn),
            )
            .await
            .is_ok()
    }

    /// This replica's name in the purge channel.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    async fn unlink_matching(&self, pattern: &str) -> bool {
        let mut cursor: u64 = 0;
        loop {
            let mut conn = self.link.conn();
            let Ok((next, keys)) = self
                .link
                .run(
                    "purge",
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async::<(u64, Vec<String>)>(&mut conn),
                )
                .await
            else {
                return false;
            };
            if !keys.is_empty()
                && self
                    .link
                    .run(
                        "purge",
                        redis::cmd("UNLINK").arg(keys).query_async::<i64>(&mut conn),
                    )
                    .await
                    .is_err()
            {
                return false;
            }
            if next == 0 {
                return true;
            }
            cursor = next;
        }
    }

    /// Applies purges broadcast by any replica (this one included) until the task is
    /// dropped, resubscribing after a lost connection (noticed by a ping every 10 s).
    /// Purges broadcast while this replica was disconnected are missed; their entries
    /// still expire by `ttl`.
    pub async fn follow_purges(self: Arc<Self>, apply: impl Fn(Purge)) {
        loop {
            let subscribed =
                tokio::time::timeout(self.link.timeout + self.link.connect_timeout, async {
                    let mut pubsub = self.link.client.get_async_pubsub().await?;
                    pubsub.subscribe(self.channel()).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                })
                .await;
            match subscribed {
                Ok(Ok(pubsub)) => {
                    tracing::debug!(instance = %self.instance, "following shared purges");
                    let (mut sink, mut messages) = pubsub.split();
                    let mut ping = tokio::time::interval(SUBSCRIPTION_PING);
                    ping.tick().await;
                    loop {
                        tokio::select! {
                            message = messages.next() => {
                                let Some(message) = message else { break };
                                let Ok(text) = message.get_payload::<String>() else {
                                    continue;
                                };
                                match Purge::decode(&text) {
                                    Some(purge) => apply(purge),
                                    None => tracing::warn!("ignored a malformed shared purge message"),
                                }
                            }
                            _ = ping.tick() => {
                                let alive = tokio::time::timeout(
                                    self.link.timeout + self.link.connect_timeout,
                                    sink.ping::<String>(),
                                )
                                .await;
                                if !matches!(alive, Ok(Ok(_))) {
                                    tracing::debug!("shared purge subscription did not answer a ping");
                                    break;
                                }
                            }
                        }
                    }
                    tracing::debug!("shared purge subscription ended");
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot subscribe to shared purges"),
                Err(_) => tracing::debug!("subscribing to shared purges timed out"),
            }
            tokio::time::sleep(self.link.retry_interval.max(Duration::from_millis(200))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purges_round_trip_and_refuse_bad_ids() {
        for purge in [
            Purge::Key(SessionKey::new(Kind::Webinars, "a@b", "s=+").unwrap()),
            Purge::Key(SessionKey::list(Kind::Townhalls, "e").unwrap()),
            Purge::Event(Kind::Townhalls, "e@t".to_string()),
            Purge::All,
            Purge::Refreshed {
                key: SessionKey::new(Kind::Webinars, "a@b", "s").unwrap(),
                by: "replica-1".to_string(),
            },
        ] {
            assert_eq!(Purge::decode(&purge.encode()), Some(purge));
        }
        for bad in [
            "",
            "x",
            "s webinars a",
            "s webinars a/b c",
            "e meetings a",
            "e webinars *",
            "s webinars a b c",
        ] {
            assert_eq!(Purge::decode(bad), None, "{bad}");
        }
    }
}
